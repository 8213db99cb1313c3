"""One rank of the sharded-APOLLO checks (run by tests/test_sharded_apollo.py under torchrun, gloo on the CPU).

Each case trains the same parameters twice on every rank: as plain tensors (the single-process run) and as
DTensors sharded over all ranks, with identical gradients, and compares the gathered result with the plain one
relative to the weight change. Rank 0 writes one JSON line per case to the file named by argv[2].

    python -m torch.distributed.run --nproc-per-node N tests/dist_apollo_worker.py CASE OUT_JSON [TMP_DIR]
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from apollo_fast import APOLLO

STEPS = 7
# (shape, shard dim): tall, wide, square, uneven (rows or columns not divisible by 2 or 3), fewer rows than ranks
MATRICES = [((13, 6), 0), ((6, 13), 0), ((13, 6), 1), ((6, 13), 1), ((8, 8), 0), ((7, 11), 1), ((2, 9), 0)]
VECTORS = [((10,), 0), ((5,), 0)]


def _init(seed: int, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*s, generator=g) * 0.5).to(dtype) for s, _ in MATRICES + VECTORS]


def _grads(step: int, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return [(torch.randn(*s, generator=g) * (1.0 + 0.3 * step)).to(dtype) for s, _ in MATRICES + VECTORS]


def _groups(params, mixed: bool):
    """One group, or mixed: channel and tensor scaling, a matrix sent to AdamW, and the vectors."""
    if not mixed:
        return params
    n = len(MATRICES)
    return [
        {"params": params[:3]},
        {"params": params[3 : n - 1], "scale_type": "tensor", "rank": 2, "weight_decay": 0.05},
        {"params": params[n - 1 : n], "apollo": False},
        {"params": params[n:], "weight_decay": 0.0},
    ]


def run_case(case: dict, mesh) -> dict:
    dtype = getattr(torch, case.get("dtype", "float32"))
    kw = dict(lr=2e-2, rank=4, update_proj_gap=3, weight_decay=0.1, betas=(0.8, 0.95), backend="reference")
    kw.update(case.get("kw", {}))
    init = _init(case.get("seed", 0), dtype)
    plain = [torch.nn.Parameter(w.clone()) for w in init]
    sharded = [
        torch.nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(d)]))
        for w, (_, d) in zip(init, MATRICES + VECTORS, strict=True)
    ]
    opts = [APOLLO(_groups(ps, case.get("mixed", False)), **kw) for ps in (plain, sharded)]
    for step in range(STEPS):
        for ps in (plain, sharded):
            for p, g in zip(ps, _grads(step, dtype), strict=True):
                p.grad = g.clone() if not isinstance(p, DTensor) else distribute_tensor(g, mesh, p.placements)
        for opt in opts:
            opt.step()
    worst = 0.0
    for w0, a, b in zip(init, plain, sharded, strict=True):
        full = b.full_tensor()
        change = (a.detach().double() - w0.double()).norm()
        err = (full.detach().double() - a.detach().double()).norm() / change
        worst = max(worst, float(err))
    return {"case": case["name"], "worst": worst}


def nonfinite_case(mesh) -> dict:
    """A NaN in one rank's shard only: every rank takes the same decision (raise naming the parameter; skip)."""
    from apollo_fast import NonFiniteGradientError

    out = {"case": "nonfinite"}
    for policy in ("raise", "skip"):
        w = torch.randn(13, 6, generator=torch.Generator().manual_seed(3))
        p = torch.nn.Parameter(distribute_tensor(w, mesh, [Shard(0)]))
        opt = APOLLO([{"params": [p], "param_names": ["layer.weight"]}], lr=1e-2, rank=2, nonfinite=policy)
        g = torch.randn(13, 6)
        g[12, 0] = float("nan")  # row 12 lives on the last rank only
        p.grad = distribute_tensor(g, mesh, [Shard(0)])
        before = p.full_tensor().clone()
        try:
            opt.step()
            out[policy] = f"skipped={opt.skipped_steps}"
        except NonFiniteGradientError as err:
            out[policy] = "raised" + (" naming layer.weight" if "layer.weight" in str(err) else "")
        out[policy] += ", unchanged" if torch.equal(before, p.full_tensor()) else ", CHANGED"
    decisions = [None] * dist.get_world_size()
    dist.all_gather_object(decisions, out)
    out["agree"] = all(d == decisions[0] for d in decisions)
    return out


def main() -> None:
    case_name, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    cases = {
        "channel": {"name": "channel"},
        "mixed": {"name": "mixed", "mixed": True, "kw": {"norm_growth_limit": 1.05}},
        "official": {"name": "official", "kw": {"projection": "official"}},
        "bf16": {"name": "bf16", "dtype": "bfloat16", "kw": {"param_rounding": "stochastic"}},
        "bf16c": {"name": "bf16c", "dtype": "bfloat16", "kw": {"param_rounding": "compensated"}},
    }
    names = [*cases, "nonfinite"] if case_name == "all" else case_name.split(",")
    results = [nonfinite_case(mesh) if n == "nonfinite" else run_case(cases[n], mesh) for n in names]
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            for r in results:
                f.write(json.dumps({**r, "world": dist.get_world_size()}) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
