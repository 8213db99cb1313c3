"""The APOLLO comparison table, in one process on one card: our triton and reference backends, torch
AdamW (fused=True, foreach=True) and apollo-torch 1.0.3, on the "1B" shape set and one Qwen3.5-27B GDN
layer's matrices, fp32 and bf16. Checks triton against the reference first. Writes apollo_table.json
and apollo_table.md to $OUT (or --out) and prints the table last.

GPU:  PYTHONPATH=<dir holding apollo_torch> python benches/apollo_table.py
CPU:  python benches/apollo_table.py --toy     (tiny shapes under TRITON_INTERPRET=1: proves it runs)
apollo-torch is loaded as ../shared/tools/anchor_bench.py loads it: its three optimizer files are copied
from the installed package folder into a temporary package, so bitsandbytes is not needed.
"""

from __future__ import annotations

import os
import sys

if "--toy" in sys.argv:  # must precede the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import torch  # noqa: E402

from apollo_fast import APOLLO  # noqa: E402

# Qwen3.5-27B GDN layer (hidden 5120, 16 key / 48 value heads of 128, MLP 17408), read off
# transformers' Qwen3_5ForCausalLM built on the meta device: the 2-D weights of one linear-attention layer.
GDN_27B = [
    (10240, 5120), (6144, 5120), (48, 5120), (48, 5120), (5120, 6144), (17408, 5120), (17408, 5120), (5120, 17408),
]  # fmt: skip


def shapes_1b(layers: int = 24, d: int = 2048, f: int = 5632) -> list[tuple[int, int]]:
    """The anchors' "1B" set: layers x (4 x [d x d] + 2 x [f x d] + [d x f])."""
    return [s for _ in range(layers) for s in [(d, d)] * 4 + [(f, d), (f, d), (d, f)]]


def shape_sets(toy: bool) -> dict[str, list[tuple[int, int]]]:
    if toy:
        return {"1B(toy)": shapes_1b(2, 32, 88), "gdn27b(toy)": [(m // 64 or 1, n // 64) for m, n in GDN_27B]}
    return {"1B": shapes_1b(), "qwen3.5-27B GDN layer": GDN_27B}


# -- timing ---------------------------------------------------------------------------------------


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], dev: torch.device, iters: int, warm: int) -> list[float]:
    """Per-call times in ms: CUDA events on a GPU, perf_counter on the CPU."""
    for _ in range(warm):
        fn()
    _sync(dev)
    out = []
    for _ in range(iters):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            out.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def summary(ts: list[float]) -> dict[str, float]:
    s = sorted(ts)
    return {"median_ms": statistics.median(s), "min_ms": s[0], "max_ms": s[-1]}


def copy_bandwidth(dev: torch.device, toy: bool) -> float:
    """Device-to-device copy, GB/s (read + write)."""
    n = (1 << 20) if toy else (2 * 1024**3 // 4)
    x = torch.empty(n, device=dev)
    y = torch.empty_like(x)
    ms = statistics.median(time_ms(lambda: y.copy_(x), dev, 5 if toy else 10, 2))
    return 2 * n * 4 / ms / 1e6


# -- what is timed --------------------------------------------------------------------------------


def make_params(shapes, dtype, dev, seed=0) -> list[torch.nn.Parameter]:
    g = torch.Generator(device=dev).manual_seed(seed)
    ps = []
    for m, n in shapes:
        p = torch.nn.Parameter(torch.randn(m, n, device=dev, dtype=dtype, generator=g) * 0.02)
        p.grad = torch.randn(m, n, device=dev, dtype=dtype, generator=g) * 1e-3
        ps.append(p)
    return ps


def state_mb(opt: torch.optim.Optimizer) -> float:
    total = 0
    for s in opt.state.values():
        for v in s.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
        proj = s.get("projector")  # apollo-torch keeps P in a projector object
        if proj is not None and getattr(proj, "ortho_matrix", None) is not None:
            total += proj.ortho_matrix.numel() * proj.ortho_matrix.element_size()
    return total / 1e6


def load_official():
    """apollo-torch's AdamW (APOLLO) class, loaded from its installed files only."""
    base = next((b for b in sys.path if os.path.isdir(os.path.join(b, "apollo_torch"))), None)
    if base is None:
        return None
    tmp = tempfile.mkdtemp()
    os.makedirs(os.path.join(tmp, "apollo_ref"))
    for f in ("apollo.py", "random_projector.py", "svd_projector.py"):
        shutil.copy(os.path.join(base, "apollo_torch", f), os.path.join(tmp, "apollo_ref"))
    open(os.path.join(tmp, "apollo_ref", "__init__.py"), "w").close()
    sys.path.insert(0, tmp)
    from apollo_ref.apollo import AdamW

    return AdamW


def build(impl: str, ps, gap: int, official_cls):
    """An optimizer over ps for one row of the table."""
    if impl == "adamw fused":
        return torch.optim.AdamW(ps, lr=1e-4, fused=True)
    if impl == "adamw foreach":
        return torch.optim.AdamW(ps, lr=1e-4, foreach=True)
    if impl.startswith("apollo-torch"):
        mini = "mini" in impl
        group = dict(params=ps, rank=1 if mini else 256, proj="random", scale_type="tensor" if mini else "channel",
                     scale=128 if mini else 1, update_proj_gap=gap, proj_type="std")  # fmt: skip
        return official_cls([group], lr=1e-4)
    backend = "reference" if impl.startswith("ours reference") else "triton"
    kw = dict(lr=1e-4, update_proj_gap=gap, backend=backend, weight_decay=0.0)
    if "graph" in impl:
        kw.update(lr=torch.tensor(1e-4, device=ps[0].device), capturable=True, nonfinite="skip")
    if "mini" in impl:
        return APOLLO.mini(ps, **kw)
    if "bf16 moments" in impl:
        kw["state_dtype"] = torch.bfloat16
    return APOLLO(ps, rank=256, **kw)


def stepper(impl: str, opt: torch.optim.Optimizer, dev: torch.device) -> Callable[[], object]:
    """opt.step, or for the 'graph' rows the replay of a CUDA graph of one capturable step."""
    if "graph" not in impl:
        return opt.step
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    return graph.replay


def bench_row(impl, shapes, dtype, dev, args, official_cls) -> dict:
    """Median step time (gap 200), the refresh step (gap 1: every step redraws P), first step, state."""
    row = {"impl": impl}
    for gap in (200, 1):
        if gap == 1 and impl.startswith("adamw"):
            continue
        ps = make_params(shapes, dtype, dev)
        opt = build(impl, ps, gap, official_cls)
        _sync(dev)
        t0 = time.perf_counter()
        opt.step()
        _sync(dev)
        if gap == 200:
            row["first_step_ms"] = (time.perf_counter() - t0) * 1e3
        iters = args.iters if not impl.startswith(("ours reference", "apollo-torch")) else max(3, args.iters // 2)
        ts = time_ms(stepper(impl, opt, dev), dev, iters, args.warmup)
        if gap == 200:
            row.update(summary(ts))
            row["state_MB"] = state_mb(opt)
        else:
            row["refresh_median_ms"] = statistics.median(ts)
        del opt, ps
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return row


def check_backends(dev: torch.device) -> dict[str, str]:
    """Triton vs reference after 3 steps on a few odd shapes.

    fp32: max relative error of the update W_3 - W_0. bf16: the final weights, as the largest
    difference in bf16 ulps and the share of elements that differ (rounding of nearly equal fp32 values).
    """
    shapes = [(97, 33), (40, 130), (1, 77), (256, 64)]
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        finals = {}
        for backend in ("reference", "triton"):
            ps = make_params(shapes, dtype, dev, seed=3)
            w0 = [p.detach().float().clone() for p in ps]
            opt = APOLLO(ps, lr=1e-2, rank=16, update_proj_gap=2, weight_decay=0.1, backend=backend)
            for t in range(3):
                torch.manual_seed(100 + t)
                for p in ps:
                    p.grad = torch.randn_like(p) * (1 + t)
                opt.step()
            finals[backend] = [(p.detach().float(), w) for p, w in zip(ps, w0, strict=True)]
        if dtype == torch.float32:
            errs = [
                ((a - w) - (b - w)).norm().item() / (a - w).norm().clamp_min(1e-30).item()
                for (a, w), (b, _) in zip(finals["reference"], finals["triton"], strict=True)
            ]
            out["float32"] = f"rel {max(errs):.1e}"
        else:
            ulps, differ, total = 0.0, 0, 0
            for (a, _), (b, _) in zip(finals["reference"], finals["triton"], strict=True):
                ulp = torch.exp2(torch.floor(torch.log2(a.abs().clamp_min(1e-30))) - 7)
                ulps = max(ulps, ((a - b).abs() / ulp).max().item())
                differ += int((a != b).sum())
                total += a.numel()
            out["bfloat16"] = f"max {ulps:.0f} ulp, {100.0 * differ / total:.2f}% differ"
    return out


# -- main -----------------------------------------------------------------------------------------


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"# APOLLO step: {meta['device']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date']}",
        "",
        f"copy bandwidth {meta['copy_GBps']:.0f} GB/s; minimal bytes 12 B/elem (fp32), 6 B/elem (bf16); "
        f"triton vs reference after 3 steps: {meta['check']}",
        "",
        "| set | dtype | impl | median ms | min..max | GB/s (min bytes) | % copy | refresh ms | first ms (incl. JIT)"
        " | state MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "error" in r:  # a row that failed is reported, not dropped
            lines.append(f"| {r['set']} | {r['dtype']} | {r['impl']} | failed: {r['error'][:80]} |||||||")
            continue
        refresh = f"{r['refresh_median_ms']:.2f}" if "refresh_median_ms" in r else "-"
        lines.append(
            f"| {r['set']} | {r['dtype']} | {r['impl']} | {r['median_ms']:.2f} | {r['min_ms']:.2f}..{r['max_ms']:.2f}"
            f" | {r['GBps']:.0f} | {r['pct_copy']:.0f}% | {refresh} | {r['first_step_ms']:.1f} | {r['state_MB']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--toy", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for apollo_table.json/.md")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma-separated impl names to leave out")
    args = ap.parse_args(argv)
    if args.toy:
        args.iters, args.warmup = min(args.iters, 2), min(args.warmup, 1)
    dev = torch.device("cpu" if args.toy else "cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --toy on the CPU")
    import triton

    meta = {
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "CPU (TRITON_INTERPRET=1, toy shapes)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "copy_GBps": copy_bandwidth(dev, args.toy),
    }
    meta["check"] = check_backends(dev)
    if args.toy:  # Triton's interpreter truncates fp32 -> bf16 (a GPU rounds to nearest even)
        meta["check"]["bfloat16"] += " (interpreter truncates fp32->bf16)"
    print("triton vs reference (max rel. error of the 3-step update):", meta["check"], flush=True)
    official_cls = load_official()
    impls = [
        "ours triton", "ours triton bf16 moments", "ours triton graph", "ours triton mini", "ours reference",
        "adamw fused", "adamw foreach", "apollo-torch", "apollo-torch mini",
    ]  # fmt: skip
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if official_cls is None:
        print("apollo-torch not found on sys.path: its rows are left out", flush=True)
        skip |= {"apollo-torch", "apollo-torch mini"}
    rows = []
    for set_name, shapes in shape_sets(args.toy).items():
        numel = sum(m * n for m, n in shapes)
        for dtype in (torch.float32, torch.bfloat16):
            tag = str(dtype).split(".")[-1]
            min_bytes = numel * (12 if dtype == torch.float32 else 6)
            for impl in impls:
                if impl in skip or (impl == "adamw fused" and dev.type == "cpu" and dtype == torch.bfloat16):
                    continue
                if "graph" in impl and dev.type != "cuda":
                    continue
                try:  # one failing row (e.g. out of memory) must not lose the others
                    row = bench_row(impl, shapes, dtype, dev, args, official_cls)
                except Exception as err:  # noqa: BLE001 - recorded in the table
                    rows.append(dict(impl=impl, set=set_name, dtype=tag, numel=numel, error=repr(err)))
                    print(f"{set_name} {tag} {impl}: FAILED {err!r}", flush=True)
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                row.update(set=set_name, dtype=tag, numel=numel)
                row["GBps"] = min_bytes / row["median_ms"] / 1e6
                row["pct_copy"] = 100.0 * row["GBps"] / meta["copy_GBps"]
                rows.append(row)
                print(f"{set_name} {tag} {impl}: {row['median_ms']:.2f} ms", flush=True)
    os.makedirs(args.out, exist_ok=True)
    write_atomic(os.path.join(args.out, "apollo_table.json"), json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = markdown(meta, rows)
    write_atomic(os.path.join(args.out, "apollo_table.md"), table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
