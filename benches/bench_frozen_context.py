"""Frozen-context segment step vs the two anchors of issue 6, on a Qwen3.5-shaped random model.

Methods, per context length (bf16 on CUDA; fp32 with --tiny on CPU), segment of --segment tokens:
  full-seq      plain transformers training of context+segment (forward + backward of the whole sequence)
  hf-prefix     transformers: no-grad prefix with use_cache=True, then per segment a deep copy of the cache and
                a training forward + backward of the segment with it; the in-place overwrite of the saved GDN
                state is patched out (the chunked delta rule gets a private copy of its initial state)
  ours          apollo_fast: encode_context once, then segment_loss + backward per segment (batch 1)
  ours-batch    apollo_fast: all --per-context segments in one batch, time divided by their number
Time per segment step is the median over --per-context segments after a warm-up (CUDA events on GPU), forward
+ backward + zero_grad (no optimizer step: it is the same for all methods). Peak memory is the peak allocated
during the segment steps (model weights and gradients included; the context/cache stays resident).
The one-off context cost (encode / prefix) is reported apart. Prints a table last; writes JSON to
$OUT/bench_frozen_context.json (or --out-dir).

    python benches/bench_frozen_context.py                # H100: contexts 2k, 8k, 32k
    python benches/bench_frozen_context.py --tiny         # CPU smoke run at a toy size
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch

# apollo_fast comes from the installed package (pip install -e . here; the wheel on the GPU machine): the source
# folder must not be put first on sys.path, since its apollo_fast has no `kernels` subpackage (setup.py maps the
# top-level kernels/ folder to apollo_fast.kernels only when installing), so the GDN kernels would fail to import.
import apollo_fast
from apollo_fast.backend import resolve_backend
from apollo_fast.frozen import encode_context, segment_loss

GIB = 2**30


def build_model(tiny: bool, device: torch.device, dtype: torch.dtype):
    """Qwen3.5-shaped random model: 16 layers, hidden 1024, 12 GDN + 4 attention, GDN 8 key / 16 value heads of 128."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    if tiny:
        cfg = dict(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
        )
    else:
        # The anchor's vocabulary and MLP width are not recorded; these give 333M parameters with the stated shape.
        cfg = dict(
            vocab_size=32768,
            hidden_size=1024,
            intermediate_size=2688,
            num_hidden_layers=16,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=256,
            linear_num_key_heads=8,
            linear_num_value_heads=16,
            linear_key_head_dim=128,
            linear_value_head_dim=128,
        )
    config = Qwen3_5TextConfig(**cfg, max_position_embeddings=65536, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3_5ForCausalLM(config)
    return model.to(dtype).train()


class Clock:
    """Wall time of a callable in ms (CUDA events on GPU) and the peak memory it allocated."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated() / GIB if self.cuda else None

    def time_ms(self, fn: Callable[[], None]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


@contextlib.contextmanager
def private_initial_state(model):
    """Patch out transformers' in-place overwrite of the GDN state saved for backward: every chunked delta-rule
    call gets its own copy of initial_state (module globals and per-instance attributes, across versions)."""

    def wrap(fn):
        def wrapped(*args, initial_state=None, **kwargs):
            return fn(*args, initial_state=None if initial_state is None else initial_state.clone(), **kwargs)

        return wrapped

    restores = []
    gdn_modules = [m for m in model.modules() if type(m).__name__.endswith("GatedDeltaNet")]
    modeling = {sys.modules[type(m).__module__] for m in gdn_modules}
    for mod in modeling:
        for name in dir(mod):
            if name.endswith("chunk_gated_delta_rule") and callable(getattr(mod, name)):
                orig = getattr(mod, name)
                setattr(mod, name, wrap(orig))
                restores.append((mod, name, orig))
    for m in gdn_modules:
        if "chunk_gated_delta_rule" in vars(m):
            orig = vars(m)["chunk_gated_delta_rule"]
            m.chunk_gated_delta_rule = wrap(orig)
            restores.append((m, "chunk_gated_delta_rule", orig))
    try:
        yield
    finally:
        for obj, name, orig in restores:
            setattr(obj, name, orig)


def _cache_of(out):
    for name in ("cache", "past_key_values"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    raise RuntimeError("transformers output has no cache (neither .cache nor .past_key_values)")


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def run_method(name, model, clock, setup, step, n_steps, warmup) -> dict:
    """setup() -> state (timed once, the context cost); step(state, i) per segment (timed)."""
    result = {"method": name}
    try:
        clock.reset_peak()
        box: dict = {"s": None}
        setup_ms = None
        if setup is not None:
            setup_ms = clock.time_ms(lambda: box.update(s=setup()))
        for i in range(warmup):
            step(box["s"], -1 - i)
        clock.reset_peak()
        times = [clock.time_ms(lambda i=i: step(box["s"], i)) for i in range(n_steps)]
        result.update(
            setup_ms=setup_ms,
            step_ms_median=statistics.median(times),
            step_ms_min=min(times),
            step_ms_max=max(times),
            peak_gib=clock.peak_gib(),
        )
        if isinstance(box["s"], apollo_fast.FrozenContext):
            result["context_gib"] = box["s"].nbytes / GIB
        box.clear()
    except Exception as err:  # an anchor may OOM (full-seq at 32k) or fail on another transformers version
        if not _is_oom(err) and name.startswith("ours"):
            raise
        result["error"] = "OOM" if _is_oom(err) else f"{type(err).__name__}: {str(err)[:200]}"
    finally:
        model.zero_grad(set_to_none=True)  # an OOM in backward leaves gradients behind
        if clock.cuda:
            torch.cuda.empty_cache()
    return result


def bench_context(model, ctx_len, args, device, clock) -> list[dict]:
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(ctx_len)
    ctx_ids = torch.randint(0, vocab, (1, ctx_len), generator=gen).to(device)
    n, warm = args.per_context, args.warmup
    segs = [torch.randint(0, vocab, (1, args.segment), generator=gen).to(device) for _ in range(n + warm)]
    batch = torch.cat(segs[:n], dim=0)
    zero = lambda: model.zero_grad(set_to_none=True)  # noqa: E731
    rows = []

    def full_step(_, i):
        ids = torch.cat((ctx_ids, segs[i]), dim=1)
        labels = ids.clone()
        labels[:, :ctx_len] = -100
        model(input_ids=ids, labels=labels).loss.backward()
        zero()

    if not args.skip_anchors:
        rows.append(run_method("full-seq", model, clock, None, full_step, n, warm))

        def hf_prefix():
            with torch.no_grad():
                return _cache_of(model(input_ids=ctx_ids, use_cache=True))

        def hf_step(cache, i):
            mine = copy.deepcopy(cache)
            with private_initial_state(model):
                model(input_ids=segs[i], past_key_values=mine, use_cache=True, labels=segs[i]).loss.backward()
            zero()

        rows.append(run_method("hf-prefix", model, clock, hf_prefix, hf_step, n, warm))

    def ours_step(ctx, i):
        segment_loss(model, ctx, segs[i]).backward()
        zero()

    rows.append(run_method("ours", model, clock, lambda: encode_context(model, ctx_ids), ours_step, n, warm))

    def ours_batch_step(ctx, i):
        segment_loss(model, ctx, batch).backward()
        zero()

    r = run_method("ours-batch", model, clock, lambda: encode_context(model, ctx_ids), ours_batch_step, 2, 1)
    for key in ("step_ms_median", "step_ms_min", "step_ms_max"):
        if key in r:
            r[key] /= n  # per segment
    rows.append(r)
    for r in rows:
        r["context"] = ctx_len
    return rows


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


def table(rows: list[dict]) -> str:
    head = "| context | method | step ms (median, min-max) | peak GiB | context ms | context GiB |"
    lines = [head, "| --- | --- | --- | --- | --- | --- |"]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['context']} | {r['method']} | {r['error']} | | | |")
            continue
        lines.append(
            f"| {r['context']} | {r['method']} | {r['step_ms_median']:.1f} ({r['step_ms_min']:.1f}-"
            f"{r['step_ms_max']:.1f}) | {fmt(r.get('peak_gib'), '.2f')} | {fmt(r.get('setup_ms'), '.0f')} | "
            f"{fmt(r.get('context_gib'), '.3f')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="toy model and sizes, runs on CPU in seconds")
    p.add_argument("--contexts", type=int, nargs="+", default=None, help="context lengths (default 2048 8192 32768)")
    p.add_argument("--segment", type=int, default=None, help="segment tokens (default 128; 16 with --tiny)")
    p.add_argument("--per-context", type=int, default=None, help="segments per context (default 8; 2 with --tiny)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--skip-anchors", action="store_true", help="only measure apollo_fast")
    p.add_argument("--out-dir", default=os.environ.get("OUT", "bench_out"))
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.contexts = args.contexts or ([64, 128] if args.tiny else [2048, 8192, 32768])
    args.segment = args.segment or (16 if args.tiny else 128)
    args.per_context = args.per_context or (2 if args.tiny else 8)
    if args.tiny:
        args.warmup = min(args.warmup, 1)

    model = build_model(args.tiny, device, dtype)
    clock = Clock(device)
    n_params = sum(p.numel() for p in model.parameters())
    gdn_path = "Triton kernels" if resolve_backend("auto", [device], op="bench") == "triton" else "plain PyTorch"
    import transformers

    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": str(dtype).replace("torch.", ""),
        "params": n_params,
        "segment": args.segment,
        "segments_per_context": args.per_context,
        "ours_gdn_path": gdn_path,
        "tiny": args.tiny,
    }
    print(
        f"# {meta['device']} | torch {meta['torch']} | transformers {meta['transformers']} | {meta['dtype']} | "
        f"{n_params / 1e6:.0f}M params | segment {args.segment} | ours GDN: {gdn_path}",
        flush=True,
    )
    rows = []
    for ctx_len in args.contexts:
        new = bench_context(model, ctx_len, args, device, clock)
        for r in new:
            print(json.dumps(r), flush=True)
        rows += new
        write_json(os.path.join(args.out_dir, "bench_frozen_context.json"), {"meta": meta, "rows": rows})
    print(f"\nFrozen-context segment step ({meta['device']}, {meta['date']}); time per segment, forward+backward\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
