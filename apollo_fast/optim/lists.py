"""What every backend's step takes: the tensor lists of one param group (`ApolloLists`, `AdamwLists`), its
options (`Hyper`), and the Philox projection P~ each step regenerates (cached between steps)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..reference.philox import philox_projection
from .placement import ShardSpec

__all__ = ["AdamwLists", "ApolloLists", "Hyper", "cached_projection", "refresh_index"]


@dataclass
class ApolloLists:
    """The APOLLO matrices of one param group that have a gradient this step, and their state."""

    params: list[torch.Tensor]  # m x n
    grads: list[torch.Tensor]  # m x n
    exp_avgs: list[torch.Tensor]  # C x r, C = max(m, n)
    exp_avg_sqs: list[torch.Tensor]  # C x r
    limiter_norms: list[torch.Tensor]  # 0-dim fp32: the norm-growth limiter's previous ||S||_F
    steps: list[torch.Tensor]  # 0-dim fp32: steps taken (CPU; on the device when capturable)
    keys: list[int]  # Philox key word 0 (projection and rounding bits): the parameter's index
    projections: list[torch.Tensor | None]  # stored P~ (r x d, projection='official'); None: Philox P~
    compensations: list[torch.Tensor | None]  # int16 rounding residual (param_rounding='compensated', 16-bit W)
    shards: list[ShardSpec | None] = field(default_factory=list)  # sharded parameters: where the local shard lies


@dataclass
class AdamwLists:
    """The AdamW tensors of one param group that have a gradient this step, and their state."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    exp_avgs: list[torch.Tensor]  # fp32, the parameter's shape
    exp_avg_sqs: list[torch.Tensor]
    steps: list[torch.Tensor]
    keys: list[int]  # Philox key word 0 of the rounding bits: the parameter's index
    compensations: list[torch.Tensor | None]  # int16 rounding residual (param_rounding='compensated', 16-bit)
    shards: list[ShardSpec | None] = field(default_factory=list)  # sharded parameters: where the local shard lies


@dataclass(frozen=True)
class Hyper:
    """One param group's options, as the steps read them."""

    lr: float | torch.Tensor
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    maximize: bool
    alpha: float = 1.0
    scale_type: str = "channel"
    norm_growth_limit: float | None = None
    update_proj_gap: int = 1
    seed: int = 0
    param_rounding: str = "nearest"  # how fp32 results are stored into bf16/fp16 params (reference.rounding)

    @classmethod
    def from_group(cls, group: dict[str, Any], seed: int) -> Hyper:
        beta1, beta2 = group["betas"]
        return cls(
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            maximize=group["maximize"],
            alpha=group["alpha"],
            scale_type=group["scale_type"],
            norm_growth_limit=group["norm_growth_limit"],
            update_proj_gap=group["update_proj_gap"],
            seed=seed,
            param_rounding=group["param_rounding"],
        )

    @property
    def sign(self) -> float:
        return -1.0 if self.maximize else 1.0


def refresh_index(step: int, gap: int) -> int:
    """Which projection step t (1-based) uses: P~ is redrawn at steps 1, T+1, 2T+1, ..."""
    return (step - 1) // gap


def cached_projection(
    cache: dict, key: int, rank: int, dim: int, h: Hyper, step: int, device: torch.device
) -> torch.Tensor:
    """The Philox P~ of a matrix for step `step`, regenerated only when its refresh index changes."""
    refresh = refresh_index(step, h.update_proj_gap)
    slot = (key, rank, dim, device)
    held = cache.get(slot)
    if held is None or held[0] != (h.seed, refresh):
        held = cache[slot] = ((h.seed, refresh), philox_projection(rank, dim, key, h.seed, refresh, device))
    return held[1]
