"""`apollo-fast probe dose|lr|gdn-state|steering|transfer`: the open questions as runnable experiments.

Every probe prints its markdown report; `--out DIR` writes DIR/report.md, report.json and PNG plots
(the folder appears atomically), `--json PATH` the JSON alone. Existing outputs are refused without
`--overwrite`, before any model is loaded. Bad input exits 2 with one message naming the problem.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .inputs import ProbeError, check_output

__all__ = ["register"]


def _list(text: list[str] | None, kind: type, option: str) -> list[Any] | None:
    """'8,16 32' -> [8, 16, 32] (commas or spaces)."""
    if text is None:
        return None
    parts = [p for t in text for p in t.split(",") if p.strip()]
    try:
        return [kind(p) for p in parts]
    except ValueError:
        raise ProbeError(f"{option} must be a list of {kind.__name__}s, got {' '.join(text)!r}") from None


def _named(items: list[str], option: str) -> dict[str, str]:
    """NAME=FILE (or FILE: the name is the file's stem) -> {name: file}; names must be unique."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).stem, item
        if not name or not path:
            raise ProbeError(f"{option}: expected NAME=FILE, got {item!r}")
        if name in out:
            raise ProbeError(f"{option}: the name {name!r} is given twice")
        out[name] = path
    return out


def _stats(args: argparse.Namespace):
    from .common import StatOptions

    return StatOptions(level=float(args.level), n_boot=args.n_boot, boot_seed=args.boot_seed)


def _settings(args: argparse.Namespace):
    from .training import TrainSettings

    if args.steps is not None and args.epochs is not None:
        raise ProbeError("give either --steps or --epochs, not both")
    epochs = None if args.steps is not None else (3.0 if args.epochs is None else args.epochs)
    return TrainSettings(
        lr=args.lr,
        epochs=epochs,
        steps=args.steps,
        batch=args.batch,
        rank=args.rank,
        max_grad_norm=args.max_grad_norm or None,
        segment_batch=args.segment_batch,
        gradient_checkpointing=args.gradient_checkpointing,
    )


def _common(args: argparse.Namespace) -> dict[str, Any]:
    return {"stats": _stats(args), "device": args.device, "dtype": args.dtype, "progress": not args.quiet}


def _finish(report, args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markdown import Markdown

    text = "\n".join(line for line in report.markdown.splitlines() if not line.startswith("!["))  # no images
    Console().print(Markdown(text))
    if args.out:
        report.save(args.out, overwrite=args.overwrite)
        print(f"report: {Path(args.out) / 'report.md'}")
    if args.json:
        report.write_json(args.json, overwrite=args.overwrite)
    return 0


def _check_outputs(args: argparse.Namespace) -> None:
    check_output(args.out, overwrite=args.overwrite, folder=True)
    check_output(args.json, overwrite=args.overwrite, folder=False)


def _dose(args: argparse.Namespace) -> int:
    from .dose import dose

    _check_outputs(args)
    report = dose(
        args.model,
        args.train,
        args.pairs,
        ns=_list(args.n, int, "--n"),
        seeds=args.seeds,
        settings=_settings(args),
        null=args.null,
        min_effect=args.min_effect,
        batch_size=args.batch_size,
        frozen_from=args.frozen_from,
        **_common(args),
    )
    return _finish(report, args)


def _lr(args: argparse.Namespace) -> int:
    from .lr import learning_rate

    _check_outputs(args)
    report = learning_rate(
        args.model,
        args.train,
        args.pairs,
        lrs=_list(args.lrs, float, "--lrs"),
        n=args.n,
        seeds=args.seeds,
        settings=_settings(args),
        general=args.general,
        max_damage=args.max_damage,
        min_effect=args.min_effect,
        batch_size=args.batch_size,
        frozen_from=args.frozen_from,
        **_common(args),
    )
    return _finish(report, args)


def _gdn_state(args: argparse.Namespace) -> int:
    from .gdn_state import gdn_state

    _check_outputs(args)
    if args.vector is not None and not Path(args.vector).is_file():
        raise FileNotFoundError(f"--vector: no such file: {args.vector}")
    report = gdn_state(args.base, args.trained, args.contexts, vector=args.vector, **_common(args))
    return _finish(report, args)


def _steering(args: argparse.Namespace) -> int:
    from .steering import steering

    _check_outputs(args)
    report = steering(
        args.model,
        _named(args.pairs, "PAIRS"),
        layers=_list(args.layers, int, "--layers"),
        steer_layers=_list(args.steer_layers, int, "--steer-layers"),
        top_layers=args.top_layers,
        coefs=_list(args.coefs, float, "--coefs"),
        folds=args.folds,
        method=args.method,
        n_perm=args.n_perm,
        min_auc=args.min_auc,
        min_effect=args.min_effect,
        batch_size=args.batch_size,
        **_common(args),
    )
    return _finish(report, args)


def _transfer(args: argparse.Namespace) -> int:
    from .transfer import transfer

    _check_outputs(args)
    report = transfer(
        args.base,
        args.trained,
        _named(args.eval, "--eval"),
        min_change=args.min_change,
        min_effect=args.min_effect,
        batch_size=args.batch_size,
        chunk_tokens=args.chunk_tokens,
        frozen_from=args.frozen_from,
        **_common(args),
    )
    return _finish(report, args)


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output and statistics")
    g.add_argument("--out", default=None, help="folder for report.md, report.json and the PNG plots")
    g.add_argument("--json", default=None, help="also write the JSON report to this file")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out / --json")
    g.add_argument("--level", type=float, default=0.95, help="confidence level of every interval (default 0.95)")
    g.add_argument("--n-boot", type=int, default=2000, help="bootstrap draws (default 2000)")
    g.add_argument("--boot-seed", type=int, default=0, help="seed of the bootstrap generator (default 0)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="dtype the model is loaded in (default: the checkpoint's)",
    )
    g.add_argument("--batch-size", type=int, default=16, help="sequences per scoring forward (default 16)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_training(p: argparse.ArgumentParser, lr_default: float | None) -> None:
    g = p.add_argument_group("training (each run starts from the base weights)")
    g.add_argument("--model", required=True, help="base model folder (transformers, with tokenizer)")
    g.add_argument("--train", required=True, help="training examples (the `apollo-fast train --data` format)")
    g.add_argument("--pairs", required=True, help="held-out pairs (JSON Lines: prompt, desired, undesired)")
    g.add_argument("--seeds", type=int, default=3 if lr_default is not None else 2, help="seeds per condition")
    if lr_default is not None:
        g.add_argument("--lr", type=float, default=lr_default, help=f"learning rate (default {lr_default:g})")
    g.add_argument("--epochs", type=float, default=None, help="epochs over each run's n examples (default 3)")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps per run instead of --epochs")
    g.add_argument("--batch", type=int, default=1, help="examples per optimizer step (default 1)")
    g.add_argument("--rank", type=int, default=256, help="APOLLO rank (default 256)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping, 0: off (default 1)")
    g.add_argument("--segment-batch", type=int, default=8, help="segments of one example per forward (default 8)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute segment layers in backward")
    g.add_argument(
        "--min-effect",
        type=float,
        default=0.1,
        help="smallest margin change that matters, nats: a CI inside +-this is 'no effect' (default 0.1)",
    )
    g.add_argument(
        "--frozen-from",
        type=int,
        default=256,
        help="prompts of at least this many tokens are scored on the frozen-context path (default 256)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "probe",
        help="experiments with CIs: dose, lr, gdn-state, steering, transfer",
        description=__doc__.splitlines()[0],
    )
    ps = p.add_subparsers(dest="probe_command", metavar="PROBE")
    ps.required = True

    d = ps.add_parser("dose", help="how many examples move a behaviour (nested subsets, several seeds)")
    _add_training(d, 1e-5)
    d.add_argument("--n", nargs="+", default=["8,16,32,64,128"], help="training-set sizes (default 8,16,32,64,128)")
    d.add_argument(
        "--null",
        default="largest",
        choices=["largest", "all", "none"],
        help="shuffled-target null runs at the largest n (default), at every n, or none",
    )
    _add_common(d)
    d.set_defaults(func=_dose)

    lr = ps.add_parser("lr", help="the effect over a learning-rate grid, against general-data damage")
    _add_training(lr, None)
    lr.set_defaults(lr=1e-5)
    lr.add_argument("--lrs", nargs="+", default=["1e-5,3e-5,1e-4"], help="learning rates (default 1e-5,3e-5,1e-4)")
    lr.add_argument("--n", type=int, default=None, help="training examples per run (default: all)")
    lr.add_argument("--general", default=None, help='general texts for the damage ({"text": ...} JSON Lines)')
    lr.add_argument(
        "--max-damage",
        type=float,
        default=0.05,
        help="largest acceptable relative general-perplexity increase (default 0.05)",
    )
    _add_common(lr)
    lr.set_defaults(func=_lr)

    g = ps.add_parser(
        "gdn-state",
        help="per layer and head: state change before vs after training, readout alignment with a steering vector",
    )
    g.add_argument("base", help="base model folder")
    g.add_argument("trained", help="trained model folder")
    g.add_argument("--contexts", required=True, help='held-out contexts (JSON Lines of text, ids or {"text"})')
    g.add_argument("--vector", default=None, help="steering vector (.safetensors from `apollo-fast steer extract`)")
    _add_common(g)
    g.set_defaults(func=_gdn_state)

    s = ps.add_parser("steering", help="per behaviour and layer: cross-validated separability and steering effect")
    s.add_argument("pairs", nargs="+", metavar="PAIRS", help="a behaviour's pairs file, NAME=FILE or FILE")
    s.add_argument("--model", required=True, help="model folder")
    s.add_argument("--layers", nargs="+", default=None, help="layers for separability (default: all)")
    s.add_argument(
        "--steer-layers",
        nargs="+",
        default=None,
        help="layers for the steering effect (default: each behaviour's --top-layers best)",
    )
    s.add_argument("--top-layers", type=int, default=2, help="best layers to steer per behaviour (default 2)")
    s.add_argument("--coefs", nargs="+", default=["1,2,4"], help="steering coefficients (default 1,2,4)")
    s.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    s.add_argument("--method", default="mean_diff", choices=["mean_diff", "pca"])
    s.add_argument("--n-perm", type=int, default=200, help="label-swap permutations for the null (default 200)")
    s.add_argument("--min-auc", type=float, default=0.05, help="an AUC CI inside 0.5 +- this is 'not separable'")
    s.add_argument("--min-effect", type=float, default=0.1, help="smallest steering effect that matters, nats")
    _add_common(s)
    s.set_defaults(func=_steering)

    t = ps.add_parser("transfer", help="perplexity (and margins) per evaluation set, before vs after, paired CIs")
    t.add_argument("base", help="base model folder")
    t.add_argument("trained", help="trained model folder")
    t.add_argument(
        "--eval",
        nargs="+",
        action="extend",
        required=True,
        metavar="NAME=FILE",
        help='evaluation sets: text ({"text"} / behaviour lines) or pairs files',
    )
    t.add_argument(
        "--min-change", type=float, default=0.01, help="smallest relative perplexity change that matters (default 0.01)"
    )
    t.add_argument("--min-effect", type=float, default=0.1, help="smallest margin change that matters, nats")
    t.add_argument("--chunk-tokens", type=int, default=1024, help="texts are cut into chunks of this many tokens")
    t.add_argument(
        "--frozen-from",
        type=int,
        default=256,
        help="pair prompts of at least this many tokens are scored on the frozen-context path",
    )
    _add_common(t)
    t.set_defaults(func=_transfer)
