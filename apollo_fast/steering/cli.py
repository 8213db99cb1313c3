"""`apollo-fast steer extract|verify|bake|serve`: steering vectors from the command line.

Pairs files are JSON Lines, one {"prompt": ..., "desired": ..., "undesired": ...} per line (prompt
optional; each value a string, which needs a tokenizer, or a list of token ids). Prompt files are
JSON Lines of strings, lists of token ids, or {"text": ...} / {"ids": [...]}.
Outputs follow apollo_fast.checks (refused when they exist, unless --overwrite; checked before
anything is loaded) and are written atomically; the verify report is strict JSON.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_json, save_pretrained_atomic
from ..checks import check_output, layer_list, number_arg
from ..jsonl import iter_jsonl

__all__ = ["register", "read_jsonl", "load_model"]


def _records(path: str | Path, what: str) -> list[tuple[int, Any]]:
    out = []
    for n, value, problem in iter_jsonl(path, what):
        if problem is not None:
            raise ValueError(f"{path}:{n}: {problem}")
        out.append((n, value))
    if not out:
        raise ValueError(f"{path} holds no records")
    return out


def read_jsonl(path: str | Path, what: str = "file") -> list[Any]:
    """Every non-blank line of a JSON Lines file, parsed; ValueError `FILE:LINE: what` at the first bad one."""
    return [value for _, value in _records(path, what)]


def _prompts(path: str) -> list[Any]:
    out = []
    for n, r in _records(path, "prompts file"):
        if isinstance(r, dict):
            if "text" not in r and "ids" not in r:
                raise ValueError(f"{path}:{n}: expected a string, a list of ids, or a dict with 'text' or 'ids'")
            r = r.get("text", r.get("ids"))
        out.append(r)
    return out


def load_model(path: str, device: str | None):
    """A transformers causal LM and its tokenizer (None when the folder has none)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not Path(path).is_dir():
        raise FileNotFoundError(f"no such model folder: {path}")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(dev).eval()
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        tok = None
    return model, tok


def _table(title: str, rows: list[tuple[str, str]], header: tuple[str, ...] = ("what", "value")) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*r)
    Console().print(table)


def _extract(args: argparse.Namespace) -> int:
    from .extract import extract_steering_vector

    check_output(args.out, overwrite=args.overwrite, folder=False)
    t0 = time.perf_counter()
    pairs = read_jsonl(args.pairs, "pairs file")
    model, tok = load_model(args.model, args.device)
    sv = extract_steering_vector(
        model, pairs, layer_list(args.layers), args.method, args.position, tok, args.batch_size
    )
    sv.save(args.out)
    rows = [(str(i), f"{sv.directions[i].norm().item():.4g}") for i in sv.layers]
    _table(
        f"steering vector: {args.method}, {len(pairs)} pairs, position {args.position} -> {args.out} "
        f"({time.perf_counter() - t0:.1f} s)",
        rows,
        ("layer", "norm"),
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .vector import SteeringVector
    from .verify import verify_steering

    if args.json:
        check_output(args.json, overwrite=args.overwrite, folder=False, option="--json")
    pairs = read_jsonl(args.pairs, "pairs file")
    sv = SteeringVector.load(args.vector)
    model, tok = load_model(args.model, args.device)
    sv.warn_if_other_model(model)
    r = verify_steering(model, sv, pairs, args.coef, layer_list(args.layers), tok, args.batch_size)
    rows = [
        ("log p(desired) - log p(undesired)", f"{r.margin_off:.4f}", f"{r.margin_on:.4f}", f"{r.margin_change:+.4f}"),
        (
            "pairs preferring desired",
            f"{r.prefer_desired_off:.1%}",
            f"{r.prefer_desired_on:.1%}",
            f"{r.prefer_desired_on - r.prefer_desired_off:+.1%}",
        ),
    ]
    for i, p in r.projection.items():
        rows.append(
            (f"projection on direction, layer {i}", f"{p['mean_off']:.4f}", f"{p['mean_on']:.4f}", f"{p['shift']:+.4f}")
        )
    _table(
        f"steering verify: {r.n_pairs} held-out pairs, coefficient {r.coefficient:g}, layers {r.layers}",
        rows,
        ("metric", "off", "on", "change"),
    )
    if args.json:
        atomic_write_json(args.json, r.to_dict())
    return 0


def _bake(args: argparse.Namespace) -> int:
    from .bake import bake_steering
    from .vector import SteeringVector

    check_output(args.out, overwrite=args.overwrite, folder=True)
    t0 = time.perf_counter()
    prompts = _prompts(args.prompts)
    eval_prompts = _prompts(args.eval_prompts) if args.eval_prompts else None
    eval_pairs = read_jsonl(args.eval_pairs, "pairs file") if args.eval_pairs else None
    sv = SteeringVector.load(args.vector)
    model, tok = load_model(args.model, args.device)
    sv.warn_if_other_model(model)
    r = bake_steering(
        model,
        sv,
        prompts,
        args.coef,
        layer_list(args.layers),
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        rank=args.rank,
        tokenizer=tok,
        seed=args.seed,
        progress=not args.quiet,
        eval_prompts=eval_prompts,
        eval_pairs=eval_pairs,
        context=args.context,
    )
    save_pretrained_atomic(model, tok, args.out)
    rows = [
        ("KL(steered || model) before", f"{r.kl_before:.5f}"),
        ("KL(steered || model) after", f"{r.kl_after:.5f}"),
        ("KL closed", f"{r.kl_closed:.1%}"),
        ("training loss first / last", f"{r.first_loss:.5f} / {r.last_loss:.5f}"),
    ]
    if r.margin_retained is not None:
        rows += [
            (
                "margin original / steered / baked",
                f"{r.margin_original:.3f} / {r.margin_steered:.3f} / {r.margin_baked:.3f}",
            ),
            ("steering effect retained without hook", f"{r.margin_retained:.1%}"),
        ]
    rows.append(("seconds", f"{time.perf_counter() - t0:.1f}"))
    _table(f"steering bake: {r.steps} APOLLO steps -> {args.out}", rows)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from ..serving.cli import steer_serve

    return steer_serve(args)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("steer", help="steering vectors: extract, verify, bake into weights")
    ss = p.add_subparsers(dest="steer_command", metavar="ACTION")
    ss.required = True

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--model", required=True, help="transformers model folder (with tokenizer for text)")
        q.add_argument("--layers", default=None, help="comma-separated decoder layer indices (default: all)")
        q.add_argument("--batch-size", type=int, default=16)
        q.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")

    e = ss.add_parser("extract", help="directions per layer from contrastive pairs (JSON Lines)")
    common(e)
    e.add_argument("--pairs", required=True)
    e.add_argument("--method", default="mean_diff", choices=["mean_diff", "pca"])
    e.add_argument("--position", type=int, default=-1, help="token position (default -1: the last real token)")
    e.add_argument("--out", required=True, help="output .safetensors file")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    e.set_defaults(func=_extract)

    v = ss.add_parser("verify", help="projection shift and log-prob margin on held-out pairs, off vs on")
    common(v)
    v.add_argument("--vector", required=True)
    v.add_argument("--pairs", required=True, help="held-out pairs (JSON Lines)")
    v.add_argument("--coef", type=number_arg(), default=1.0)
    v.add_argument("--json", default=None, help="also write the report as JSON here")
    v.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    v.set_defaults(func=_verify)

    b = ss.add_parser("bake", help="train the un-steered model (APOLLO) to match the steered one (KL)")
    common(b)
    b.add_argument("--vector", required=True)
    b.add_argument("--prompts", required=True, help="training prompts (JSON Lines)")
    b.add_argument("--eval-prompts", default=None, help="prompts for the KL report (default: the training prompts)")
    b.add_argument("--eval-pairs", default=None, help="held-out pairs: report how much of the effect remains")
    b.add_argument("--context", default=None, help="shared text before every prompt (steered in the teacher)")
    b.add_argument("--coef", type=number_arg(), default=1.0)
    b.add_argument("--steps", type=int, default=100)
    b.add_argument("--lr", type=number_arg(above=0), default=1e-3)
    b.add_argument("--rank", type=int, default=16, help="APOLLO rank")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", required=True, help="output model folder")
    b.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_bake)

    from ..serving.cli import add_serve_arguments

    s = ss.add_parser("serve", help="serve the model steered in vLLM's OpenAI-compatible server (until Ctrl-C)")
    add_serve_arguments(s)
    s.set_defaults(func=_serve)
