"""TIES-merging and DARE on task vectors, lazily, one tensor at a time, in bounded memory.

TIES (Yadav et al. 2023, arXiv 2306.01708): for task vectors tau_1..tau_n,
  1. trim: keep the k = round(density * numel) entries of largest magnitude of each tau_i (over
     the whole model, as the paper does, or per tensor, as mergekit does); ties at the k-th
     magnitude are broken by position (tensor order, then flat index), so exactly k survive;
  2. elect: per entry, the sign of sum_i w_i * trimmed_i ('sum': total magnitude decides) or of
     sum_i sign(w_i * trimmed_i) ('count': a majority vote, each vector one vote);
  3. disjoint mean: average w_i * trimmed_i over the vectors whose entry is non-zero and has the
     elected sign, divided by the sum of their weights (the plain mean when all w_i = 1);
  4. scale by lambda.
DARE (Yu et al. 2023, arXiv 2311.03099): drop each entry with probability p, scale the rest by 1/(1-p).

`ties_reference` / `dare_reference` are the readable specification on one tensor; `ties_merge`
computes the same thing streaming (radix-select thresholds, element-wise work in chunks).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..checks import finite_number
from .task_vector import TaskVector, _check_same_base, _check_same_keys

__all__ = [
    "ties_merge",
    "dare",
    "ties_reference",
    "ties_combine",
    "dare_reference",
    "kth_largest_magnitude",
    "model_trim_thresholds",
    "TRIM_SCOPES",
    "SIGN_METHODS",
]

TRIM_SCOPES = ("model", "tensor")
SIGN_METHODS = ("sum", "count")
CHUNK = 1 << 22  # elements per chunk of element-wise work (bounds temporaries to ~16 MB per tensor)


def _keep_count(n: int, density: float) -> int:
    return min(n, max(0, int(round(density * n))))


# ------------------------------------------------------------------------------- specification
def ties_combine(
    trimmed: torch.Tensor, weights: Sequence[float] | torch.Tensor | None = None, sign: str = "sum", lam: float = 1.0
) -> torch.Tensor:
    """Steps 2-4 of TIES on already-trimmed deltas (n_vectors, *shape) fp32 -> (*shape) fp32."""
    if sign not in SIGN_METHODS:
        raise ValueError(f"sign must be one of {SIGN_METHODS}, got {sign!r}")
    n = trimmed.shape[0]
    view = (n,) + (1,) * (trimmed.dim() - 1)
    w = torch.ones(n) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    w = w.reshape(view).to(trimmed.device)
    weighted = trimmed.float() * w
    if sign == "sum":
        elected = torch.sign(weighted.sum(0))
    else:
        elected = torch.sign(torch.sign(weighted).sum(0))
    agree = (torch.sign(weighted) == elected) & (weighted != 0)
    num = (weighted * agree).sum(0)
    den = (w * agree).sum(0)
    return torch.where(den != 0, num / torch.where(den != 0, den, torch.ones_like(den)), 0.0) * lam


def ties_reference(
    deltas: torch.Tensor,
    density: float,
    weights: Sequence[float] | torch.Tensor | None = None,
    sign: str = "sum",
    lam: float = 1.0,
) -> torch.Tensor:
    """TIES on one tensor, trimmed per tensor. deltas: (n_vectors, *shape) fp32 -> (*shape) fp32.

    Keeps the k = round(density * numel) largest magnitudes of each vector; among equal magnitudes
    the lower flat index wins (a stable sort).
    """
    d = deltas.float()
    flat = d.reshape(d.shape[0], -1)
    k = _keep_count(flat.shape[1], density)
    trimmed = torch.zeros_like(flat)
    for i in range(flat.shape[0]):
        top = torch.sort(flat[i].abs(), descending=True, stable=True).indices[:k]
        trimmed[i, top] = flat[i, top]
    return ties_combine(trimmed.reshape(d.shape), weights, sign, lam)


def kth_largest_magnitude(x: torch.Tensor, k: int) -> float:
    """The k-th largest |x| (k >= 1); +inf when k == 0 (keep nothing). x: any shape."""
    return _select([x], k).threshold


# ------------------------------------------------------------------------------- radix select
@dataclass
class _Selection:
    """The k-th largest magnitude and how many entries equal to it to keep (-1: all of them)."""

    threshold: float
    ties_kept: int


def _bits(t: torch.Tensor) -> torch.Tensor:
    """|t| in fp32 as int32 bit patterns: for non-negative floats the integer order is the float order."""
    return t.detach().reshape(-1).float().abs().view(torch.int32)


_INF_BUCKET = 0x7F800000 >> 16  # buckets >= this hold inf and NaN


def _count_at_or_above(hist: torch.Tensor) -> np.ndarray:
    """Reverse cumulative counts of a histogram (numpy: these small arrays are not worth torch's dispatch)."""
    return np.cumsum(hist.numpy()[::-1])[::-1]


def _chunks(t: torch.Tensor) -> Iterable[torch.Tensor]:
    flat = t.reshape(-1)
    for s in range(0, flat.numel(), CHUNK):
        yield flat[s : s + CHUNK]


def _select(tensors: Iterable[torch.Tensor] | Sequence[torch.Tensor], k: int, again=None) -> _Selection:
    """Exact k-th largest |x| over all tensors, in two counting passes (top 16 bits, then low 16 bits
    inside the bucket holding it). `again()` re-yields the tensors for pass 2 (default: reuse them)."""
    if k <= 0:
        return _Selection(float("inf"), 0)
    hi = torch.zeros(1 << 15, dtype=torch.int64)  # the sign bit is 0, so the top 16 bits are < 2**15
    n = 0
    for t in tensors:
        for c in _chunks(t):
            hi += torch.bincount(_bits(c) >> 16, minlength=1 << 15)
            n += c.numel()
    if int(hi[_INF_BUCKET:].sum()):
        raise ValueError("task vector holds inf or NaN; cannot trim by magnitude")
    if k >= n:
        return _Selection(0.0, -1)  # keep everything (-1: no tie limit)
    above = _count_at_or_above(hi)  # above[b] = count in buckets >= b
    bucket = int(np.flatnonzero(above >= k).max())
    higher = int(above[bucket + 1]) if bucket + 1 < above.size else 0
    rank = k - higher  # the k-th largest is the rank-th largest inside the bucket
    lo = torch.zeros(1 << 16, dtype=torch.int64)
    for t in again() if again is not None else tensors:
        for c in _chunks(t):
            b = _bits(c)
            sel = b[(b >> 16) == bucket]
            if sel.numel():
                lo += torch.bincount(sel & 0xFFFF, minlength=1 << 16)
    above_lo = _count_at_or_above(lo)
    low = int(np.flatnonzero(above_lo >= rank).max())
    strictly_above = higher + (int(above_lo[low + 1]) if low + 1 < above_lo.size else 0)
    value = torch.tensor([(bucket << 16) | low], dtype=torch.int32).view(torch.float32).item()
    ties = k - strictly_above
    return _Selection(value, -1 if ties == int(lo[low]) else ties)  # -1: every tie is kept, no limit needed


def model_trim_thresholds(vectors: Sequence[TaskVector], density: float, progress: bool = False) -> list[float]:
    """Per vector, the k-th largest |entry| over ALL its tensors (k = round(density * numel))."""
    return [s.threshold for s in _model_selections(vectors, density, progress)]


def _model_selections(vectors: Sequence[TaskVector], density: float, progress: bool) -> list[_Selection]:
    from tqdm.auto import tqdm

    out = []
    for i, v in enumerate(vectors):

        def read(p: int, v=v, i=i):
            for key in tqdm(v.keys(), desc=f"trim pass {p}/2 (vector {i})", disable=not progress, leave=False):
                yield v[key]

        out.append(_select(read(1), _keep_count(v.numel(), density), lambda read=read: read(2)))
    return out


def _trim(c: torch.Tensor, thr: float, ties_left: int) -> tuple[torch.Tensor, int]:
    """Keep |c| > thr and the first `ties_left` entries with |c| == thr (flat order; -1 = all of them).

    c: 1-D fp32 chunk. Returns the trimmed chunk and the ties still allowed after it."""
    a = c.abs()
    keep = a > thr
    if ties_left != 0:
        eq = a == thr
        if ties_left > 0:
            n_eq = int(eq.sum())
            if n_eq > ties_left:  # only then do positions decide
                eq &= torch.cumsum(eq, 0) <= ties_left
                n_eq = ties_left
            ties_left -= n_eq
        keep |= eq
    return torch.where(keep, c, 0.0), ties_left


def _combine_fast(trimmed: torch.Tensor, w: list[float], sign: str, lam: float) -> torch.Tensor:
    """ties_combine for 2-D (n_vectors, chunk) with fewer passes over memory (same result)."""
    unit = all(x == 1.0 for x in w)
    weighted = trimmed if unit else trimmed * torch.tensor(w, dtype=torch.float32).unsqueeze(1)
    elected = torch.sign(weighted.sum(0) if sign == "sum" else torch.sign(weighted).sum(0))
    agree = weighted * elected > 0  # non-zero and of the elected sign
    num = torch.where(agree, weighted, 0.0).sum(0)
    den = agree.sum(0, dtype=torch.float32) if unit else (agree * torch.tensor(w).unsqueeze(1)).sum(0)
    out = num.div_(den.clamp_(min=1e-30))  # num is 0 wherever den is 0
    return out.mul_(lam) if lam != 1.0 else out


def ties_merge(
    vectors: Sequence[TaskVector],
    density: float = 0.2,
    lam: float = 1.0,
    weights: Sequence[float] | None = None,
    trim: str = "model",
    sign: str = "sum",
    progress: bool = False,
) -> TaskVector:
    """TIES-merge task vectors into one (lazy). Defaults are the paper's: keep the top 20% of each
    vector's magnitudes over the whole model, elect signs by total magnitude, lambda 1.

    trim='tensor' keeps the top `density` of each tensor instead (as mergekit does); sign='count'
    elects by majority vote. With trim='model' the thresholds are computed here (two read passes
    over every vector, plus one more, stopped early, for a vector whose threshold magnitude is tied
    beyond what k allows: those ties go to the earliest tensors in key order); the merged tensors
    are then computed on access, in any order.
    """
    vectors = list(vectors)
    if not vectors:
        raise ValueError("ties_merge needs at least one task vector")
    density = finite_number("density", density, minimum=0.0, maximum=1.0)
    lam = finite_number("lambda", lam)
    if trim not in TRIM_SCOPES:
        raise ValueError(f"trim must be one of {TRIM_SCOPES}, got {trim!r}")
    if sign not in SIGN_METHODS:
        raise ValueError(f"sign must be one of {SIGN_METHODS}, got {sign!r}")
    w = [1.0] * len(vectors) if weights is None else [finite_number("TIES weight", x, minimum=0.0) for x in weights]
    if len(w) != len(vectors):
        raise ValueError(f"{len(w)} weights for {len(vectors)} vectors")
    _check_same_keys(vectors, "ties")
    _check_same_base(vectors, "ties")
    keys = vectors[0].keys()
    model_sel: list[_Selection] | None = None
    tie_budget: dict[str, list[int]] = {}
    if trim == "model" and density < 1.0:
        model_sel = _model_selections(vectors, density, progress)
        tie_budget = _tie_budgets(vectors, model_sel, keys)

    def compute(k: str) -> torch.Tensor:
        xs = [v[k].reshape(-1) for v in vectors]
        plan: list[tuple[float, int]] = []  # per vector: threshold, ties still allowed
        for i, x in enumerate(xs):
            if density >= 1.0:
                plan.append((0.0, -1))
            elif model_sel is not None:
                plan.append((model_sel[i].threshold, tie_budget[k][i]))
            else:
                sel = _select([x], _keep_count(x.numel(), density))
                plan.append((sel.threshold, sel.ties_kept))
        out = torch.empty(vectors[0].shapes[k], dtype=torch.float32)
        flat_out = out.reshape(-1)
        for s in range(0, flat_out.numel(), CHUNK):
            rows = []
            for i, x in enumerate(xs):
                c, left = _trim(x[s : s + CHUNK].float(), *plan[i])
                plan[i] = (plan[i][0], left)
                rows.append(c)
            flat_out[s : s + CHUNK] = _combine_fast(torch.stack(rows), w, sign, lam)
        return out

    method = {
        "op": "ties",
        "density": density,
        "lambda": lam,
        "weights": w,
        "trim": trim,
        "sign": sign,
        "inputs": [v.method for v in vectors],
    }
    if model_sel is not None:
        method["thresholds"] = [s.threshold for s in model_sel]
    return TaskVector(dict(vectors[0].shapes), compute, vectors[0].base_model, method)


def _tie_budgets(vectors: Sequence[TaskVector], sels: list[_Selection], keys: list[str]) -> dict[str, list[int]]:
    """Per tensor and vector, how many entries equal to the threshold to keep (earliest tensors first).

    Costs one more read pass (until the budget is spent) only for a vector whose k-th largest
    magnitude occurs more often than k allows (common with bf16 checkpoints)."""
    budgets = {k: [-1] * len(vectors) for k in keys}
    for i, (v, sel) in enumerate(zip(vectors, sels, strict=True)):
        if sel.ties_kept < 0:
            continue
        left = sel.ties_kept
        for k in keys:
            if left == 0:
                budgets[k][i] = 0
                continue
            eq = sum(int((c.float().abs() == sel.threshold).sum()) for c in _chunks(v[k]))
            budgets[k][i] = min(eq, left)
            left -= budgets[k][i]
    return budgets


def _key_seed(seed: int, key: str) -> int:
    """A per-tensor seed from the user's seed and the tensor's name (independent of access order)."""
    return (int(seed) * 1_000_003 + zlib.crc32(key.encode())) % (2**63 - 1)


def dare_reference(x: torch.Tensor, p: float, generator: torch.Generator, rescale: bool = True) -> torch.Tensor:
    """Drop each entry with probability p (uniform draws from `generator`), scale survivors by 1/(1-p)."""
    keep = torch.rand(x.shape, generator=generator) >= p
    out = torch.where(keep, x.float(), torch.zeros((), dtype=torch.float32))
    return out / (1.0 - p) if rescale else out


def dare(vector: TaskVector, p: float, seed: int = 0, rescale: bool = True) -> TaskVector:
    """DARE (lazy): drop entries with probability p, rescale the rest by 1/(1-p); seeded per tensor name.

    The mask of tensor `name` depends only on (seed, name), so results do not depend on the order
    tensors are read. Compose with TIES as `ties_merge([dare(a, p), dare(b, p)], density=1.0)`.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"DARE drop probability p must be in [0, 1), got {p}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")

    def compute(k: str) -> torch.Tensor:
        gen = torch.Generator().manual_seed(_key_seed(seed, k))
        return dare_reference(vector[k], p, gen, rescale)

    method = {"op": "dare", "p": p, "seed": seed, "rescale": rescale, "input": vector.method}
    return TaskVector(dict(vector.shapes), compute, vector.base_model, method)
