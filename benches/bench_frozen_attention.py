"""Attention after a frozen context, one layer: the Triton kernels vs concat + SDPA (and the plain-PyTorch path).

Methods, per context length Lc (bf16, B segments of T tokens, H query / Hkv KV heads of D; one context shared by
the B rows unless --per-row-context):
  triton        apollo_fast.frozen.attention.attend_after_context(backend="triton"): the context read in place
  concat+sdpa   the former implementation (reference.frozen_context.attend_after_context_ref): the context
                expanded and concatenated per row, SDPA with a boolean mask
  reference     attend_after_context(backend="reference"): exact fp32 PyTorch, no per-row context copy, fp32 scores
Reports the median forward and forward+backward time over --iters (CUDA events, after --warmup) and the peak
memory allocated during one forward+backward beyond its inputs (q, k, v, the upstream gradient and the context).
Prints a table last; writes JSON to $OUT/bench_frozen_attention.json (or --out-dir). Needs a CUDA GPU.

    python benches/bench_frozen_attention.py                      # Lc 2k/8k/32k, B=8, T=128, H=8, Hkv=2, D=256
    python benches/bench_frozen_attention.py --head-dim 128 --methods triton concat+sdpa
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile

import torch

# apollo_fast must be the installed package (see bench_frozen_context.py: apollo_fast.kernels only exists there).
from apollo_fast.frozen.attention import attend_after_context
from apollo_fast.reference.frozen_context import attend_after_context_ref

MIB = 2**20
METHODS = {
    "triton": lambda *a: attend_after_context(*a, backend="triton"),
    "concat+sdpa": attend_after_context_ref,
    "reference": lambda *a: attend_after_context(*a, backend="reference"),
}


def _median_ms(fn, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_one(method: str, lc: int, args) -> dict:
    fn = METHODS[method]
    B, T, H, Hkv, D = args.batch, args.segment, args.heads, args.kv_heads, args.head_dim
    dev, dt = torch.device("cuda"), torch.bfloat16
    row = {"method": method, "context": lc}
    try:
        q, k, v = (torch.randn(B, h, T, D, device=dev, dtype=dt, requires_grad=True) for h in (H, Hkv, Hkv))
        bc = B if args.per_row_context else 1
        ctx_k, ctx_v = (torch.randn(bc, Hkv, lc, D, device=dev, dtype=dt) for _ in range(2))
        do = torch.randn(B, H, T, D, device=dev, dtype=dt)
        scale = D**-0.5

        def forward():
            with torch.no_grad():
                fn(q, k, v, ctx_k, ctx_v, scale)

        def step():
            fn(q, k, v, ctx_k, ctx_v, scale).backward(do)
            q.grad = k.grad = v.grad = None

        step()  # compile / warm the allocator before measuring memory
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        row["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / MIB
        row["fwd_ms"] = _median_ms(forward, args.iters, args.warmup)
        row["fwd_bwd_ms"] = _median_ms(step, args.iters, args.warmup)
    except torch.cuda.OutOfMemoryError:
        row["error"] = "OOM"
    finally:
        q = k = v = ctx_k = ctx_v = do = None
        torch.cuda.empty_cache()
    return row


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


def table(rows: list[dict]) -> str:
    lines = ["| context | method | fwd ms | fwd+bwd ms | peak extra MiB |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['context']} | {r['method']} | {r['error']} | | |")
        else:
            lines.append(
                f"| {r['context']} | {r['method']} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | "
                f"{r['peak_extra_mib']:.0f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192, 32768])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--segment", type=int, default=128)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=256)
    p.add_argument("--per-row-context", action="store_true", help="a context per batch row instead of one shared")
    p.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(METHODS))
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out-dir", default=os.environ.get("OUT", "bench_out"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_frozen_attention: needs a CUDA GPU (the Triton kernels do not run on the CPU); nothing measured")
        return 0
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "dtype": "bfloat16",
        **{k: getattr(args, k) for k in ("batch", "segment", "heads", "kv_heads", "head_dim", "per_row_context")},
    }
    print(f"# {json.dumps(meta)}", flush=True)
    rows = []
    for lc in args.contexts:
        for method in args.methods:
            rows.append(bench_one(method, lc, args))
            print(json.dumps(rows[-1]), flush=True)
            write_json(os.path.join(args.out_dir, "bench_frozen_attention.json"), {"meta": meta, "rows": rows})
    shape = f"B={args.batch} T={args.segment} H={args.heads} Hkv={args.kv_heads} D={args.head_dim}"
    print(f"\nAttention after a frozen context, one layer ({meta['device']}, bf16, {shape}); medians\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
