"""Checks made before anything is read or written: numbers that must be finite and in range, and
output paths (one rule for every output of every command).

The output rule: an output file must not exist, an output folder must not exist or be empty, unless
`--overwrite`; the place it goes must be (or be creatable inside) a writable folder. Checked first,
so a bad --out fails in a second, not after a model has been loaded.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["finite_number", "number_arg", "layer_list", "check_output", "check_input_file"]


def finite_number(
    name: str,
    value: float,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    below: float | None = None,
) -> float:
    """`value` as a float; ValueError naming `name` unless it is finite and within the bounds
    (minimum / maximum inclusive, above / below exclusive)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and x < minimum:
        raise ValueError(f"{name} must be >= {minimum:g}, got {value!r}")
    if maximum is not None and x > maximum:
        raise ValueError(f"{name} must be <= {maximum:g}, got {value!r}")
    if above is not None and not x > above:
        raise ValueError(f"{name} must be > {above:g}, got {value!r}")
    if below is not None and not x < below:
        raise ValueError(f"{name} must be < {below:g}, got {value!r}")
    return x


def number_arg(**bounds: float) -> Callable[[str], float]:
    """An argparse `type=` that accepts only finite numbers within `bounds` (see finite_number)."""

    def parse(text: str) -> float:
        try:
            return finite_number("the value", text, **bounds)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err).replace("the value ", "", 1)) from None

    parse.__name__ = "number"
    return parse


def layer_list(text: str | None, option: str = "--layers") -> list[int] | None:
    """'3,5,7' -> [3, 5, 7]; None stays None (every layer). ValueError naming `option` for anything else."""
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{option} must be comma-separated integers, got {text!r}") from None


def _writable_parent(path: Path, option: str) -> None:
    """The nearest existing ancestor of `path` must be a folder this process can create entries in."""
    probe = path.parent
    while not os.path.lexists(probe) and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{option} {path}: cannot be created, {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: cannot write into {probe} (permission denied or read-only)")


def check_output(path: str | os.PathLike, *, overwrite: bool, folder: bool, option: str = "--out") -> Path:
    """Apply the output rule to `path` (a file, or a folder when folder=True); returns it as a Path."""
    path = Path(path)
    if os.path.lexists(path):
        if folder and not path.is_dir():
            raise ValueError(f"{option} {path}: exists and is not a folder")
        if not folder and path.is_dir():
            raise ValueError(f"{option} {path}: is a folder; give a file name")
        if not overwrite and (not folder or any(path.iterdir())):
            what = "is a folder that is not empty" if folder else "exists"
            raise FileExistsError(f"{option} {path} {what} (pass --overwrite to replace it)")
        if folder and not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"{option} {path}: cannot write into it (permission denied or read-only)")
    _writable_parent(path, option)
    return path


def check_input_file(path: str | os.PathLike, option: str) -> Path:
    """`path` must be an existing regular file (not a folder)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path}: is a folder, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"{option} {path}: no such file")
    return path
