"""TIES-merging and DARE on task vectors, lazily, one tensor at a time.

TIES (Yadav et al. 2023, arXiv 2306.01708): for task vectors tau_1..tau_n,
  1. trim: keep each tau_i's entries of the largest magnitude (a fraction `density`), zero the rest;
  2. elect: per entry, the sign of sum_i w_i * trimmed_i ('sum': total magnitude decides) or of
     sum_i sign(w_i * trimmed_i) ('count': a majority vote, each vector one vote);
  3. disjoint mean: average w_i * trimmed_i over the vectors whose entry is non-zero and has the
     elected sign, divided by the sum of their weights (the plain mean when all w_i = 1);
  4. scale by lambda.
DARE (Yu et al. 2023, arXiv 2311.03099): drop each entry with probability p, scale the rest by 1/(1-p).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch

from .task_vector import TaskVector, _check_same_base, _check_same_keys

__all__ = [
    "ties_merge",
    "dare",
    "ties_reference",
    "dare_reference",
    "kth_largest_magnitude",
    "model_trim_thresholds",
    "TRIM_SCOPES",
    "SIGN_METHODS",
]

TRIM_SCOPES = ("model", "tensor")
SIGN_METHODS = ("sum", "count")


def _keep_count(n: int, density: float) -> int:
    return min(n, max(0, int(round(density * n))))


def kth_largest_magnitude(x: torch.Tensor, k: int) -> float:
    """The k-th largest |x| (k >= 1); +inf when k == 0 (keep nothing). x: any shape."""
    n = x.numel()
    if k <= 0:
        return float("inf")
    if k >= n:
        return 0.0
    return torch.kthvalue(x.detach().reshape(-1).abs().float(), n - k + 1).values.item()


def _magnitude_bits(t: torch.Tensor) -> torch.Tensor:
    """|t| in fp32 as int32 bit patterns: for non-negative floats the integer order is the float order."""
    a = t.detach().reshape(-1).float().abs()
    if not torch.isfinite(a).all():
        raise ValueError("task vector holds inf or NaN; cannot trim by magnitude")
    return a.view(torch.int32)


def model_trim_thresholds(
    vectors: Sequence[TaskVector], density: float, progress: bool = False
) -> list[float]:
    """Per vector, the k-th largest |entry| over ALL its tensors (k = round(density * numel)).

    Exact, with bounded memory: a two-pass radix select on the fp32 bit patterns (pass 1 counts
    the top 16 bits, pass 2 the low 16 bits inside the bucket that holds the k-th largest). Each
    pass reads every tensor of every vector once.
    """
    from tqdm.auto import tqdm

    out = []
    for i, v in enumerate(vectors):
        n = v.numel()
        k = _keep_count(n, density)
        if k == 0:
            out.append(float("inf"))
            continue
        if k >= n:
            out.append(0.0)
            continue
        hi = torch.zeros(1 << 15, dtype=torch.int64)  # sign bit is 0, so top 16 bits < 2**15
        for key in tqdm(v.keys(), desc=f"trim pass 1/2 (vector {i})", disable=not progress, leave=False):
            hi += torch.bincount(_magnitude_bits(v[key]) >> 16, minlength=1 << 15)
        above = torch.flip(torch.cumsum(torch.flip(hi, [0]), 0), [0])  # above[b] = count in buckets >= b
        bucket = int(torch.nonzero(above >= k).max())
        rank = k - (int(above[bucket + 1]) if bucket + 1 < above.numel() else 0)  # rank inside the bucket
        lo = torch.zeros(1 << 16, dtype=torch.int64)
        for key in tqdm(v.keys(), desc=f"trim pass 2/2 (vector {i})", disable=not progress, leave=False):
            bits = _magnitude_bits(v[key])
            sel = bits[(bits >> 16) == bucket]
            if sel.numel():
                lo += torch.bincount(sel & 0xFFFF, minlength=1 << 16)
        above_lo = torch.flip(torch.cumsum(torch.flip(lo, [0]), 0), [0])
        low = int(torch.nonzero(above_lo >= rank).max())
        bits = torch.tensor([(bucket << 16) | low], dtype=torch.int32)
        out.append(bits.view(torch.float32).item())
    return out


def ties_reference(
    deltas: torch.Tensor,
    thresholds: Sequence[float] | torch.Tensor,
    weights: Sequence[float] | torch.Tensor | None = None,
    sign: str = "sum",
    lam: float = 1.0,
) -> torch.Tensor:
    """TIES on one tensor. deltas: (n_vectors, *shape) fp32; thresholds: (n_vectors,), entries with
    |delta| >= threshold survive the trim; weights: (n_vectors,). Returns (*shape) fp32."""
    if sign not in SIGN_METHODS:
        raise ValueError(f"sign must be one of {SIGN_METHODS}, got {sign!r}")
    n = deltas.shape[0]
    d = deltas.float()
    view = (n,) + (1,) * (d.dim() - 1)
    thr = torch.as_tensor(thresholds, dtype=torch.float32).reshape(view)
    w = torch.ones(n) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    w = w.reshape(view)
    trimmed = torch.where(d.abs() >= thr, d, torch.zeros((), dtype=d.dtype))
    weighted = trimmed * w
    if sign == "sum":
        elected = torch.sign(weighted.sum(0))
    else:
        elected = torch.sign(torch.sign(weighted).sum(0))
    agree = (torch.sign(weighted) == elected) & (weighted != 0)
    num = (weighted * agree).sum(0)
    den = (w * agree).sum(0)
    merged = torch.where(den != 0, num / torch.where(den != 0, den, torch.ones((), dtype=den.dtype)), 0.0)
    return merged * lam


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

    trim='tensor' keeps the top `density` per tensor instead (as mergekit does); sign='count'
    elects by majority vote. With trim='model' the thresholds are computed here (two passes over
    every vector); the merged tensors are computed on access.
    """
    vectors = list(vectors)
    if not vectors:
        raise ValueError("ties_merge needs at least one task vector")
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    if trim not in TRIM_SCOPES:
        raise ValueError(f"trim must be one of {TRIM_SCOPES}, got {trim!r}")
    if sign not in SIGN_METHODS:
        raise ValueError(f"sign must be one of {SIGN_METHODS}, got {sign!r}")
    w = [1.0] * len(vectors) if weights is None else [float(x) for x in weights]
    if len(w) != len(vectors):
        raise ValueError(f"{len(w)} weights for {len(vectors)} vectors")
    if any(x < 0 for x in w):
        raise ValueError(f"TIES weights must be >= 0, got {w}")
    _check_same_keys(vectors, "ties")
    _check_same_base(vectors, "ties")
    global_thr = model_trim_thresholds(vectors, density, progress) if trim == "model" and density < 1 else None

    def compute(k: str) -> torch.Tensor:
        deltas = torch.stack([v[k] for v in vectors])
        if density >= 1.0:
            thr = [0.0] * len(vectors)
        elif global_thr is not None:
            thr = global_thr
        else:
            n = deltas[0].numel()
            thr = [kth_largest_magnitude(d, _keep_count(n, density)) for d in deltas]
        return ties_reference(deltas, thr, w, sign, lam)

    method = {"op": "ties", "density": density, "lambda": lam, "weights": w, "trim": trim, "sign": sign,
              "inputs": [v.method for v in vectors]}
    if global_thr is not None:
        method["thresholds"] = global_thr
    return TaskVector(dict(vectors[0].shapes), compute, vectors[0].base_model, method)


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
