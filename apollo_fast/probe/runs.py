"""The experiment grid behind `dose` and `lr`: train from the base weights per condition, then measure.

A condition is (n examples, learning rate, seed, shuffled targets or not). Its examples are the first
n of a seeded permutation of the training set, so for one seed the subsets are nested (the n=8 run
sees the n=4 run's examples and four more). Each run starts from the base weights; after the grid
the model holds the base weights again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from torch import nn

from .inputs import Pair
from .scoring import Margins, item_nll, pair_logprobs
from .stats import Interval, two_way_bootstrap, verdict
from .training import TrainSettings, restore, run_steps, shuffle_targets, snapshot, train_run

__all__ = [
    "Condition",
    "RunResult",
    "run_grid",
    "run_log",
    "subset",
    "EffectSummary",
    "summarize_effect",
    "nll_change",
]


@dataclass(frozen=True)
class Condition:
    n: int
    lr: float
    seed: int
    shuffled: bool = False


@dataclass
class RunResult:
    condition: Condition
    margins: Margins
    losses: list[float]
    nll: np.ndarray | None = None  # per general-evaluation item, summed over its tokens


def subset(n_total: int, n: int, seed: int) -> list[int]:
    """The first n indices of a seeded permutation: nested in n for one seed."""
    perm = np.random.default_rng(np.random.SeedSequence([int(seed), 3])).permutation(n_total)
    return perm[:n].tolist()


def run_grid(
    model: nn.Module,
    examples: Sequence[Any],
    pairs: Sequence[Pair],
    conditions: Sequence[Condition],
    settings: TrainSettings,
    *,
    general: Sequence[Any] | None = None,
    batch_size: int = 16,
    frozen_from: int = 256,
    progress: bool = True,
) -> tuple[Margins, tuple[np.ndarray, np.ndarray] | None, list[RunResult]]:
    """Base measurements, then one training run per condition.

    Returns the base margins, the base's (NLL, tokens) per general item (None without general data), and the runs.
    """
    from tqdm.auto import tqdm

    score = dict(batch_size=batch_size, frozen_from=frozen_from, progress=progress)
    base = pair_logprobs(model, pairs, desc="score base", **score)
    base_general = item_nll(model, general, batch_size=batch_size, progress=progress) if general else None
    snap = snapshot(model)
    total = sum(run_steps(replace(settings, lr=c.lr), c.n) for c in conditions)
    results = []
    bar = tqdm(total=total, desc="train runs", unit="step", disable=not progress)
    try:
        for c in conditions:
            restore(model, snap)
            chosen = [examples[i] for i in subset(len(examples), c.n, c.seed)]
            if c.shuffled:
                chosen = shuffle_targets(chosen, c.seed)
            bar.set_description(f"n={c.n} lr={c.lr:g} seed={c.seed}{' shuffled' if c.shuffled else ''}")
            losses = train_run(model, chosen, replace(settings, lr=c.lr), c.seed, bar)
            margins = pair_logprobs(model, pairs, desc="score", **score)
            nll = item_nll(model, general, batch_size=batch_size)[0] if general else None
            results.append(RunResult(c, margins, losses, nll))
    finally:
        bar.close()
        restore(model, snap)
    return base, base_general, results


def run_log(results: Sequence[RunResult]) -> list[dict[str, Any]]:
    """Per run: its condition and training loss at the first and last step (did it train at all? diverge?)."""
    return [
        {
            "n": r.condition.n,
            "lr": r.condition.lr,
            "seed": r.condition.seed,
            "shuffled": r.condition.shuffled,
            "steps": len(r.losses),
            "first_loss": r.losses[0],
            "last_loss": r.losses[-1],
        }
        for r in results
    ]


@dataclass
class EffectSummary:
    """The behaviour effect of a set of runs (one per seed) against the base, on the same held-out pairs."""

    margin_change: Interval  # mean over seeds and pairs of margin_after - margin_base (nats)
    preference: Interval  # share of pairs preferring the desired continuation after training
    preference_change: Interval  # ... minus the base's share
    verdict: str
    per_seed: list[float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "margin_change": self.margin_change.value,
            "ci": self.margin_change.as_list(),
            "preference": self.preference.value,
            "preference_ci": self.preference.as_list(),
            "preference_change": self.preference_change.value,
            "preference_change_ci": self.preference_change.as_list(),
            "verdict": self.verdict,
            "per_seed": self.per_seed,
        }


def summarize_effect(
    base: Margins, runs: Sequence[RunResult], *, delta: float, level: float, n_boot: int, seed: int
) -> EffectSummary:
    after = np.stack([r.margins.margin for r in runs])  # [S, P]
    change = after - base.margin[None]
    pref_after = (after > 0).astype(np.float64)
    pref_change = pref_after - (base.margin > 0)[None]
    kw = dict(n_boot=n_boot, level=level, seed=seed)
    ci = two_way_bootstrap(change, **kw)
    return EffectSummary(
        margin_change=ci,
        preference=two_way_bootstrap(pref_after, **kw),
        preference_change=two_way_bootstrap(pref_change, **kw),
        verdict=verdict(ci, delta),
        per_seed=change.mean(1).tolist(),
    )


def nll_change(
    base_nll: np.ndarray, tokens: np.ndarray, runs: Sequence[RunResult], *, level: float, n_boot: int, seed: int
) -> Interval:
    """Relative perplexity change exp((mean over seeds of NLL_after - NLL_base) / tokens) - 1, two-way bootstrap."""
    diff = np.stack([r.nll for r in runs]) - base_nll[None]  # [S, I] nats per item

    def stat(sub: np.ndarray, tok: np.ndarray) -> np.ndarray:  # ratio of sums over the resampled items
        return np.expm1(sub.sum(-1).mean(-1) / tok.sum(-1))

    return two_way_bootstrap(diff, weights=tokens, stat=stat, n_boot=n_boot, level=level, seed=seed)
