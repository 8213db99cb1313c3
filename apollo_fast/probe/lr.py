"""`probe lr`: the behaviour effect over a learning-rate grid at a fixed n, against the damage to general data.

Per learning rate and seed: train the base model on the same n examples (the first n of a seeded
permutation), score the held-out pairs (effect: margin change against the base, as in `dose`) and,
given general evaluation texts, their perplexity (damage: relative perplexity change against the base,
exp(mean NLL change per token) - 1). Both with two-way bootstrap CIs over seeds and items.

Rule for the best learning rate: among the rates whose damage CI stays below `max_damage` (all rates
when no general data is given), the one whose effect CI has the highest lower bound, if that bound is
above zero and its verdict positive; otherwise none.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from torch import nn

from .common import DEFAULT_STATS, StatOptions, check_delta, check_seeds, ci_note, verdict_note
from .inputs import ProbeError, check_finite, load_pairs, load_texts, load_train, open_model
from .report import Report, fmt, fmt_ci, new_figure, png_bytes, table
from .runs import Condition, nll_change, run_grid, run_log, summarize_effect
from .stats import POSITIVE
from .training import DEFAULT_TRAINING, TrainSettings, run_steps

__all__ = ["learning_rate"]


def learning_rate(
    model: str | os.PathLike | nn.Module,
    train: str | os.PathLike | Sequence[Any],
    pairs: str | os.PathLike | Sequence[Any],
    *,
    lrs: Sequence[float] = (1e-5, 3e-5, 1e-4),
    n: int | None = None,
    seeds: int | Sequence[int] = 2,
    settings: TrainSettings = DEFAULT_TRAINING,
    general: str | os.PathLike | Sequence[Any] | None = None,
    max_damage: float = 0.05,
    min_effect: float = 0.1,
    stats: StatOptions = DEFAULT_STATS,
    tokenizer: Any = None,
    device: str | None = None,
    dtype: str = "auto",
    batch_size: int = 16,
    frozen_from: int = 256,
    progress: bool = True,
) -> Report:
    """Effect (held-out margin change) and damage (general perplexity change) for each lr in `lrs`.

    n: training examples per run (default: all). general: evaluation texts for the damage
    (`apollo-fast train --general` format). max_damage: the largest acceptable relative perplexity increase
    (0.05 = +5%). settings.lr is ignored (the grid replaces it).
    """
    settings.check()
    stats.check()
    min_effect = check_delta("min_effect", min_effect)
    max_damage = check_finite("max_damage", max_damage, minimum=0.0)
    rates = sorted({check_finite("lrs (--lrs)", x, positive=True) for x in lrs})
    if not rates:
        raise ProbeError("lrs is empty")
    seed_list = check_seeds(seeds)
    handle = open_model(model, tokenizer, device=device, dtype=dtype)
    examples = load_train(train, handle)
    held_out = load_pairs(pairs, handle)
    size = len(examples) if n is None else int(n)
    if not 1 <= size <= len(examples):
        raise ProbeError(f"n (--n) must be in [1, {len(examples)}] (the training examples), got {n!r}")
    general_items = load_texts(general, handle) if general is not None else None
    conditions = [Condition(size, r, s) for r in rates for s in seed_list]
    base, base_general, results = run_grid(
        handle.load(),
        examples,
        held_out,
        conditions,
        settings,
        general=general_items,
        batch_size=batch_size,
        frozen_from=frozen_from,
        progress=progress,
    )
    base_nll, tokens = base_general if base_general is not None else (None, None)

    points = []
    for r in rates:
        runs = [x for x in results if x.condition.lr == r]
        effect = summarize_effect(base, runs, delta=min_effect, **stats.kw)
        point = {"lr": r, "steps": run_steps(replace(settings, lr=r), size), **effect.to_dict(), "_effect": effect}
        if general_items is not None:
            dmg = nll_change(base_nll, tokens, runs, **stats.kw)
            point.update(damage=dmg.value, damage_ci=dmg.as_list(), _damage=dmg)
        points.append(point)
    eligible = [p for p in points if general_items is None or p["_damage"].hi <= max_damage]
    effective = [p for p in eligible if p["_effect"].verdict == POSITIVE]
    best = max(effective, key=lambda p: (p["_effect"].margin_change.lo, -p["lr"]), default=None)
    best_lr = None if best is None else best["lr"]
    base_ppl = float(np.exp(base_nll.sum() / tokens.sum())) if general_items is not None else None
    data = {
        "model": handle.name,
        "n": size,
        "n_pairs": len(held_out),
        "n_general": None if general_items is None else len(general_items),
        "seeds": seed_list,
        "settings": {
            **{k: v for k, v in dataclasses.asdict(settings).items() if k != "lr"},  # the grid replaces settings.lr
            "min_effect": min_effect,
            "max_damage": max_damage,
            "level": stats.level,
            "n_boot": stats.n_boot,
            "boot_seed": stats.boot_seed,
        },
        "base": {
            "margin": float(base.margin.mean()),
            "preference": float((base.margin > 0).mean()),
            "general_ppl": base_ppl,
        },
        "points": [{k: v for k, v in p.items() if not k.startswith("_")} for p in points],
        "best_lr": best_lr,
        "runs": run_log(results),
        "rule": RULE.format(max_damage=100 * max_damage) if general_items is not None else RULE_NO_GENERAL,
    }
    return Report(
        "lr", data, _markdown(data, points, settings, stats, min_effect), {"lr.png": _plot(data, points, stats)}
    )


RULE = (
    "best lr: among the rates whose damage CI stays below +{max_damage:g}% general perplexity, the one with the "
    "highest lower effect-CI bound among those with a positive verdict (CI above zero, not within +-min-effect)"
)
RULE_NO_GENERAL = (
    "best lr: the rate with the highest lower effect-CI bound among those with a positive verdict (no general "
    "data given: damage not measured)"
)


def _markdown(data, points, settings: TrainSettings, stats: StatOptions, delta: float) -> str:
    budget = settings.budget
    general = data["n_general"] is not None
    lines = [
        "# apollo-fast probe lr",
        "",
        f"Model `{data['model']}`: n = {data['n']} training examples per run, {data['n_pairs']} held-out pairs, "
        f"{len(data['seeds'])} seeds per rate; each run {budget}, {settings.batch} example(s) per step, APOLLO "
        f"rank {settings.rank}.",
        "",
        f"Base model: mean margin {fmt(data['base']['margin'], 3, True)} nats"
        + (
            f"; general perplexity {fmt(data['base']['general_ppl'], 4)} on {data['n_general']} items."
            if general
            else "."
        ),
        "",
    ]
    header = ["lr", "steps", f"margin change, nats [{stats.pct} CI]", "prefers desired", "verdict"]
    if general:
        header.insert(4, "general perplexity change")
    rows = []
    for p in points:
        e = p["_effect"]
        row = [
            f"{p['lr']:g}" + (" **(best)**" if p["lr"] == data["best_lr"] else ""),
            str(p["steps"]),
            fmt_ci(e.margin_change),
            fmt_ci(e.preference, sign=False, pct=True),
            e.verdict,
        ]
        if general:
            row.insert(4, fmt_ci(p["_damage"], pct=True))
        rows.append(row)
    lines.append(table(header, rows))
    lines += [
        "",
        f"Rule: {data['rule']}. Best: **{data['best_lr'] if data['best_lr'] is not None else 'none'}**.",
        "",
        verdict_note(f"{delta:g} nats") + " (On the margin change.)",
        ci_note(stats, "seeds and items, independently"),
        "",
        "![lr](lr.png)",
        "",
    ]
    return "\n".join(lines)


def _plot(data, points, stats: StatOptions) -> bytes:
    general = data["n_general"] is not None
    fig, axes = new_figure(11 if general else 6, 4.2, ncols=2 if general else 1)
    lrs = np.array([p["lr"] for p in points])
    ax = axes[0]
    e = [p["_effect"].margin_change for p in points]
    ax.axhline(0, color="0.4", linewidth=0.8)
    ax.fill_between(lrs, [x.lo for x in e], [x.hi for x in e], color="tab:blue", alpha=0.25, label=f"{stats.pct} CI")
    ax.plot(lrs, [x.value for x in e], "o-", color="tab:blue", label="mean over seeds")
    for p in points:
        ax.plot([p["lr"]] * len(p["per_seed"]), p["per_seed"], ".", color="tab:blue", alpha=0.5)
    if data["best_lr"] is not None:
        ax.axvline(data["best_lr"], color="tab:green", linestyle="--", label=f"best lr {data['best_lr']:g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("margin change vs base (nats)")
    ax.set_title(f"behaviour effect (n = {data['n']})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if general:
        ax2 = axes[1]
        d = [p["_damage"] for p in points]
        ax2.axhline(0, color="0.4", linewidth=0.8)
        ax2.axhline(100 * data["settings"]["max_damage"], color="tab:red", linestyle=":", label="max damage")
        ax2.fill_between(lrs, [100 * x.lo for x in d], [100 * x.hi for x in d], color="tab:orange", alpha=0.25)
        ax2.plot(lrs, [100 * x.value for x in d], "o-", color="tab:orange", label="general perplexity change")
        ax2.set_xscale("log")
        ax2.set_xlabel("learning rate")
        ax2.set_ylabel("general perplexity change (%)")
        ax2.set_title("damage")
        ax2.grid(True, alpha=0.3)
        ax2.legend(fontsize=8)
    return png_bytes(fig)
