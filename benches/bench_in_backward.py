"""Peak memory of one frozen-context segment step with and without step in backward (CPU or GPU).

A Qwen3.5-shaped random model (fp32 on the CPU, bf16 on a GPU), APOLLO on apollo_param_groups, one segment
batch against an encoded context. Each mode runs in a fresh process, takes one step to create the optimizer
state, then measures the second:

  CPU  peak resident memory (VmHWM after resetting it; glibc's mmap threshold is fixed at 64 KiB so every
       tensor is its own mapping, returned on free) and the peak of the PyTorch memory profiler's timeline
       (all live tensors, and the gradients alone), each relative to the memory held before the step
  GPU  torch.cuda.max_memory_allocated over the step, relative to memory_allocated before it, and the step time

The difference between the modes should be the gradients' size minus the one unit step in backward holds.

    python benches/bench_in_backward.py                      # CPU, ~30 s; prints a markdown table
    python benches/bench_in_backward.py --device cuda --hidden 2048 --layers 16 --context 8192 --segment 512
Writes bench_in_backward.json to $OUT (or --out).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def build(args: argparse.Namespace, device: torch.device):
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    torch.manual_seed(0)
    cfg = Qwen3_5TextConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 128, num_key_value_heads=2, head_dim=128,
        linear_num_key_heads=args.hidden // 256, linear_num_value_heads=args.hidden // 128,
        linear_key_head_dim=128, linear_value_head_dim=128, max_position_embeddings=args.context + args.segment,
    )  # fmt: skip
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return Qwen3_5ForCausalLM(cfg).to(device, dtype).train()


def child(args: argparse.Namespace) -> dict:
    """One mode in this process: warm-up step, then the measured step."""
    from apollo_fast import APOLLO, apollo_param_groups, encode_context, segment_loss
    from apollo_fast.optim.in_backward import model_units, step_in_backward

    device = torch.device(args.device)
    model = build(args, device)
    opt = APOLLO(apollo_param_groups(model), lr=1e-4, rank=args.rank)
    handle = step_in_backward(model, opt) if args.mode == "in_backward" else None
    g = torch.Generator().manual_seed(1)
    ctx = encode_context(model, torch.randint(0, args.vocab, (1, args.context), generator=g).to(device))
    segs = [torch.randint(0, args.vocab, (args.batch, args.segment), generator=g).to(device) for _ in range(2)]

    def step(ids: torch.Tensor) -> None:
        segment_loss(model, ctx, ids).backward()
        if handle is not None:
            handle.finish_step()
        else:
            opt.step()
            opt.zero_grad(set_to_none=True)

    step(segs[0])  # the optimizer state now exists
    gc.collect()
    params = [p for p in model.parameters() if p.requires_grad]
    out = {
        "mode": args.mode,
        "params": sum(p.numel() for p in params),
        "grad_bytes": sum(p.nbytes for p in params),
        "largest_unit_bytes": max(sum(p.nbytes for p in ps) for _, ps in model_units(model, params)),
    }
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        step(segs[1])
        torch.cuda.synchronize()
        out["seconds"] = time.perf_counter() - t0
        out["peak_alloc_bytes"] = torch.cuda.max_memory_allocated() - base
        return out
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import _CATEGORY_TO_INDEX, Category, MemoryProfileTimeline

    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    rss0 = _status_kib("VmRSS")
    t0 = time.perf_counter()
    step(segs[1])
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_bytes"] = (_status_kib("VmHWM") - rss0) * 1024
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step(segs[0])
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    grad_col = _CATEGORY_TO_INDEX[Category.GRADIENT] + 1
    out["profiler_peak_bytes"] = max(sum(s) for s in sizes) - sum(sizes[0])
    out["profiler_peak_grad_bytes"] = max(s[grad_col] for s in sizes)
    at = max(range(len(sizes)), key=lambda i: sum(sizes[i]))  # what the peak is made of, by profiler category
    names = ["?"] + [getattr(c, "name", "UNKNOWN").lower() for c in _CATEGORY_TO_INDEX]
    out["profiler_at_peak_bytes"] = {n: a - b for n, a, b in zip(names, sizes[at], sizes[0], strict=True) if a != b}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--segment", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--mode", choices=("normal", "in_backward"), help=argparse.SUPPRESS)  # child process
    args = ap.parse_args()
    if args.mode is not None:
        print(json.dumps(child(args)))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    rows = []
    for mode in ("normal", "in_backward"):
        proc = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--mode", mode],
            env=env, capture_output=True, text=True, timeout=1800,
        )  # fmt: skip
        if proc.returncode != 0:
            sys.exit(f"{mode} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    import transformers

    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    if args.device == "cuda":
        machine += f", {torch.cuda.get_device_name()}"
    meta = {
        "date": datetime.date.today().isoformat(),
        "machine": machine,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "args": {k: v for k, v in vars(args).items() if k not in ("mode", "out")},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_in_backward.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    mib = lambda x: f"{x / 2**20:.1f}"  # noqa: E731
    keys = [
        k
        for k in ("peak_rss_bytes", "profiler_peak_bytes", "profiler_peak_grad_bytes", "peak_alloc_bytes")
        if k in rows[0]
    ]
    print(json.dumps(meta))
    print(f"\nparams {rows[0]['params']:,}; gradients {mib(rows[0]['grad_bytes'])} MiB; "
          f"largest unit {mib(rows[0]['largest_unit_bytes'])} MiB\n")  # fmt: skip
    print("| mode | " + " | ".join(k.removesuffix("_bytes") + " (MiB)" for k in keys) + " | step (s) |")
    print("| --- |" + " ---: |" * (len(keys) + 1))
    for r in rows:
        print(f"| {r['mode']} | " + " | ".join(mib(r[k]) for k in keys) + f" | {r['seconds']:.2f} |")
    diff = " | ".join(mib(rows[0][k] - rows[1][k]) for k in keys)
    print(f"| difference | {diff} | |")


if __name__ == "__main__":
    main()
