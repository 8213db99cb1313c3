"""APOLLO's random projections: orientation of a matrix, and the two ways P is drawn.

Canonical layout used everywhere in this package: a matrix W (m x n) has C = max(m, n) channels
and a compressed side of d = min(m, n). Its gradient in channel-major form is Gc (C x d): G when
m >= n, G^T otherwise. The projection P~ is (r x d) and the projected gradient is R = Gc @ P~^T
(C x r). The spec's two orientations are both this formula:
    m >= n: R = G P^T           with P = P~ (r x n)
    m <  n: R^T = P^T G         with P = P~^T (m x r)
"""

from __future__ import annotations

import math

import torch

from .philox import philox_projection

__all__ = [
    "channel_major",
    "effective_rank",
    "official_next_seed",
    "official_projection",
    "philox_projection",
    "PROJECTIONS",
]

PROJECTIONS = ("philox", "official")


def channel_major(t: torch.Tensor) -> torch.Tensor:
    """View of a 2-D tensor (m x n) as C x d, C = max(m, n) channels (a transpose when m < n)."""
    return t if t.shape[0] >= t.shape[1] else t.t()


def effective_rank(rank: int, shape: torch.Size | tuple[int, int], projection: str) -> int:
    """Rank actually used for a matrix of `shape`.

    'philox' clamps to d = min(m, n): a larger P~ would give moments larger than the compressed
    side itself. 'official' keeps the requested rank, exactly as apollo-torch 1.0.3 does (its P is
    then r x d with r > d), so that trajectories match.
    """
    return rank if projection == "official" else min(rank, min(shape))


def official_projection(rank: int, dim: int, seed: int, device: torch.device | str, tall: bool) -> torch.Tensor:
    """P~ (rank x dim, fp32) drawn as apollo-torch 1.0.3 draws P, returned in canonical layout.

    apollo-torch draws randn((r, n)) for m >= n ("tall") and randn((m, r)) otherwise, from
    torch.Generator(device).manual_seed(seed), in fp32, divided by sqrt(r).
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (rank, dim) if tall else (dim, rank)
    p = torch.randn(shape, generator=gen, device=device, dtype=torch.float32) / math.sqrt(rank)
    return p if tall else p.t().contiguous()


def official_next_seed(seed: int) -> int:
    """The seed apollo-torch uses for its next draw: the last of 15 CPU randint(0, 2**63 - 1)."""
    gen = torch.Generator().manual_seed(seed)
    return int(torch.randint(0, torch.iinfo(torch.int64).max, (15,), generator=gen)[-1])
