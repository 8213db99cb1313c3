"""The APOLLO step as functions of tensor lists, as torch.optim splits AdamW into a class and functional steps.

`APOLLO` (optim/apollo.py) gathers, per param group, the lists of one kind of tensor and the group's
hyper-parameters, and calls one backend's functions; they know nothing of the optimizer object:

    reference  apollo_reference, adamw_reference: one tensor at a time, through the specification
               (apollo_fast.reference.apollo)
    triton     fused_apollo_project, fused_adamw_check (raise a found-inf flag, change no state), then
               fused_apollo_update, fused_adamw (optim/fused.py): one launch per class of tensors

Every function takes the same lists (`ApolloLists`, `AdamwLists`) and `Hyper` (optim/lists.py).
"""

from __future__ import annotations

import torch

from ..reference.apollo import adamw_update, apollo_update
from .lists import AdamwLists, ApolloLists, Hyper, cached_projection, refresh_index
from .sharded import apollo_reference_sharded

__all__ = ["AdamwLists", "ApolloLists", "Hyper", "adamw_reference", "apollo_reference", "refresh_index"]


@torch.no_grad()
def apollo_reference(t: ApolloLists, h: Hyper, projection_cache: dict) -> None:
    """One APOLLO step for every matrix of `t` (steps counted here). projection_cache holds regenerated
    Philox P~ between steps (any dict the caller keeps). Sharded matrices (t.shards) go through
    optim/sharded.py's step, which adds the collectives their math needs."""
    sharded = [i for i, spec in enumerate(t.shards) if spec is not None]
    if sharded:
        apollo_reference_sharded(_subset(t, sharded), h, projection_cache)
    lr = float(h.lr)
    for i, p in enumerate(t.params):
        if t.shards and t.shards[i] is not None:
            continue
        t.steps[i] += 1
        step = int(t.steps[i].item())  # a CPU tensor: no device sync
        proj = t.projections[i]
        if proj is None:
            proj = cached_projection(
                projection_cache, t.keys[i], t.exp_avgs[i].shape[1], min(p.shape), h, step, p.device
            )
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
