"""One rank of the FSDP2 / DDP checks (run by tests/test_sharded_apollo.py under torchrun, gloo on the CPU).

    python -m torch.distributed.run --nproc-per-node N tests/dist_fsdp_worker.py MODE DIR [--backend triton]

MODE:
  fsdp-save   FSDP2-shard a small model, train STEPS steps with APOLLO, saving model + optimizer through
              torch.distributed.checkpoint (DCP) at SAVE_AT into DIR/ckpt; writes the final full weights
              (DIR/fsdp-save-wN.pt) and, on rank 0, the single-process run's (DIR/single.pt)
  fsdp-load   load DIR/ckpt on this world size and train the remaining steps -> DIR/fsdp-load-wN.pt
  fsdp-load-model  the same, loading the model but not the optimizer state (the control: must differ)
  ddp         the same training under DistributedDataParallel -> DIR/ddp-wN.pt (and DIR/single.pt)
  inbackward  FSDP2 with step_in_backward (per-layer clipping) against the normal FSDP2 step with the same
              clipping -> DIR/inbackward-wN.json (max abs difference of the gathered weights, the step norms)
Every rank trains on its slice of the step's global batch; the single-process run trains on the whole batch
(mean loss), which is the same gradient. --backend triton: APOLLO's Triton backend (scratch NaN-poisoned) for the
sharded and the single-process runs; the files get a '-triton' suffix (DIR/single-triton.pt is the single-process
Triton run).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from helpers import end_distributed_worker
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_model_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

from apollo_fast import APOLLO, apollo_param_groups

STEPS, SAVE_AT, BATCH = 6, 3, 12  # BATCH divisible by 2 and 3


class Net(nn.Module):
    """Tall, wide and square matrices (rows not divisible by 2 or 3), biases and a norm."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(10, 23), nn.Linear(23, 7), nn.Linear(7, 7)])
        self.norm = nn.LayerNorm(7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.norm(x)


def make() -> Net:
    torch.manual_seed(0)
    return Net()


BACKEND = "reference"


def optimizer(model: nn.Module) -> APOLLO:
    groups = apollo_param_groups(model, rank=3, update_proj_gap=2)
    opt = APOLLO(groups, lr=2e-2, weight_decay=0.1, norm_growth_limit=1.05, backend=BACKEND)
    opt._poison_scratch = BACKEND == "triton"
    return opt


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 10, generator=g), torch.randn(BATCH, 7, generator=g)


def train_step(model, opt, step: int, rank: int, world: int) -> None:
    x, y = batch(step)
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    loss = (model(x[rows]) - y[rows]).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        out[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
    return out


def single_run(root: Path, suffix: str) -> None:
    model = make()
    opt = optimizer(model)
    for step in range(STEPS):
        train_step(model, opt, step, 0, 1)
    torch.save(full_weights(model), root / f"single{suffix}.pt")


def sharded_model() -> tuple[nn.Module, APOLLO]:
    model = make()
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model, optimizer(model)


def main() -> None:
    global BACKEND
    parser = argparse.ArgumentParser()
    parser.add_argument("mode")
    parser.add_argument("dir", type=Path)
    parser.add_argument("--backend", choices=("reference", "triton"), default="reference")
    args = parser.parse_args()
    mode, root, BACKEND = args.mode, args.dir, args.backend
    suffix = "" if BACKEND == "reference" else f"-{BACKEND}"
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if mode == "fsdp-save":
        model, opt = sharded_model()
        for step in range(STEPS):
            train_step(model, opt, step, rank, world)
            if step + 1 == SAVE_AT:
                msd, osd = get_state_dict(model, opt)
                dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(root / "ckpt"))
        weights = full_weights(model)
        if rank == 0:
            torch.save(weights, root / f"fsdp-save-w{world}{suffix}.pt")
            single_run(root, suffix)
    elif mode in ("fsdp-load", "fsdp-load-model"):
        model, opt = sharded_model()
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd} if mode == "fsdp-load" else {"model": msd}
        dcp.load(state, checkpoint_id=str(root / "ckpt"))
        if mode == "fsdp-load":
            set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        else:
            set_model_state_dict(model, state["model"])
        for step in range(SAVE_AT, STEPS):
            train_step(model, opt, step, rank, world)
        weights = full_weights(model)
        if rank == 0:
            torch.save(weights, root / f"{mode}-w{world}{suffix}.pt")
    elif mode == "inbackward":
        from apollo_fast import step_in_backward

        weights, norms = [], []
        for in_backward in (False, True):
            model, opt = sharded_model()
            handle = step_in_backward(model, opt, max_grad_norm=0.5, clip="layer") if in_backward else None
            units = [list(layer.parameters()) for layer in model.layers] + [[model.norm.weight], [model.norm.bias]]
            for step in range(STEPS):
                x, y = batch(step)
                rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
                (model(x[rows]) - y[rows]).square().mean().backward()
                if handle is not None:
                    norms.append(float(handle.finish_step().grad_norm))
                    continue
                for unit in units:  # what clip='layer' does: each unit clipped alone
                    torch.nn.utils.clip_grad_norm_(unit, 0.5)
                opt.step()
                opt.zero_grad(set_to_none=True)
            if handle is not None:
                handle.remove()
            weights.append(full_weights(model))
        diff = max(float((weights[0][k] - weights[1][k]).abs().max()) for k in weights[0])
        if rank == 0:
            (root / f"inbackward-w{world}.json").write_text(json.dumps({"max_diff": diff, "norms": norms}))
    elif mode == "ddp":
        model = nn.parallel.DistributedDataParallel(make())
        opt = optimizer(model.module)
        for step in range(STEPS):
            train_step(model, opt, step, rank, world)
        if rank == 0:
            torch.save(full_weights(model.module), root / f"ddp-w{world}{suffix}.pt")
            single_run(root, suffix)
    else:
        raise SystemExit(f"unknown mode {mode}")
    dist.barrier()
    end_distributed_worker()


if __name__ == "__main__":
    main()
