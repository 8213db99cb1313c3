"""Training checkpoints: complete under their name, checksummed, and found again after any kill.

A checkpoint is a folder `step-NNNNNNNN/` holding
    model.safetensors   the model's weights (safetensors.torch.save_model: tied weights stored once)
    trainer.pt          torch.save of plain containers and tensors (loads with weights_only=True):
                        the optimizer's state_dict, the data-stream position, RNG states, the loss
                        history and the run's settings.
    manifest.json       the size and sha256 of both files, written last.
Under `--fsdp` a checkpoint is a torch.distributed.checkpoint (DCP) folder instead (sharded_checkpoint.py):
    .metadata, __R_N.distcp   model and optimizer state, each rank's shards (DCP; loads on any world size)
    trainer.pt                the rest, as above, with every rank's RNG states
    manifest.json             "layout": "dcp", the world size, and the size and sha256 of every file
Either kind resumes either kind of run (`load_checkpoint`).

It is built under a temporary name and renamed into place (apollo_fast.atomic), so a folder named
step-* was complete when written; the manifest catches what happens to it afterwards (a truncated
copy, a bad disk, a hand edit): every file is checked against it before anything is loaded.
Writing a new checkpoint never touches the previous one until the new one is in place; old
checkpoints leave the step-* namespace before they are deleted.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_dir, remove_stale, remove_tree
from .checkpoint_files import (
    CHECKPOINT_DIR,
    DCP,
    FORMAT_VERSION,
    MANIFEST_FILE,
    MODEL_FILE,
    REQUIRED,
    SINGLE,
    STATE_FILE,
    STEP_DIR,
    CheckpointError,
    file_record,
    latest_checkpoint,
    step_dirs,
    verify_checkpoint,
    write_manifest,
)
from .fsdp import Ranks, broadcast, together
from .sharded_checkpoint import load_weights

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "verify_checkpoint",
    "latest_checkpoint",
    "quarantine",
    "CheckpointError",
    "CHECKPOINT_DIR",
    "MODEL_FILE",
    "STATE_FILE",
    "MANIFEST_FILE",
    "SINGLE",
    "DCP",
]


def _is_checkpoint(path: Path) -> bool:
    return any((path / name).exists() for name in (STATE_FILE, MANIFEST_FILE)) or bool(STEP_DIR.match(path.name))


def _candidates(path: Path) -> list[Path]:
    """Checkpoint folders to try for `path` (a checkpoint, a checkpoints folder or a run folder), newest first."""
    if _is_checkpoint(path):
        return [path]
    for root in (path, path / CHECKPOINT_DIR):
        dirs = step_dirs(root)
        if dirs:
            return dirs[::-1]
    raise FileNotFoundError(f"no checkpoint found at {path} (expected {STATE_FILE} or {CHECKPOINT_DIR}/step-*)")


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means: this file cannot be used
        raise CheckpointError(
            f"{path / STATE_FILE}: not loadable with torch.load(weights_only=True) ({type(err).__name__})"
        ) from None
    version = state.get("format_version") if isinstance(state, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path / STATE_FILE}: unknown checkpoint format {version!r} (expected {FORMAT_VERSION})")
    return state


def _load_one(path: Path, model: nn.Module | None, ranks: Ranks | None) -> dict[str, Any]:
    part = (0, 1) if ranks is None else (ranks.rank, ranks.world)
    manifest = together(ranks, lambda: verify_checkpoint(path, part), relay=CheckpointError)
    layout = manifest["layout"]
    # a one-process trainer.pt holds the whole optimizer state: rank 0 reads it and shares the rest
    reader = ranks is None or ranks.main or layout == DCP
    state = together(ranks, lambda: _read_state(path) if reader else {}, relay=CheckpointError)
    if ranks is not None and layout == SINGLE:
        shared = broadcast({k: v for k, v in state.items() if k != "optimizer"} if ranks.main else None)
        state = {**state, **shared}
    if model is not None:
        load_weights(path, layout, model, ranks)
    state.update(path=str(path), layout=layout, world_size=int(manifest.get("world_size", 1)))
    return state


def _first_good(
    candidates: list[Path], model: nn.Module | None, ranks: Ranks | None
) -> tuple[dict[str, Any] | None, list[tuple[str, str]]]:
    """The state of the first checkpoint that verifies and loads, and (folder, why) for each one before it."""
    skipped = []
    for path in candidates:
        try:
            return _load_one(path, model, ranks), skipped
        except CheckpointError as err:
            skipped.append((str(path), str(err)))
    return None, skipped


def load_checkpoint(path: str | Path, model: nn.Module | None = None, *, ranks: Ranks | None = None) -> dict[str, Any]:
    """Verify, then load a checkpoint's trainer state (weights_only) and, when `model` is given, its weights
    in place (strict).

    `path` is a checkpoint folder (it must be good: CheckpointError names the bad file and the newest
    good checkpoint beside it) or a checkpoints / run folder: its newest checkpoint that verifies and
    loads is taken; state["skipped"] lists (folder, why) for each newer one passed over. state["path"] is
    the checkpoint loaded, state["layout"] its kind ('single' or 'dcp'), state["world_size"] the ranks that
    wrote it. FileNotFoundError when there is no checkpoint at all.

    Either layout loads into a one-process model or, with `ranks` (every rank calls it), a sharded one; the
    optimizer state follows with sharded_checkpoint.load_optimizer. Under `ranks` the ranks share the
    checksumming and agree on every decision.
    """
    path = Path(path)
    candidates = _candidates(path)
    if candidates == [path]:
        try:
            state = _load_one(path, model, ranks)
        except CheckpointError as err:
            siblings = [p for p in step_dirs(path.parent)[::-1] if p != path]
            good = next((p for p in siblings if _verifies(p)), None)
            raise CheckpointError(err.reason, good) from None
        state["skipped"] = []
        return state
    state, skipped = _first_good(candidates, model, ranks)
    if state is None:
        raise CheckpointError(f"no usable checkpoint under {path}:\n" + "\n".join(why for _, why in skipped))
    state["skipped"] = skipped
    return state


def _verifies(path: Path) -> bool:
    try:
        verify_checkpoint(path)
    except CheckpointError:
        return False
    return True


def save_checkpoint(root: str | Path, step: int, model: nn.Module, state: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint `step` under `root` atomically; then keep only the newest `keep` (>= 1).

    Also removes leftovers of earlier saves that were killed (.tmp-* under `root`): call it from one
    process per `root` at a time (`apollo-fast train` holds a lock on its run folder).
    """
    from safetensors.torch import save_model

    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    with atomic_dir(final, overwrite=True) as tmp:
        save_model(model, str(tmp / MODEL_FILE))
        torch.save({"format_version": FORMAT_VERSION, "step": step, **state}, tmp / STATE_FILE)
        write_manifest(tmp, {name: file_record(tmp / name) for name in REQUIRED[SINGLE]})
    for old in step_dirs(root)[:-keep]:
        remove_tree(old)
    remove_stale(root)
    return final


def quarantine(path: str | Path) -> Path:
    """Rename a damaged checkpoint folder out of the step-* namespace (to corrupt-step-*), keeping it for inspection."""
    path = Path(path)
    target = path.with_name(f"corrupt-{path.name}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"corrupt-{path.name}.{n}")
    os.replace(path, target)
    return target
