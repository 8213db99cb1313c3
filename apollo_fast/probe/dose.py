"""`probe dose`: how many examples move a behaviour.

For each n in a list and each seed: train the base model on n examples (the first n of a seeded
permutation: nested subsets), then score held-out pairs. The effect at n is the mean over seeds and
pairs of the change of the log-prob margin log p(desired | prompt) - log p(undesired | prompt) against
the base model, with a two-way bootstrap CI (seeds and pairs resampled). The null baseline trains the
same way on the same examples with their targets permuted among them. The answer is the smallest n
with a positive verdict: its CI lies above zero (and not within +-min_effect).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import nn

from .common import DEFAULT_STATS, StatOptions, check_delta, check_ints, check_seeds, ci_note, verdict_note
from .inputs import ProbeError, load_pairs, load_train, open_model
from .report import Report, fmt, fmt_ci, new_figure, png_bytes, table
from .runs import Condition, EffectSummary, run_grid, run_log, summarize_effect
from .stats import POSITIVE
from .training import DEFAULT_TRAINING, TrainSettings, run_steps

__all__ = ["dose", "NULL_CHOICES"]

NULL_CHOICES = ("largest", "all", "none")


def dose(
    model: str | os.PathLike | nn.Module,
    train: str | os.PathLike | Sequence[Any],
    pairs: str | os.PathLike | Sequence[Any],
    *,
    ns: Sequence[int] = (8, 16, 32, 64, 128),
    seeds: int | Sequence[int] = 3,
    settings: TrainSettings = DEFAULT_TRAINING,
    null: str = "largest",
    min_effect: float = 0.1,
    stats: StatOptions = DEFAULT_STATS,
    tokenizer: Any = None,
    device: str | None = None,
    dtype: str = "auto",
    batch_size: int = 16,
    frozen_from: int = 256,
    progress: bool = True,
) -> Report:
    """Effect of n training examples on the held-out margin, for each n in `ns` (see the module doc).

    `model` is a model folder or a module (trained in place per run; it ends with its base weights).
    `train`: an `apollo-fast train --data` file or BehaviourExamples; `pairs`: held-out pairs.
    null: shuffled-target runs at the largest n ('largest'), at every n ('all') or none.
    min_effect: the smallest margin change (nats) that matters: a CI inside +-min_effect is "no effect".
    """
    settings.check()
    stats.check()
    min_effect = check_delta("min_effect", min_effect)
    if null not in NULL_CHOICES:
        raise ProbeError(f"null must be one of {NULL_CHOICES}, got {null!r}")
    seed_list = check_seeds(seeds)
    handle = open_model(model, tokenizer, device=device, dtype=dtype)
    examples = load_train(train, handle)
    held_out = load_pairs(pairs, handle)
    sizes = check_ints("ns (--n)", ns, maximum=len(examples))
    null_sizes = {"largest": sizes[-1:], "all": sizes, "none": []}[null]
    conditions = [Condition(n, settings.lr, s) for n in sizes for s in seed_list]
    conditions += [Condition(n, settings.lr, s, shuffled=True) for n in null_sizes for s in seed_list]
    base, _, results = run_grid(
        handle.load(),
        examples,
        held_out,
        conditions,
        settings,
        batch_size=batch_size,
        frozen_from=frozen_from,
        progress=progress,
    )

    def effect(n: int, shuffled: bool) -> EffectSummary:
        runs = [r for r in results if r.condition.n == n and r.condition.shuffled == shuffled]
        return summarize_effect(base, runs, delta=min_effect, **stats.kw)

    points = [(n, effect(n, False)) for n in sizes]
    nulls = [(n, effect(n, True)) for n in null_sizes]
    smallest = next((n for n, e in points if e.verdict == POSITIVE), None)
    data = {
        "model": handle.name,
        "n_train": len(examples),
        "n_pairs": len(held_out),
        "seeds": seed_list,
        "settings": {
            **dataclasses.asdict(settings),
            "min_effect": min_effect,
            "level": stats.level,
            "n_boot": stats.n_boot,
            "boot_seed": stats.boot_seed,
            "null": null,
        },
        "base": {"margin": float(base.margin.mean()), "preference": float((base.margin > 0).mean())},
        "points": [{"n": n, "steps": run_steps(settings, n), **e.to_dict()} for n, e in points],
        "null": [{"n": n, "shuffled_targets": True, **e.to_dict()} for n, e in nulls],
        "smallest_n": smallest,
        "runs": run_log(results),
    }
    return Report(
        "dose",
        data,
        _markdown(data, points, nulls, settings, stats, min_effect),
        {"dose.png": _plot(data, points, nulls, min_effect, stats)},
    )


def _markdown(data, points, nulls, settings: TrainSettings, stats: StatOptions, delta: float) -> str:
    budget = settings.budget
    lines = [
        "# apollo-fast probe dose",
        "",
        f"Model `{data['model']}`: {data['n_train']} training examples, {data['n_pairs']} held-out pairs, "
        f"{len(data['seeds'])} seeds per size; each run {budget}, lr {settings.lr:g}, {settings.batch} example(s) "
        f"per step, APOLLO rank {settings.rank}, from the base weights.",
        "",
        f"Base model: mean margin {fmt(data['base']['margin'], 3, True)} nats; prefers the desired continuation "
        f"in {100 * data['base']['preference']:.0f}% of the pairs.",
        "",
    ]
    rows = []
    for label, n, e in [(str(n), n, e) for n, e in points] + [
        (f"null: n={n}, targets shuffled", n, e) for n, e in nulls
    ]:
        rows.append(
            [
                label,
                str(run_steps(settings, n)),
                fmt_ci(e.margin_change),
                fmt_ci(e.preference, sign=False, pct=True),
                fmt_ci(e.preference_change, pct=True),
                e.verdict,
            ]
        )
    lines.append(
        table(["n", "steps", f"margin change, nats [{stats.pct} CI]", "prefers desired", "vs base", "verdict"], rows)
    )
    lines.append("")
    if data["smallest_n"] is None:
        lines.append(f"No n moved the margin detectably: no {stats.pct} CI lies above zero (beyond +-{delta:g}).")
    else:
        lines.append(
            f"Smallest n with a positive verdict (its {stats.pct} CI lies above zero): **{data['smallest_n']}**."
        )
    if any(e.verdict == POSITIVE for _, e in nulls):
        lines.append(
            "The shuffled-target null moves the margin too: part of the effect comes from training on "
            "these tokens at all, not from the context-to-target link."
        )
    lines += [
        "",
        verdict_note(f"{delta:g} nats"),
        ci_note(stats, "seeds and pairs, independently") + " Margin: log p(desired | prompt) - log p(undesired | "
        "prompt), summed over each continuation's tokens.",
        "",
        "![dose](dose.png)",
        "",
    ]
    return "\n".join(lines)


def _plot(data, points, nulls, delta: float, stats: StatOptions) -> bytes:
    fig, (ax, ax2) = new_figure(11, 4.2, ncols=2)
    ns = np.array([n for n, _ in points], dtype=float)
    mid = np.array([e.margin_change.value for _, e in points])
    lo = np.array([e.margin_change.lo for _, e in points])
    hi = np.array([e.margin_change.hi for _, e in points])
    ax.axhspan(-delta, delta, color="0.85", label=f"|change| < {delta:g} (no effect)")
    ax.axhline(0, color="0.4", linewidth=0.8)
    ax.fill_between(ns, lo, hi, color="tab:blue", alpha=0.25, label=f"{stats.pct} CI")
    ax.plot(ns, mid, "o-", color="tab:blue", label="mean over seeds")
    for n, e in points:
        ax.plot([n] * len(e.per_seed), e.per_seed, ".", color="tab:blue", alpha=0.5)
    for n, e in nulls:
        err = [[e.margin_change.value - e.margin_change.lo], [e.margin_change.hi - e.margin_change.value]]
        ax.errorbar(
            [n * 1.06],
            [e.margin_change.value],
            yerr=err,
            fmt="x",
            color="tab:red",
            capsize=3,
            label="null (shuffled targets)" if n == nulls[0][0] else None,
        )
    if data["smallest_n"] is not None:
        ax.axvline(
            data["smallest_n"],
            color="tab:green",
            linestyle="--",
            linewidth=1,
            label=f"smallest n = {data['smallest_n']}",
        )
    _n_axis(ax, ns)
    ax.set_ylabel("margin change vs base (nats)")
    ax.set_title("behaviour effect")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    pm = np.array([e.preference.value for _, e in points])
    plo = np.array([e.preference.lo for _, e in points])
    phi = np.array([e.preference.hi for _, e in points])
    ax2.fill_between(ns, 100 * plo, 100 * phi, color="tab:purple", alpha=0.25)
    ax2.plot(ns, 100 * pm, "o-", color="tab:purple", label="after training")
    ax2.axhline(100 * data["base"]["preference"], color="0.4", linestyle="--", label="base model")
    _n_axis(ax2, ns)
    ax2.set_ylim(-2, 102)
    ax2.set_ylabel("pairs preferring desired (%)")
    ax2.set_title("preference rate")
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=8)
    return png_bytes(fig)


def _n_axis(ax, ns: np.ndarray) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns)
    ax.set_xticklabels([str(int(n)) for n in ns])
    ax.minorticks_off()
    ax.set_xlabel("training examples n")
