"""One rank of the sharded-APOLLO checks (run by tests/test_sharded_apollo.py under torchrun: gloo on the CPU,
NCCL on GPUs).

Each case trains the same parameters on every rank: as plain tensors (the single-process run) and as DTensors
sharded over all ranks, with identical gradients, and compares the gathered result with the plain one relative to
the weight change. With --backend triton the sharded Triton step (scratch NaN-poisoned) is compared with the
single-process Triton step ("worst") and with the sharded reference step ("worst_ref"). Rank 0 writes one JSON
line per case to OUT_JSON.

    python -m torch.distributed.run --nproc-per-node N tests/dist_apollo_worker.py CASES OUT_JSON \
        [--backend reference|triton] [--device cpu|cuda]

CASES: 'all' (the backend's cases) or a comma-separated list of names.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
from helpers import end_distributed_worker
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from apollo_fast import APOLLO, NonFiniteGradientError

STEPS = 7
# (shape, shard dim): tall, wide, square, uneven (rows or columns not divisible by 2 or 3), fewer rows than ranks
MATRICES = [((13, 6), 0), ((6, 13), 0), ((13, 6), 1), ((6, 13), 1), ((8, 8), 0), ((7, 11), 1), ((2, 9), 0)]
VECTORS = [((10,), 0), ((5,), 0)]
BASE = dict(lr=2e-2, rank=4, update_proj_gap=3, weight_decay=0.1, betas=(0.8, 0.95))

# the cases of each backend: name -> options (dtype, param group layout, optimizer keywords)
CASES = {
    "reference": {
        "channel": {},
        "mixed": {"layout": "mixed", "kw": {"norm_growth_limit": 1.05}},
        "official": {"kw": {"projection": "official"}},
        "bf16": {"dtype": "bfloat16", "kw": {"param_rounding": "stochastic"}},
        "bf16c": {"dtype": "bfloat16", "kw": {"param_rounding": "compensated"}},
    },
    "triton": {
        "mixed": {"layout": "mixed", "kw": {"norm_growth_limit": 1.05}},
        "official": {"kw": {"projection": "official", "scale_type": "tensor"}},
        "bf16": {"dtype": "bfloat16", "layout": "roundings"},
        "capturable": {"kw": {"capturable": True, "nonfinite": "skip"}},
    },
}


def _init(seed: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*s, generator=g) * 0.5).to(device, dtype) for s, _ in MATRICES + VECTORS]


def _grads(step: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return [(torch.randn(*s, generator=g) * (1.0 + 0.3 * step)).to(device, dtype) for s, _ in MATRICES + VECTORS]


def _groups(params, layout: str):
    """One group; mixed: channel and tensor scaling, a matrix sent to AdamW, and the vectors; roundings: stochastic
    and compensated rounding (16-bit parameters) in different groups, the vectors stochastic."""
    n = len(MATRICES)
    if layout == "mixed":
        return [
            {"params": params[:3]},
            {"params": params[3 : n - 1], "scale_type": "tensor", "rank": 2, "weight_decay": 0.05},
            {"params": params[n - 1 : n], "apollo": False},
            {"params": params[n:], "weight_decay": 0.0},
        ]
    if layout == "roundings":
        return [
            {"params": params[:4], "param_rounding": "stochastic"},
            {"params": params[4:n], "param_rounding": "compensated", "scale_type": "tensor"},
            {"params": params[n:], "param_rounding": "stochastic"},
        ]
    return params


def train(case: dict, mesh, backend: str, sharded: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(initial weights, final full weights) of STEPS steps of `backend`, on DTensors sharded over `mesh` or not."""
    device = torch.device(mesh.device_type, torch.cuda.current_device()) if mesh.device_type == "cuda" else "cpu"
    dtype = getattr(torch, case.get("dtype", "float32"))
    kw = {**BASE, **case.get("kw", {}), "backend": backend}
    if backend == "reference":  # the reference has no device-side mode
        kw.pop("capturable", None)
    elif kw.get("capturable"):
        kw["lr"] = torch.tensor(kw["lr"], device=device)
    init = _init(case.get("seed", 0), dtype, device)
    params = [
        torch.nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(d)]) if sharded else w.clone())
        for w, (_, d) in zip(init, MATRICES + VECTORS, strict=True)
    ]
    opt = APOLLO(_groups(params, case.get("layout", "one")), **kw)
    opt._poison_scratch = backend == "triton"
    for step in range(STEPS):
        for p, g in zip(params, _grads(step, dtype, device), strict=True):
            p.grad = distribute_tensor(g, mesh, p.placements) if isinstance(p, DTensor) else g
        opt.step()
    return init, [(p.full_tensor() if isinstance(p, DTensor) else p).detach() for p in params]


def _worst(init, got, want) -> float:
    """The largest ||got - want|| / ||want - init|| over the parameters."""
    return max(
        float((a.double() - b.double()).norm() / (b.double() - w0.double()).norm())
        for w0, a, b in zip(init, got, want, strict=True)
    )


def run_case(name: str, case: dict, mesh, backend: str) -> dict:
    init, sharded = train(case, mesh, backend, sharded=True)
    reference = train(case, mesh, "reference", sharded=True)[1] if backend == "triton" else None
    out = {"case": name, "backend": backend}
    if dist.get_rank() != 0:  # only rank 0 reports: the others need not repeat the single-process run
        return out
    _, single = train(case, mesh, backend, sharded=False)
    out["worst"] = _worst(init, sharded, single)
    if backend == "triton":
        out["worst_ref"] = _worst(init, sharded, reference)
        if case.get("dtype") == "bfloat16":  # elements whose bits differ from one process's
            differ = sum(int((a != b).sum()) for a, b in zip(sharded, single, strict=True))
            out["differ"] = differ / sum(a.numel() for a in single)
    return out


def nonfinite_case(mesh, backend: str) -> dict:
    """A NaN in one rank's shard only: every rank takes the same decision (raise naming the parameter; skip; with
    the Triton backend also capturable skip, decided on the device)."""
    device = torch.device(mesh.device_type, torch.cuda.current_device()) if mesh.device_type == "cuda" else "cpu"
    out = {"case": "nonfinite", "backend": backend}
    policies = {"raise": {"nonfinite": "raise"}, "skip": {"nonfinite": "skip"}}
    if backend == "triton":
        policies["capturable"] = {"nonfinite": "skip", "capturable": True}
    for policy, kw in policies.items():
        w = torch.randn(13, 6, generator=torch.Generator().manual_seed(3)).to(device)
        p = torch.nn.Parameter(distribute_tensor(w, mesh, [Shard(0)]))
        q = torch.nn.Parameter(distribute_tensor(w[:, :5].t().contiguous(), mesh, [Shard(0)]))  # compressed side
        opt = APOLLO([{"params": [p, q], "param_names": ["layer.weight", "other.weight"]}], lr=1e-2, rank=2,
                     backend=backend, **kw)  # fmt: skip
        opt._poison_scratch = backend == "triton"
        g = torch.randn(13, 6).to(device)
        g[12, 0] = float("nan")  # row 12 lives on the last rank only
        p.grad = distribute_tensor(g, mesh, [Shard(0)])
        q.grad = distribute_tensor(torch.ones(5, 13, device=device), mesh, [Shard(0)])
        before = [x.full_tensor().clone() for x in (p, q)]
        try:
            opt.step()
            skipped = opt.skipped_steps + sum(int(s) for s in opt.skipped_steps_device.values())
            out[policy] = f"skipped={skipped}"
        except NonFiniteGradientError as err:
            out[policy] = "raised" + (" naming layer.weight" if "layer.weight" in str(err) else "")
        same = all(torch.equal(b, x.full_tensor()) for b, x in zip(before, (p, q), strict=True))
        out[policy] += ", unchanged" if same else ", CHANGED"
    decisions = [None] * dist.get_world_size()
    dist.all_gather_object(decisions, out)
    out["agree"] = all(d == decisions[0] for d in decisions)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("cases")
    parser.add_argument("out")
    parser.add_argument("--backend", choices=("reference", "triton"), default="reference")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    mesh = init_device_mesh(args.device, (dist.get_world_size(),))
    cases = CASES[args.backend]
    names = [*cases, "nonfinite"] if args.cases == "all" else args.cases.split(",")
    results = [
        nonfinite_case(mesh, args.backend) if n == "nonfinite" else run_case(n, cases[n], mesh, args.backend)
        for n in names
    ]
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            for r in results:
                f.write(json.dumps({**r, "world": dist.get_world_size()}) + "\n")
    end_distributed_worker()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
