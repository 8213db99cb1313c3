"""What a checkpoint folder holds and how it is checked: the file names, the layouts, manifest.json (the size
and sha256 of every file) and the step-* folders of a run. Writing and loading are checkpoint.py (one process)
and sharded_checkpoint.py (DCP)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

__all__ = [
    "CHECKPOINT_DIR",
    "DCP",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "MODEL_FILE",
    "REQUIRED",
    "SINGLE",
    "STATE_FILE",
    "STEP_DIR",
    "CheckpointError",
    "file_record",
    "latest_checkpoint",
    "read_manifest",
    "step_dirs",
    "verify_checkpoint",
    "write_manifest",
]

FORMAT_VERSION = 2  # 2: manifest.json with checksums
CHECKPOINT_DIR = "checkpoints"
MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer.pt"
MANIFEST_FILE = "manifest.json"
DCP_METADATA = ".metadata"
SINGLE, DCP = "single", "dcp"  # the layouts: one process's files, or a DCP folder of every rank's shards
REQUIRED = {SINGLE: (MODEL_FILE, STATE_FILE), DCP: (DCP_METADATA, STATE_FILE)}
STEP_DIR = re.compile(r"^step-(\d{8,})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and why. `good`: the newest
    checkpoint beside it that verifies, when there is one."""

    def __init__(self, reason: str, good: Path | None = None) -> None:
        hint = f"; the newest checkpoint beside it that verifies is {good}" if good is not None else ""
        super().__init__(reason + hint)
        self.reason, self.good = reason, good


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    """A manifest's entry for one file: its size and sha256."""
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def write_manifest(folder: Path, files: dict[str, dict[str, Any]], layout: str = SINGLE, **extra: Any) -> None:
    """manifest.json of checkpoint folder `folder` (still under its temporary name: atomic with it)."""
    manifest = {"format_version": FORMAT_VERSION, **({} if layout == SINGLE else {"layout": layout}), **extra,
                "files": dict(sorted(files.items()))}  # fmt: skip
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n")


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of checkpoint folder `path`, its shape checked: "layout" and "files" {name: (bytes, sha256)}."""
    manifest = Path(path) / MANIFEST_FILE
    try:
        data = json.loads(manifest.read_bytes())
        layout = data.get("layout", SINGLE)
        files = {name: (int(f["bytes"]), str(f["sha256"])) for name, f in data["files"].items()}
        missing = [name for name in REQUIRED[layout] if name not in files]
        if missing or any("/" in name or name in ("", ".", "..") for name in files):
            raise ValueError(f"lists {sorted(files)}, which lacks {missing} or names files outside the folder")
    except FileNotFoundError:
        raise CheckpointError(
            f"{manifest}: missing (the checkpoint is incomplete, or was written before checkpoints carried checksums)"
        ) from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{manifest}: damaged ({type(err).__name__}: {err})") from None
    return {**data, "layout": layout, "files": files}


def verify_checkpoint(path: str | Path, part: tuple[int, int] = (0, 1)) -> dict[str, Any]:
    """CheckpointError unless every file of checkpoint folder `path` has the size and sha256 its manifest lists;
    returns the manifest. part=(i, n): check the sha256 of every n-th file from the i-th only (the ranks of a job
    share the reading; sizes are always all checked)."""
    path = Path(path)
    manifest = read_manifest(path)
    for k, (name, (size, digest)) in enumerate(sorted(manifest["files"].items())):
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
        actual = file.stat().st_size
        if actual != size:
            raise CheckpointError(f"{file}: {actual} bytes, the manifest says {size} (truncated or overwritten)")
        if k % part[1] == part[0] and _sha256(file) != digest:
            raise CheckpointError(f"{file}: sha256 differs from the manifest (the file is corrupted)")
    return manifest


def step_dirs(root: Path) -> list[Path]:
    """Folders named step-* under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = STEP_DIR.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest step-* folder under `root` (not verified), or None."""
    dirs = step_dirs(Path(root))
    return dirs[-1] if dirs else None
