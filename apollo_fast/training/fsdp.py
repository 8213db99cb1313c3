"""`apollo-fast train --fsdp`: the ranks torchrun starts, the model sharded with FSDP2, each rank's share of a step.

Ranks: torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous; the process group is gloo on the CPU and
NCCL (with gloo for CPU tensors) on CUDA, where each rank takes cuda:LOCAL_RANK.

The model: rank 0 loads it from its folder, the other ranks build it on the meta device (no memory, no read);
every decoder layer, then the root (embeddings, final norm, head), is sharded with `fully_shard`, and rank 0's
weights and buffers are broadcast into the shards. Gradients are reduce-scattered as sums, not averages: each
rank weighs its items with their weights in the whole step, so the sum over ranks is the one-process gradient.

A step: its K items (the one global stream, identical on every rank) are dealt round-robin, item i to rank
i mod W. FSDP all-gathers a layer at every forward and reduce-scatters it at every backward, so all ranks must
run the same sequence of forwards and backwards or their collectives would pair up wrongly (a hang). The step
therefore runs in rounds, round j holding the j-th item of each rank: one context encode when any rank's item
has a context, then as many forward/backward passes as the round's largest item needs; a rank with less (or
no item) runs the missing ones on a two-token input with weight 0, adding exact zeros to the gradient.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "Ranks",
    "Round",
    "ReportedElsewhere",
    "LostRank",
    "join",
    "exit_on_sigterm",
    "refuse_unsharded_torchrun",
    "together",
    "broadcast",
    "say",
    "load_sharded",
    "full_state_dict",
    "rounds",
    "gather_items",
    "DUMMY_CONTEXT",
    "DUMMY_SEGMENT",
]

T = TypeVar("T")
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DUMMY_CONTEXT = (0,)  # a zero-weight round's stand-ins: token 0 is in every vocabulary
DUMMY_SEGMENT = (0, 0)


class ReportedElsewhere(ValueError):
    """Another rank failed and reports why; this rank stops quietly (the CLI exits 2 without a message)."""


LostRank = dist.DistError if dist.is_available() else RuntimeError  # a collective failed: a peer is gone


@dataclass
class Ranks:
    """This process's place in the job."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    mesh: Any  # the 1-D DeviceMesh over all ranks
    owns_group: bool  # join() made the process group, so leave() ends it

    @property
    def main(self) -> bool:
        return self.rank == 0

    def leave(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _env_world() -> int | None:
    value = os.environ.get("WORLD_SIZE")
    return int(value) if value and value.isdigit() else None


def refuse_unsharded_torchrun() -> None:
    """ValueError when several processes run `apollo-fast train` without --fsdp (each would train alone)."""
    world = _env_world()
    if world is not None and world > 1:
        raise ValueError(
            f"running under torchrun with {world} processes: pass --fsdp to train one model across them "
            "(without it every process would train its own copy into the same --out)"
        )


def join(device: str | None) -> Ranks:
    """This rank of the job torchrun started (or of the process group the caller already made)."""
    if not dist.is_available():
        raise ValueError("--fsdp needs torch.distributed, which this torch build lacks")
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"--fsdp: --device must be 'cpu' or 'cuda' (each rank takes cuda:LOCAL_RANK), got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("--fsdp --device cuda: no CUDA device is visible")
    owns = not dist.is_initialized()
    if owns:
        missing = [k for k in _ENV if k not in os.environ]
        if missing:
            raise ValueError(
                "--fsdp runs under torchrun, which starts one process per GPU (or CPU rank): "
                "torchrun --nproc-per-node N -m apollo_fast train ... --fsdp "
                f"(missing environment: {', '.join(missing)})"
            )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if kind == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) are visible")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if owns:  # on CUDA: NCCL for the model's tensors, gloo for the few CPU ones (objects, DCP's planning)
        backend = "cpu:gloo,cuda:nccl" if kind == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=dev if kind == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(kind, (dist.get_world_size(),))
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank, dev, mesh, owns)


@contextmanager
def exit_on_sigterm(ranks: Ranks, note: str) -> Iterator[None]:
    """SIGTERM (torchrun's stop for the surviving ranks when one fails) raises SystemExit(143) instead of ending
    the process on the spot, so temporary folders are removed and the run lock released on the way out; rank 0
    says `note`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        say(ranks, note)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def together(ranks: Ranks | None, fn: Callable[[], T], relay: type[Exception] | None = None) -> T:
    """fn() on every rank, then agree (one collective), so that no rank goes on to a collective the others
    never reach. When fn raised (ValueError, OSError, FloatingPointError) anywhere: with relay=None the first
    rank that failed raises its error and the others ReportedElsewhere (a bad input is reported once, not once
    per rank); with relay=E every rank raises E(the first failure's message)."""
    if ranks is None:
        return fn()
    result, error, why = None, None, None
    try:
        result = fn()
    except (ValueError, OSError, FloatingPointError) as err:
        error, why = err, (str(err) if relay is not None else f"{type(err).__name__}: {err}")
    reports: list[str | None] = [None] * ranks.world
    dist.all_gather_object(reports, why)
    failed = [r for r, w in enumerate(reports) if w is not None]
    if not failed:
        return result  # type: ignore[return-value]
    if relay is not None:
        raise relay(reports[failed[0]])
    if failed[0] == ranks.rank:
        raise error  # type: ignore[misc]
    raise ReportedElsewhere(f"rank {failed[0]} failed: {reports[failed[0]]}")


def say(ranks: Ranks | None, message: str) -> None:
    """A line on stderr from rank 0 only."""
    if ranks is None or ranks.main:
        print(f"apollo-fast train: {message}", file=sys.stderr, flush=True)


# -- the model ----------------------------------------------------------------------------------------


def broadcast(obj: T) -> T:
    """Rank 0's `obj` on every rank (pickled)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def shard(model: nn.Module, ranks: Ranks) -> None:
    """fully_shard each decoder layer, then the root; gradients reduce-scattered as sums (see the module doc)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from ..frozen.adapters import model_parts

    low = next(model.parameters()).dtype in (torch.bfloat16, torch.float16)
    # 16-bit weights: sum the ranks' gradients in fp32 (rounded once), not pairwise in 16 bits
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32) if low else MixedPrecisionPolicy()
    for layer in model_parts(model).layers:
        fully_shard(layer, mesh=ranks.mesh, mp_policy=policy)
    fully_shard(model, mesh=ranks.mesh, mp_policy=policy)
    for module in _fsdp_modules(model):
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)  # a plain sum (gloo has no PREMUL_SUM)


def load_sharded(path: str, dtype: Any, ranks: Ranks) -> nn.Module:
    """The model of folder `path`, sharded over the ranks (weights read by rank 0 only, broadcast to the shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from transformers import AutoModelForCausalLM

    def read() -> nn.Module | None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype) if ranks.main else None

    model = together(ranks, read)
    config, dtype = broadcast((model.config, model.dtype) if ranks.main else None)
    full: dict[str, torch.Tensor] = {}
    if ranks.main:
        full = dict(model.state_dict())  # the weights, before sharding keeps only rank 0's piece
    else:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(
                config, dtype=dtype, attn_implementation=config._attn_implementation
            )
    shard(model, ranks)
    if not ranks.main:
        model.to_empty(device=ranks.device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full, options=options)
    for buffer in model.buffers():  # persistent or not (e.g. rotary inv_freq): rank 0's values
        dist.broadcast(buffer, src=0)
    del full
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights gathered into CPU tensors on rank 0 (an empty dict on the other ranks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# -- a step's share -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Round:
    """One round of a step: item `items[r]` (or None) for each rank r, whether the ranks encode a context, and
    how many forward/backward passes each rank runs."""

    items: tuple[int | None, ...]
    encode: bool
    passes: int


def rounds(has_context: Sequence[bool], passes: Sequence[int], world: int) -> list[Round]:
    """The rounds of a step whose items (in stream order) have a context or not and need `passes` forward /
    backward passes each: item i goes to rank i mod world."""
    out = []
    for start in range(0, len(passes), world):
        idx = tuple(i if i < len(passes) else None for i in range(start, start + world))
        real = [i for i in idx if i is not None]
        out.append(Round(idx, any(has_context[i] for i in real), max(passes[i] for i in real)))
    return out


def gather_items(values: torch.Tensor, n_items: int, ranks: Ranks) -> torch.Tensor:
    """This rank's per-round values [rounds] -> every item's value in stream order [n_items] (one all-gather)."""
    everyone = values.new_empty(ranks.world * values.numel())
    dist.all_gather_single(everyone, values.contiguous())
    return everyone.view(ranks.world, -1).t().reshape(-1)[:n_items]
