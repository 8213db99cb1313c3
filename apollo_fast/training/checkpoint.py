"""Atomic files and training checkpoints: nothing half-written is ever visible under its final name.

A checkpoint is a directory `step-NNNNNNNN/` holding
    model.safetensors   the model's weights (safetensors.torch.save_model: tied weights stored once)
    trainer.pt          torch.save of plain containers and tensors (loads with weights_only=True):
                        the optimizer's state_dict, the data-stream position, RNG states, the loss
                        history and the run's settings.
It is written into a temporary directory in the same folder, fsynced, then renamed into place, so a
directory named step-* is always complete; the newest one is the latest checkpoint. Writing a new
checkpoint never touches the previous one until the new one is in place.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "replace_dir",
    "save_pretrained_atomic",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "resolve_checkpoint",
    "CHECKPOINT_DIR",
    "MODEL_FILE",
    "STATE_FILE",
]

FORMAT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer.pt"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_TMP_PREFIX = ".tmp-"


def _fsync_path(path: Path) -> None:
    """Flush a file's or directory's contents to disk (directories: where the OS allows it)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() and hasattr(os, "O_DIRECTORY") else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # e.g. directories on Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same folder and os.replace."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_path(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished directory `tmp` to `final` (same folder); an existing `final` is swapped out, then removed.

    os.replace cannot replace a non-empty directory, so an old `final` is first renamed aside: at
    every moment either the old or the new directory is complete on disk.
    """
    if final.exists():
        old = final.with_name(f"{_TMP_PREFIX}old-{final.name}-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_path(final.parent)


def save_pretrained_atomic(model: nn.Module, tokenizer: Any, out_dir: str | Path) -> Path:
    """model.save_pretrained (safetensors) + tokenizer.save_pretrained into a temp dir beside `out_dir`, then rename."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{out_dir.name}-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if not any(tmp.glob("*.safetensors")):
            raise RuntimeError(f"save_pretrained wrote no safetensors file into {tmp}")
        _fsync_tree(tmp)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint directory under `root`, or None."""
    dirs = _step_dirs(Path(root))
    return dirs[-1][1] if dirs else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from: a checkpoint directory, a checkpoints folder, or a run's output folder."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    for root in (path, path / CHECKPOINT_DIR):
        latest = latest_checkpoint(root)
        if latest is not None:
            return latest
    raise FileNotFoundError(f"no checkpoint found at {path} (expected {STATE_FILE} or {CHECKPOINT_DIR}/step-*)")


def save_checkpoint(root: str | Path, step: int, model: nn.Module, state: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint `step` under `root` atomically; then keep only the newest `keep` (>= 1)."""
    from safetensors.torch import save_model

    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}step-{step:08d}-", dir=root))
    try:
        save_model(model, str(tmp / MODEL_FILE))
        torch.save({"format_version": FORMAT_VERSION, "step": step, **state}, tmp / STATE_FILE)
        _fsync_tree(tmp)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in _step_dirs(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in root.glob(f"{_TMP_PREFIX}*"):  # from saves that were interrupted earlier
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, model: nn.Module | None = None) -> dict[str, Any]:
    """Load the trainer state (weights_only) and, when `model` is given, its weights in place (strict)."""
    from safetensors.torch import load_model

    path = resolve_checkpoint(path)
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        version = state.get("format_version") if isinstance(state, dict) else None
        raise ValueError(f"{path / STATE_FILE}: unknown checkpoint format {version!r} (expected {FORMAT_VERSION})")
    if model is not None:
        device = next(model.parameters()).device
        load_model(model, str(path / MODEL_FILE), strict=True, device=str(device))
    state["path"] = str(path)
    return state
