"""JSON Lines input: every non-blank line parsed; every problem reported as `FILE:LINE: what`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["iter_jsonl"]


def iter_jsonl(path: str | Path, what: str = "file") -> Iterator[tuple[int, Any, str | None]]:
    """(line number, value, None) for each non-blank line that parses, (line number, None, problem) for
    each that does not (not UTF-8, not JSON). `what` names the file in the errors raised up front:
    FileNotFoundError when it does not exist, ValueError when it is a folder."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder, not a JSON Lines file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # tolerate a BOM
            except UnicodeDecodeError as err:
                yield lineno, None, f"not valid UTF-8 ({err.reason} at byte {err.start})"
                continue
            if not text.strip():
                continue
            try:
                yield lineno, json.loads(text), None
            except json.JSONDecodeError as err:
                yield lineno, None, f"invalid JSON: {err.msg} (column {err.colno})"
