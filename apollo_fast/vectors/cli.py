"""`apollo-fast vectors extract|add|negate|ties|dare|apply`: task vectors from the command line."""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch

from ..checks import check_output, number_arg
from .apply import apply_to_checkpoint
from .merge import SIGN_METHODS, TRIM_SCOPES, dare, ties_merge
from .task_vector import VOCAB_POLICIES, TaskVector, add_vectors, extract_task_vector

__all__ = ["register"]


class _Stats:
    """Running totals over the tensors as they are written (for the summary table)."""

    def __init__(self) -> None:
        self.tensors = self.elements = self.nonzero = 0
        self.sq = 0.0

    def __call__(self, name: str, t: torch.Tensor) -> None:
        if not t.dtype.is_floating_point:
            return
        f = t.float()
        self.tensors += 1
        self.elements += f.numel()
        self.nonzero += int(torch.count_nonzero(f))
        self.sq += float(f.double().pow(2).sum())


def _summary(title: str, rows: list[tuple[str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)


def _finish(args: argparse.Namespace, title: str, out: Path, stats: _Stats, t0: float, extra=()) -> int:
    size = sum(f.stat().st_size for f in out.rglob("*.safetensors")) if out.is_dir() else out.stat().st_size
    rows = [
        ("output", str(out)),
        *extra,
        ("tensors", f"{stats.tensors:,}"),
        ("elements", f"{stats.elements:,}"),
        ("non-zero", f"{100.0 * stats.nonzero / max(1, stats.elements):.2f} %"),
        ("L2 norm of the output", f"{stats.sq**0.5:.6g}"),
        ("size on disk", f"{size / 2**20:,.1f} MiB"),
        ("seconds", f"{time.perf_counter() - t0:.2f}"),
        ("peak RSS", f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB"),
    ]
    _summary(title, rows)
    return 0


def _save(args: argparse.Namespace, tv: TaskVector, title: str, t0: float, extra=()) -> int:
    stats = _Stats()
    out = tv.save(args.out, dtype=args.dtype, progress=not args.quiet, on_tensor=stats)
    return _finish(args, title, out, stats, t0, extra)


def _check_out(args: argparse.Namespace, folder: bool = False) -> None:
    """The output rule of apollo_fast.checks, before any input is read."""
    check_output(args.out, overwrite=args.overwrite, folder=folder)


def _extract(args: argparse.Namespace) -> int:
    _check_out(args)
    t0 = time.perf_counter()
    tv = extract_task_vector(args.base, args.finetuned, vocab_policy=args.vocab_policy)
    return _save(args, tv, "task vector: extract", t0, [("base", tv.base_model.get("name", "?"))])


def _add(args: argparse.Namespace) -> int:
    _check_out(args)
    t0 = time.perf_counter()
    vs = [TaskVector.load(p) for p in args.vectors]
    return _save(args, add_vectors(vs, args.weights), f"task vector: add ({len(vs)} vectors)", t0)


def _negate(args: argparse.Namespace) -> int:
    _check_out(args)
    t0 = time.perf_counter()
    return _save(args, -TaskVector.load(args.vector), "task vector: negate", t0)


def _ties(args: argparse.Namespace) -> int:
    _check_out(args)
    t0 = time.perf_counter()
    vs = [TaskVector.load(p) for p in args.vectors]
    if args.dare is not None:
        vs = [dare(v, args.dare, seed=args.seed + i) for i, v in enumerate(vs)]
    merged = ties_merge(
        vs,
        density=args.density,
        lam=args.lam,
        weights=args.weights,
        trim=args.trim,
        sign=args.sign,
        progress=not args.quiet,
    )
    extra = [("density", f"{args.density}"), ("lambda", f"{args.lam}"), ("trim", args.trim), ("sign", args.sign)]
    if args.dare is not None:
        extra.append(("DARE p", f"{args.dare} (seed {args.seed})"))
    return _save(args, merged, f"task vector: TIES ({len(vs)} vectors)", t0, extra)


def _dare(args: argparse.Namespace) -> int:
    _check_out(args)
    t0 = time.perf_counter()
    tv = dare(TaskVector.load(args.vector), args.p, seed=args.seed)
    return _save(args, tv, "task vector: DARE", t0, [("p", f"{args.p}"), ("seed", f"{args.seed}")])


def _apply(args: argparse.Namespace) -> int:
    _check_out(args, folder=True)
    t0 = time.perf_counter()
    vs = [TaskVector.load(p) for p in args.vector]
    coefs = args.coef if args.coef else [1.0] * len(vs)
    if len(coefs) != len(vs):
        raise ValueError(f"{len(coefs)} --coef values for {len(vs)} --vector files")
    stats = _Stats()
    out = apply_to_checkpoint(
        args.base,
        args.out,
        vs,
        coefs,
        overwrite=args.overwrite,
        max_shard_bytes=int(args.max_shard_gb * 2**30),
        check_base=args.check_base,
        progress=not args.quiet,
        on_tensor=stats,
    )
    return _finish(
        args,
        "task vectors: apply",
        out,
        stats,
        t0,
        [("base", str(args.base)), ("coefficients", ", ".join(f"{c:g}" for c in coefs))],
    )


def _common(p: argparse.ArgumentParser, out_help: str = "output .safetensors file") -> None:
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _vector_out(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="storage dtype (default fp32)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("vectors", help="task vectors: extract, add, negate, TIES, DARE, apply")
    vs = p.add_subparsers(dest="vectors_command", metavar="ACTION")
    vs.required = True

    e = vs.add_parser("extract", help="tau = finetuned - base from two checkpoints (folders or .safetensors)")
    e.add_argument("--base", required=True)
    e.add_argument("--finetuned", required=True)
    e.add_argument(
        "--vocab-policy",
        default="error",
        choices=VOCAB_POLICIES,
        help="embeddings / lm_head of different vocab size: error (default) or base (shared rows)",
    )
    _vector_out(e)
    e.set_defaults(func=_extract)

    a = vs.add_parser("add", help="weighted sum of task vectors")
    a.add_argument("vectors", nargs="+")
    a.add_argument("--weights", type=number_arg(), nargs="+", default=None)
    _vector_out(a)
    a.set_defaults(func=_add)

    n = vs.add_parser("negate", help="-tau (forget a behaviour)")
    n.add_argument("vector")
    _vector_out(n)
    n.set_defaults(func=_negate)

    t = vs.add_parser("ties", help="TIES-merge task vectors (optionally DARE first)")
    t.add_argument("vectors", nargs="+")
    t.add_argument(
        "--density",
        type=number_arg(minimum=0, maximum=1),
        default=0.2,
        help="fraction of magnitudes kept (default 0.2)",
    )
    t.add_argument("--lam", type=number_arg(), default=1.0, help="lambda, scale of the merged vector (default 1)")
    t.add_argument("--weights", type=number_arg(minimum=0), nargs="+", default=None)
    t.add_argument(
        "--trim", default="model", choices=TRIM_SCOPES, help="top-k over the whole model (paper) or per tensor"
    )
    t.add_argument(
        "--sign", default="sum", choices=SIGN_METHODS, help="sign election: total magnitude or majority count"
    )
    t.add_argument(
        "--dare",
        type=number_arg(minimum=0, below=1),
        default=None,
        metavar="P",
        help="DARE drop probability applied first",
    )
    t.add_argument("--seed", type=int, default=0, help="DARE seed (vector i uses seed + i)")
    _vector_out(t)
    t.set_defaults(func=_ties)

    d = vs.add_parser("dare", help="DARE: drop with probability p, rescale by 1/(1-p)")
    d.add_argument("vector")
    d.add_argument("--p", type=number_arg(minimum=0, below=1), required=True)
    d.add_argument("--seed", type=int, default=0)
    _vector_out(d)
    d.set_defaults(func=_dare)

    ap = vs.add_parser("apply", help="write base + sum c_i tau_i as a new checkpoint folder")
    ap.add_argument("--base", required=True, help="base checkpoint folder")
    ap.add_argument("--vector", action="append", required=True, help="task vector file (repeatable)")
    ap.add_argument(
        "--coef", type=number_arg(), action="append", default=None, help="coefficient per --vector (default 1)"
    )
    ap.add_argument("--max-shard-gb", type=number_arg(above=0), default=5.0)
    ap.add_argument("--check-base", default="warn", choices=["warn", "error", "ignore"])
    _common(ap, "output checkpoint folder")
    ap.set_defaults(func=_apply)
