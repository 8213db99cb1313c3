"""Uncertainty for the probes: percentile bootstrap CIs (fixed seed), AUC, and the verdict rule.

Every interval is a percentile bootstrap with a fixed generator seed, so a report is reproducible.
Effects measured on several training seeds and the same evaluation items use the two-way bootstrap
(seeds and items resampled independently), so the interval carries both the training randomness
and the finite evaluation set.

The verdict separates "no effect" from "not enough data to tell" with a smallest effect of interest
`delta` (equivalence testing): an interval inside [-delta, +delta] around the null value is no effect
(whatever effect there is, is smaller than delta); otherwise an interval entirely above the null value
(or below) is an effect; an interval that holds the null value and reaches beyond +-delta cannot
tell the two apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Interval",
    "bootstrap",
    "two_way_bootstrap",
    "interval",
    "verdict",
    "auc",
    "comparisons",
    "paired_auc_bootstrap",
    "VERDICTS",
]

POSITIVE, NEGATIVE, NONE, UNCLEAR = "positive", "negative", "no effect", "not enough data to tell"
VERDICTS = (POSITIVE, NEGATIVE, NONE, UNCLEAR)


@dataclass(frozen=True)
class Interval:
    """A point estimate and its (level) percentile-bootstrap interval."""

    value: float
    lo: float
    hi: float
    level: float

    def excludes(self, null: float = 0.0) -> bool:
        return self.lo > null or self.hi < null

    def as_list(self) -> list[float]:
        return [self.lo, self.hi]


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(int(seed)))


def interval(value: float, replicates: np.ndarray, level: float) -> Interval:
    """Percentile interval of bootstrap replicates around the point estimate `value`."""
    reps = np.asarray(replicates, dtype=np.float64)
    reps = reps[np.isfinite(reps)]
    if reps.size == 0:
        return Interval(float(value), float("nan"), float("nan"), level)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(reps, [tail, 1.0 - tail])
    return Interval(float(value), float(lo), float(hi), level)


def bootstrap(
    columns: tuple[np.ndarray, ...] | np.ndarray,
    stat: Callable[..., np.ndarray],
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Bootstrap over items: `columns` are per-item arrays of equal length (resampled together, so
    paired data stay paired); stat(*columns) -> scalar, and stat(*[c[idx] for c]) with idx [B, n]
    -> [B] replicates (write stat with axis=-1 reductions)."""
    cols = (columns,) if isinstance(columns, np.ndarray) else tuple(columns)
    cols = tuple(np.asarray(c, dtype=np.float64) for c in cols)
    n = cols[0].shape[0]
    value = float(stat(*cols))
    if n < 2:
        return Interval(value, float("nan"), float("nan"), level)
    idx = _rng(seed).integers(0, n, size=(n_boot, n))
    return interval(value, stat(*(c[idx] for c in cols)), level)


def two_way_bootstrap(
    matrix: np.ndarray,
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
    weights: np.ndarray | None = None,
    stat: Callable[..., np.ndarray] | None = None,
) -> Interval:
    """Bootstrap of the mean of a [seeds, items] matrix, resampling seeds and items independently.

    With one seed only the items are resampled (the interval then omits the training randomness).
    stat(sub) maps resampled matrices [B, S, P] to [B] (default: the mean); stat(matrix[None]) is the
    estimate. With per-item `weights` [P] (resampled with their items) it is called as stat(sub, w [B, P]).
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"two_way_bootstrap needs a [seeds, items] matrix, got shape {m.shape}")
    w = None if weights is None else np.asarray(weights, dtype=np.float64)
    stat = stat or (lambda sub, *_: sub.mean(axis=(-2, -1)))
    call = (lambda sub, pi: stat(sub)) if w is None else (lambda sub, pi: stat(sub, w[pi]))
    value = float(call(m[None], np.arange(m.shape[1])[None])[0])
    s, p = m.shape
    if p < 2:
        return Interval(value, float("nan"), float("nan"), level)
    rng = _rng(seed)
    out = np.empty(n_boot)
    chunk = max(1, 2_000_000 // max(1, s * p))  # bound the [B, S, P] gather's memory
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        si = rng.integers(0, s, size=(b, s)) if s > 1 else np.zeros((b, 1), dtype=np.int64)
        pi = rng.integers(0, p, size=(b, p))
        out[start : start + b] = call(m[si[:, :, None], pi[:, None, :]], pi)
    return interval(value, out, level)


def verdict(ci: Interval, delta: float, null: float = 0.0) -> str:
    """'no effect' when the interval lies within null +- delta (any effect is smaller than the smallest effect
    of interest, even if the interval excludes `null`); otherwise 'positive' / 'negative' when it excludes
    `null` on that side; otherwise 'not enough data to tell'."""
    if not (np.isfinite(ci.lo) and np.isfinite(ci.hi)):
        return UNCLEAR
    if null - delta <= ci.lo and ci.hi <= null + delta:
        return NONE
    if ci.lo > null:
        return POSITIVE
    if ci.hi < null:
        return NEGATIVE
    return UNCLEAR


def comparisons(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """[n, m] matrix of 1 where pos[i] > neg[j], 1/2 where equal, 0 below: its mean is the AUC."""
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    return (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Area under the ROC curve: P(a positive scores above a negative), ties counted half (Mann-Whitney)."""
    return float(comparisons(pos, neg).mean())


def paired_auc_bootstrap(
    pos: np.ndarray, neg: np.ndarray, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> Interval:
    """AUC of pos vs neg where pos[i], neg[i] come from the same pair: pairs are resampled together."""
    c = comparisons(pos, neg)
    n = c.shape[0]
    value = float(c.mean())
    if n < 2:
        return Interval(value, float("nan"), float("nan"), level)
    idx = _rng(seed).integers(0, n, size=(n_boot, n))
    reps = np.empty(n_boot)
    chunk = max(1, 4_000_000 // (n * n))
    for start in range(0, n_boot, chunk):
        sub = idx[start : start + chunk]
        reps[start : start + chunk] = c[sub[:, :, None], sub[:, None, :]].mean(axis=(1, 2))
    return interval(value, reps, level)
