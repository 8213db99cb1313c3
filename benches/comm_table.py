"""What APOLLO communicates per step on FSDP2-sharded Qwen3.5-27B, next to FSDP2's own gradient reduce-scatter:
the README's table.

FSDP2 (fully_shard) shards every parameter along dim 0 (Shard(0)): rows, the output features of nn.Linear. A tall
matrix (m >= n) is then sharded along its channel side and APOLLO only all-reduces 3 floats per matrix (the
limiter's and tensor scaling's norms); a wide one along its compressed side, and APOLLO reduce-scatters its
[R | ||G_k||^2] (C rows of r + 1 floats) and all-gathers its channel scales (C floats) (apollo_fast.optim.sharded).
Bytes are what each rank SENDS per optimizer step with ring algorithms: (N - 1) of the N rank blocks for a
reduce-scatter or an all-gather, twice that for an all-reduce; buffers are laid out as the Triton backend lays them
out (optim/fused.py: ceil(C / N) channels per rank block). FSDP2's gradient reduce-scatter: bf16 gradients (the
parameters' dtype), dim 0 padded to a multiple of N. Shapes: transformers' Qwen3_5ForCausalLM on the meta device
with the 27B's config values (benches/memory_table.py), APOLLO for apollo_param_groups' matrices.

    python benches/comm_table.py [--rank 256] [--worlds 8 64]   # prints the markdown; writes comm_table.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import Counter
from pathlib import Path

import torch
from memory_table import QWEN35_27B, qwen35_on_meta

from apollo_fast import apollo_param_groups
from apollo_fast.optim.placement import ShardSpec
from apollo_fast.reference.projection import effective_rank

MIB = 2**20


def channel_sharded(shape: tuple[int, ...], world: int) -> bool:
    """FSDP2's Shard(0) of this matrix lies along its channel side (the rule of optim/sharded.py)."""
    return ShardSpec(None, None, world, 0, 0, 0, 0, torch.Size(shape)).channel_sharded


def apollo_buffers(shape: tuple[int, int], rank: int, world: int, channel_scaling: bool = True) -> dict[str, int]:
    """fp32 elements one Shard(0) APOLLO matrix adds to each collective's buffer (the whole buffer: N rank blocks
    for the reduce-scatter's input and the all-gather's output)."""
    r = effective_rank(rank, shape, "philox")
    out = {"reduce_scatter": 0, "all_reduce": 3, "all_gather": 0}
    if not channel_sharded(shape, world):
        piece = -(-max(shape) // world)  # channels per rank block
        out["reduce_scatter"] = world * piece * (r + 1)
        out["all_gather"] = world * piece if channel_scaling else 0
    return out


def apollo_bytes(shape: tuple[int, int], rank: int, world: int, channel_scaling: bool = True) -> dict[str, int]:
    """Bytes one rank sends per step for one Shard(0) APOLLO matrix (ring algorithms)."""
    buf = apollo_buffers(shape, rank, world, channel_scaling)
    return {k: 4 * v * (world - 1) * (2 if k == "all_reduce" else 1) // world for k, v in buf.items()}


def fsdp_grad_bytes(shape: tuple[int, ...], world: int, grad_bytes: int = 2) -> int:
    """Bytes one rank sends in FSDP2's reduce-scatter of this parameter's gradient (dim 0 padded to N rows)."""
    inner = 1
    for s in shape[1:]:
        inner *= s
    return (world - 1) * -(-shape[0] // world) * inner * grad_bytes


def comm_rows(model, rank: int, worlds: tuple[int, ...]) -> dict:
    """Per kind of matrix (name with the layer index dropped, shape): count and bytes per world size; totals."""
    groups = apollo_param_groups(model)
    kinds: Counter = Counter()
    others = []
    for g in groups:
        for name, p in g["params"]:
            if g.get("apollo", True) and p.dim() == 2:
                kinds[(re.sub(r"\.\d+\.", ".N.", name).removeprefix("model."), tuple(p.shape))] += 1
            else:
                others.append(tuple(p.shape))
    rows = []
    for (name, shape), count in kinds.items():
        row = {"name": name, "shape": shape, "count": count, "rank": effective_rank(rank, shape, "philox")}
        for n in worlds:
            row[f"channel_side_{n}"] = channel_sharded(shape, n)
            row[f"apollo_{n}"] = apollo_bytes(shape, rank, n)
            row[f"fsdp_{n}"] = fsdp_grad_bytes(shape, n)
        rows.append(row)
    totals = {}
    for n in worlds:
        totals[f"apollo_{n}"] = sum(r["count"] * sum(r[f"apollo_{n}"].values()) for r in rows)
        totals[f"fsdp_matrices_{n}"] = sum(r["count"] * r[f"fsdp_{n}"] for r in rows)
        totals[f"fsdp_all_{n}"] = totals[f"fsdp_matrices_{n}"] + sum(fsdp_grad_bytes(s, n) for s in others)
    return {"rows": rows, "totals": totals}


def _size(b: float) -> str:
    return f"{b / MIB:.2f} MiB" if b >= 0.01 * MIB else f"{b:.0f} B"


def table(data: dict, worlds: tuple[int, ...]) -> str:
    """The README's markdown table: per matrix, what one rank sends per step, APOLLO next to FSDP2."""
    head = "| matrix (count) | m x n | Shard(0) along | APOLLO's collectives |"
    head += "".join(f" APOLLO, N={n} | FSDP2 grads, N={n} |" for n in worlds)
    out = [head, "| --- | --- | --- | --- |" + " ---: | ---: |" * len(worlds)]
    for r in sorted(data["rows"], key=lambda r: (r[f"channel_side_{worlds[0]}"], r["name"])):
        side = r[f"channel_side_{worlds[0]}"]
        what = "all-reduce 3 floats" if side else f"reduce-scatter C x {r['rank'] + 1}, all-gather C"
        cells = "".join(
            f" {_size(sum(r[f'apollo_{n}'].values()))} | {_size(r[f'fsdp_{n}'])} |" for n in worlds
        )  # fmt: skip
        m, n_ = r["shape"]
        out.append(f"| {r['name']} ({r['count']}) | {m} x {n_} | {'channels' if side else 'compressed side'} | "
                   f"{what} |{cells}")  # fmt: skip
    t = data["totals"]
    cells = "".join(f" **{_size(t[f'apollo_{n}'])}** | **{_size(t[f'fsdp_all_{n}'])}** |" for n in worlds)
    out.append(f"| whole model, per step | | | |{cells}")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=256, help="APOLLO's rank r")
    ap.add_argument("--worlds", type=int, nargs="+", default=[8, 64], help="world sizes N")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for comm_table.{json,md}")
    args = ap.parse_args()
    worlds = tuple(args.worlds)
    data = comm_rows(qwen35_on_meta(**QWEN35_27B), args.rank, worlds)
    md = table(data, worlds)
    for n in worlds:
        t = data["totals"]
        md += (f"\n\nN={n}: APOLLO sends {100 * t[f'apollo_{n}'] / t[f'fsdp_all_{n}']:.1f}% of FSDP2's gradient "
               f"reduce-scatter ({100 * t[f'apollo_{n}'] / t[f'fsdp_matrices_{n}']:.1f}% of the APOLLO matrices' "
               "share of it).")  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comm_table.json").write_text(
        json.dumps({"config": QWEN35_27B, "rank": args.rank, "worlds": worlds, **data}, indent=2) + "\n"
    )
    (out / "comm_table.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
