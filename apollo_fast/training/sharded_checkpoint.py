"""Checkpoints of a sharded run (`apollo-fast train --fsdp`): a torch.distributed.checkpoint (DCP) folder per step.

    checkpoints/step-NNNNNNNN/
        .metadata, __R_N.distcp   model and optimizer state: each rank writes its own shards (DCP)
        trainer.pt                stream position, loss history, settings, every rank's RNG states (rank 0)
        manifest.json             "layout": "dcp", the world size, the size and sha256 of every file (rank 0)

Complete under its name, as a one-process checkpoint: rank 0 makes the folder under a temporary name
(apollo_fast.atomic), every rank writes its shards into it and checksums its share of the files, and rank 0
writes the manifest and renames the folder into place. A job that dies before the rename leaves a .tmp-* folder,
never a step-* one; the next run on the folder removes it. Every step ends in an agreement between the ranks
(`fsdp.together`), so a failure on one rank stops every rank at the same point.

DCP reshards on load, so a checkpoint resumes on any world size. Either layout loads into either kind of run:
a one-process checkpoint into a sharded run (rank 0 reads the files, the shards are broadcast) and a DCP
checkpoint into one process (DCP without a process group).
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import _commit_point, atomic_dir, remove_stale, remove_tree
from .checkpoint_files import (
    DCP,
    FORMAT_VERSION,
    MODEL_FILE,
    SINGLE,
    STATE_FILE,
    CheckpointError,
    file_record,
    step_dirs,
    write_manifest,
)
from .fsdp import LostRank, Ranks, broadcast, together

__all__ = ["save_sharded_checkpoint", "load_weights", "load_optimizer"]


def _dcp_load(state: dict[str, Any], path: Path) -> None:
    """dcp.load; without a process group it reads the whole checkpoint in this one process (on purpose: no
    warning about it)."""
    import warnings

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    alone = not (dist.is_available() and dist.is_initialized())
    with warnings.catch_warnings():
        if alone:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(state, checkpoint_id=path, no_dist=alone)


def _dcp_error(path: Path, what: str, err: BaseException) -> CheckpointError:
    return CheckpointError(f"{path}: the {what} state cannot be loaded ({type(err).__name__}: {err})")


def save_sharded_checkpoint(
    root: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
    ranks: Ranks, keep: int = 2,
) -> Path:  # fmt: skip
    """Write checkpoint `step` of a sharded run under `root` (every rank calls it); then keep the newest `keep`.

    `state` (rank 0's is written) holds the plain-container rest of the run (loads with weights_only=True).
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = Path(root)
    final = root / f"step-{step:08d}"
    msd, osd = get_state_dict(model, optimizer)
    with ExitStack() as folder:

        def start() -> str | None:
            if not ranks.main:
                return None
            root.mkdir(parents=True, exist_ok=True)
            tmp = folder.enter_context(atomic_dir(final, overwrite=True))
            torch.save({"format_version": FORMAT_VERSION, "step": step, **state}, tmp / STATE_FILE)
            return str(tmp)

        tmp = Path(broadcast(together(ranks, start)))
        try:
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp)
        except BaseException as err:  # DCP raises CheckpointException (a BaseException) on every rank alike
            if isinstance(err, (KeyboardInterrupt, SystemExit, LostRank)):
                raise
            causes = [err, *(f[0] for f in getattr(err, "failures", {}).values())]
            if not any(isinstance(c, OSError) for c in causes) and any(isinstance(c, RuntimeError) for c in causes):
                raise LostRank(f"while writing {final}: {err}") from None  # a collective failed: a rank is gone
            raise OSError(f"{final}: writing the sharded checkpoint failed: {err}") from None
        _commit_point()  # tests: every rank's shards are written, the folder is not yet in place

        def mine() -> dict[str, dict[str, Any]]:  # this rank's share of the checksums
            names = sorted(p.name for p in tmp.iterdir() if p.is_file())
            return {n: file_record(tmp / n) for k, n in enumerate(names) if k % ranks.world == ranks.rank}

        shares: list[dict[str, dict[str, Any]] | None] = [None] * ranks.world
        dist.all_gather_object(shares, together(ranks, mine))

        def commit() -> None:
            if not ranks.main:
                return
            files = {n: r for share in shares for n, r in (share or {}).items()}
            unseen = sorted(n for n in files if not (tmp / n).is_file())
            if unseen:
                raise OSError(f"{tmp}: rank 0 does not see {unseen}, which other ranks wrote: --out must be a folder "
                              "every node shares")  # fmt: skip
            for p in tmp.iterdir():  # a file another rank's listing missed (a lagging network file system)
                if p.is_file() and p.name not in files:
                    files[p.name] = file_record(p)
            write_manifest(tmp, files, DCP, world_size=ranks.world)
            folder.close()  # atomic_dir: fsync, rename into place
            for old in step_dirs(root)[:-keep]:
                remove_tree(old)
            remove_stale(root)

        together(ranks, commit)
    return final


def _tied_aliases(model: nn.Module) -> dict[str, list[str]]:
    """name -> every name of the same parameter (tied weights are stored once in a safetensors file)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return {name: names for names in groups.values() for name in names}


def load_weights(path: Path, layout: str, model: nn.Module, ranks: Ranks | None) -> None:
    """The checkpoint's weights into `model` (sharded under `ranks`, or one process's), strict; CheckpointError
    on every rank when they do not fit."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    if layout == DCP:
        import torch.distributed.checkpoint as dcp

        msd = get_model_state_dict(model)
        try:
            _dcp_load({"model": msd}, path)
            set_model_state_dict(model, msd)
        except (Exception, dcp.api.CheckpointException) as err:  # noqa: BLE001 - weights of another model
            raise _dcp_error(path, "model", err) from None
        return
    if ranks is None:
        from safetensors.torch import load_model

        try:
            load_model(model, str(path / MODEL_FILE), strict=True, device=str(next(model.parameters()).device))
        except Exception as err:  # noqa: BLE001 - a damaged file or weights of another model
            raise CheckpointError(f"{path / MODEL_FILE}: cannot be loaded into the model ({err})") from None
        return

    def read() -> dict[str, torch.Tensor]:  # rank 0: the whole model, tied names filled in
        if not ranks.main:
            return {}
        from safetensors.torch import load_file

        try:
            full = load_file(path / MODEL_FILE)
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(f"{path / MODEL_FILE}: cannot be read ({err})") from None
        for name, names in _tied_aliases(model).items():
            stored = next((n for n in names if n in full), None)
            if name not in full and stored is not None:
                full[name] = full[stored]
        return full

    full = together(ranks, read, relay=CheckpointError)
    try:
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path / MODEL_FILE}: cannot be loaded into the model ({err})") from None


def _by_name(saved: dict[str, Any], optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any]:
    """A one-process optimizer state_dict (parameters numbered) keyed by parameter names, as DCP's are."""
    names = {id(p): n for n, p in model.named_parameters()}
    ours = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    ids = [i for g in saved["param_groups"] for i in g["params"]]
    if len(ids) != len(ours):
        raise CheckpointError(f"the checkpoint's optimizer has {len(ids)} parameters, this run's {len(ours)}")
    fqn = dict(zip(ids, ours, strict=True))
    return {
        "state": {fqn[i]: s for i, s in saved["state"].items()},
        "param_groups": [{**g, "params": [fqn[i] for i in g["params"]]} for g in saved["param_groups"]],
    }


def load_optimizer(
    state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, ranks: Ranks | None
) -> None:
    """The optimizer state of the checkpoint `state` came from (load_checkpoint's result) into `optimizer`."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    path = Path(state["path"])
    if state["layout"] == DCP:
        import torch.distributed.checkpoint as dcp

        osd = get_optimizer_state_dict(model, optimizer)  # its layout (a new optimizer takes one lr-0 step first)
        try:
            _dcp_load({"optim": osd}, path)
            set_optimizer_state_dict(model, optimizer, osd)
        except (Exception, dcp.api.CheckpointException) as err:  # noqa: BLE001 - another optimizer's state
            raise _dcp_error(path, "optimizer", err) from None
        return
    if ranks is None:
        optimizer.load_state_dict(state["optimizer"])
        return
    assert state["layout"] == SINGLE
    named = together(ranks, lambda: _by_name(state["optimizer"], optimizer, model) if ranks.main else {},
                     relay=CheckpointError)  # fmt: skip
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    try:
        set_optimizer_state_dict(model, optimizer, named, options=options)
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path / STATE_FILE}: the optimizer state does not fit this run ({err})") from None
