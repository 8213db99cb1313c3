"""The APOLLO step as functions of tensor lists, as torch.optim splits AdamW into a class and functional steps.

`APOLLO` (optim/apollo.py) gathers, per param group, the lists of one kind of tensor and the group's
hyper-parameters, and calls one backend's functions; they know nothing of the optimizer object:

    reference  apollo_reference, adamw_reference: one tensor at a time, through the specification
               (apollo_fast.reference.apollo)
    triton     fused_apollo_project, fused_adamw_check (raise a found-inf flag, change no state), then
               fused_apollo_update, fused_adamw (optim/fused.py): one launch per class of tensors

Every function takes the same lists (`ApolloLists`, `AdamwLists`) and `Hyper`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..reference.apollo import adamw_update, apollo_update
from ..reference.philox import philox_projection

if TYPE_CHECKING:
    from .sharded import ShardSpec

__all__ = ["AdamwLists", "ApolloLists", "Hyper", "adamw_reference", "apollo_reference", "refresh_index"]


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


def _philox(cache: dict, key: int, rank: int, dim: int, h: Hyper, step: int, device: torch.device) -> torch.Tensor:
    """The Philox P~ of a matrix for step `step`, regenerated only when its refresh index changes."""
    refresh = refresh_index(step, h.update_proj_gap)
    slot = (key, rank, dim, device)
    held = cache.get(slot)
    if held is None or held[0] != (h.seed, refresh):
        held = cache[slot] = ((h.seed, refresh), philox_projection(rank, dim, key, h.seed, refresh, device))
    return held[1]


@torch.no_grad()
def apollo_reference(t: ApolloLists, h: Hyper, projection_cache: dict) -> None:
    """One APOLLO step for every matrix of `t` (steps counted here). projection_cache holds regenerated
    Philox P~ between steps (any dict the caller keeps). Sharded matrices (t.shards) go through
    optim/sharded.py's step, which adds the collectives their math needs."""
    sharded = [i for i, spec in enumerate(t.shards) if spec is not None]
    if sharded:
        from .sharded import apollo_reference_sharded

        apollo_reference_sharded(_subset(t, sharded), h, projection_cache)
    lr = float(h.lr)
    for i, p in enumerate(t.params):
        if t.shards and t.shards[i] is not None:
            continue
        t.steps[i] += 1
        step = int(t.steps[i].item())  # a CPU tensor: no device sync
        proj = t.projections[i]
        if proj is None:
            proj = _philox(projection_cache, t.keys[i], t.exp_avgs[i].shape[1], min(p.shape), h, step, p.device)
        apollo_update(
            p,
            t.grads[i],
            t.exp_avgs[i],
            t.exp_avg_sqs[i],
            t.limiter_norms[i],
            proj,
            step=step,
            lr=lr,
            beta1=h.beta1,
            beta2=h.beta2,
            eps=h.eps,
            alpha=h.alpha,
            scale_type=h.scale_type,
            norm_growth_limit=h.norm_growth_limit,
            weight_decay=h.weight_decay,
            maximize=h.maximize,
            param_rounding=h.param_rounding,
            compensation=t.compensations[i],
            param_index=t.keys[i],
            seed=h.seed,
        )


@torch.no_grad()
def adamw_reference(t: AdamwLists, h: Hyper) -> None:
    """One AdamW step (torch.optim.AdamW's formula) for every tensor of `t` (steps counted here)."""
    lr = float(h.lr)
    for i, p in enumerate(t.params):
        t.steps[i] += 1
        spec = t.shards[i] if t.shards else None
        adamw_update(
            p,
            t.grads[i],
            t.exp_avgs[i],
            t.exp_avg_sqs[i],
            step=int(t.steps[i].item()),
            lr=lr,
            beta1=h.beta1,
            beta2=h.beta2,
            eps=h.eps,
            weight_decay=h.weight_decay,
            maximize=h.maximize,
            param_rounding=h.param_rounding,
            compensation=t.compensations[i],
            param_index=t.keys[i],
            seed=h.seed,
            block=None if spec is None else spec.block(),
        )


def _subset(t: ApolloLists, keep: list[int]) -> ApolloLists:
    """The lists of `t` restricted to the positions `keep`."""
    return ApolloLists(*([getattr(t, f)[i] for i in keep] for f in ApolloLists.__dataclass_fields__))
