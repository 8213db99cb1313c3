"""Merging speed and peak memory on the CPU: apollo_fast TIES vs mergekit TIES on the same random checkpoints.

Builds a random Llama-shaped base checkpoint of about --size-gb (bf16, sharded safetensors) and two
"fine-tunes" (base + small noise), then times, each in its own process (peak RSS from wait4):
  ours-tensor  : apollo_fast.vectors, TIES with per-tensor trim (what mergekit does), streamed
  ours-model   : the paper's default, trim over the whole model (two extra read passes)
  mergekit     : `mergekit-yaml` merge_method ties, same density/weights (if --mergekit is found)
All three write a complete merged checkpoint folder. The outputs of ours-tensor and mergekit are
compared element-wise (same algorithm: they should agree up to bf16 rounding and top-k ties).

    python benches/bench_merge.py --size-gb 1.5 --mergekit /path/to/venv/bin/mergekit-yaml
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from apollo_fast.vectors.io import write_sharded  # noqa: E402
from apollo_fast.vectors.sources import SafetensorsSource  # noqa: E402


def llama_config(size_gb: float):
    """A Llama config whose bf16 weights take about size_gb (hidden 2048, layers scaled)."""
    from transformers import LlamaConfig

    hidden, inter, vocab = 2048, 5632, 32000
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    fixed = 2 * vocab * hidden + hidden
    layers = max(1, round((size_gb * 1e9 / 2 - fixed) / per_layer))
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=vocab,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
        torch_dtype="bfloat16",
    )


def write_random_checkpoint(folder: Path, cfg, seed: int, base_seed: int | None, noise: float) -> None:
    """Random bf16 weights (std 0.02); with base_seed, base + noise * randn (a synthetic fine-tune)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(cfg).state_dict().items()}

    def tensor(key: str, s: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(s * 1_000_003 + hash_key(key))
        return torch.randn(shapes[key], generator=g)

    def produce(key: str) -> torch.Tensor:
        if base_seed is None:
            return (0.02 * tensor(key, seed)).bfloat16()
        base = (0.02 * tensor(key, base_seed)).bfloat16().float()
        return (base + noise * tensor(key, seed)).bfloat16()

    folder.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(folder)
    write_sharded(
        folder, [(k, s, torch.bfloat16) for k, s in shapes.items()], produce, {"format": "pt"}, max_shard_bytes=2**30
    )


def hash_key(key: str) -> int:
    import zlib

    return zlib.crc32(key.encode())


OURS = r"""
import sys, torch
from apollo_fast.vectors import extract_task_vector, ties_merge, apply_to_checkpoint
base, a, b, out, density, trim = sys.argv[1:7]
torch.set_num_threads(int(sys.argv[7]))
vs = [extract_task_vector(base, f) for f in (a, b)]
merged = ties_merge(vs, density=float(density), trim=trim, sign="sum")
apply_to_checkpoint(base, out, [merged], [1.0], max_shard_bytes=2**30, check_base="ignore")
"""


def _status_kib(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "RssAnon:", "RssFile:")):
                    key, value = line.split(":")
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def timed(cmd: list[str], env: dict | None = None) -> dict[str, float]:
    """Wall seconds, peak RSS (wait4) and peak anonymous / file-backed RSS (sampled every 50 ms) of a child."""
    import threading

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peaks = {"RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for k, v in _status_kib(proc.pid).items():
                if k in peaks:
                    peaks[k] = max(peaks[k], v)
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    err_chunks = []
    reader = threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()), daemon=True)
    reader.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    reader.join()
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        err = b"".join(err_chunks).decode(errors="replace")
        print(f"command failed ({rc}): {' '.join(cmd)}\n{err[-3000:]}", file=sys.stderr)
    return {
        "seconds": wall,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "peak_anon_mib": peaks["RssAnon"] / 1024,
        "peak_file_mib": peaks["RssFile"] / 1024,
        "rc": rc,
    }


def _line(name: str, r: dict[str, float]) -> str:
    return (
        f"{name:12s} {r['seconds']:8.1f} s  peak RSS {r['peak_rss_mib']:7.0f} MiB "
        f"(anonymous {r['peak_anon_mib']:7.0f}, file-backed {r['peak_file_mib']:7.0f})  rc {r['rc']}"
    )


def compare(a: Path, b: Path) -> dict[str, float]:
    """Element-wise agreement of two checkpoints: max |diff| and fraction of differing elements."""
    sa, sb = SafetensorsSource(a), SafetensorsSource(b)
    missing = sorted(set(sa.keys()) ^ set(sb.keys()))
    n = diff = 0
    max_abs, ref_max = 0.0, 0.0
    for k in sa.keys():
        if k not in sb.keys():
            continue
        x, y = sa.get(k).float(), sb.get(k).float()
        d = (x - y).abs()
        n += d.numel()
        diff += int((d > 0).sum())
        max_abs = max(max_abs, float(d.max()))
        ref_max = max(ref_max, float(x.abs().max()))
    return {
        "max_abs_diff": max_abs,
        "frac_elements_differing": diff / max(1, n),
        "ref_max_abs": ref_max,
        "keys_only_in_one": len(missing),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=0.25, help="size of ONE checkpoint in GB (bf16); default 0.25")
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--mergekit", default=shutil.which("mergekit-yaml"), help="path to mergekit-yaml")
    ap.add_argument("--workdir", default=None, help="where to write checkpoints (default: a temp folder)")
    ap.add_argument("--skip-model-trim", action="store_true")
    ap.add_argument("--skip-ours", action="store_true", help="reuse existing out-ours-* folders (mergekit only)")
    ap.add_argument(
        "--mergekit-dtype",
        default="bfloat16",
        choices=["bfloat16", "float32"],
        help="mergekit's compute dtype (`dtype:`); the output is bf16 either way (default bfloat16)",
    )
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_merge_"))
    work.mkdir(parents=True, exist_ok=True)
    cfg = llama_config(args.size_gb)
    t0 = time.perf_counter()
    for name, seed, base_seed in (("base", 0, None), ("ft_a", 1, 0), ("ft_b", 2, 0)):
        if not (work / name / "config.json").exists():
            write_random_checkpoint(work / name, cfg, seed, base_seed, noise=0.002)
    size = sum(f.stat().st_size for f in (work / "base").glob("*.safetensors"))
    print(
        f"checkpoints: 3 x {size / 1e9:.2f} GB ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}), "
        f"built in {time.perf_counter() - t0:.0f} s in {work}",
        flush=True,
    )

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    results = {}
    runs = [("ours-tensor", "tensor")] + ([] if args.skip_model_trim else [("ours-model", "model")])
    runs = [] if args.skip_ours else runs
    for name, trim in runs:
        out = work / f"out-{name}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [
            sys.executable,
            "-c",
            OURS,
            str(work / "base"),
            str(work / "ft_a"),
            str(work / "ft_b"),
            str(out),
            str(args.density),
            trim,
            str(args.threads),
        ]
        results[name] = timed(cmd, env)
        print(_line(name, results[name]), flush=True)

    if args.mergekit and Path(args.mergekit).exists():
        cfg_yaml = work / "ties.yml"
        models = "\n".join(
            f"  - model: {work / n}\n    parameters:\n      density: {args.density}\n      weight: 1.0"
            for n in ("ft_a", "ft_b")
        )
        cfg_yaml.write_text(
            f"merge_method: ties\nbase_model: {work / 'base'}\nmodels:\n{models}\n"
            "parameters:\n  normalize: true\n  int8_mask: false\n"
            f"dtype: {args.mergekit_dtype}\nout_dtype: bfloat16\n"
        )
        out = work / "out-mergekit"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [args.mergekit, str(cfg_yaml), str(out), "--lazy-unpickle", "--quiet", "-j", str(args.threads)]
        results["mergekit"] = timed(cmd, dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
        results["mergekit"]["dtype"] = args.mergekit_dtype
        print(_line(f"mergekit ({args.mergekit_dtype})", results["mergekit"]), flush=True)
        if results["mergekit"]["rc"] == 0:
            results["agreement_ours_tensor_vs_mergekit"] = compare(work / "out-ours-tensor", out)
            print("agreement ours-tensor vs mergekit:", results["agreement_ours_tensor_vs_mergekit"])
    else:
        print("mergekit-yaml not found: pass --mergekit PATH to compare")

    meta = {
        "checkpoint_bytes": size,
        "layers": cfg.num_hidden_layers,
        "density": args.density,
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    try:
        from importlib.metadata import version

        meta["mergekit"] = (
            subprocess.run(
                [
                    str(Path(args.mergekit).parent / "python"),
                    "-c",
                    "import importlib.metadata as m; print(m.version('mergekit'))",
                ],
                capture_output=True,
                text=True,
            ).stdout.strip()
            if args.mergekit
            else None
        )
        meta["safetensors"] = version("safetensors")
    except Exception:  # noqa: BLE001 - version strings are informational only
        pass
    print(json.dumps({"meta": meta, "results": results}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
