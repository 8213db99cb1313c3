"""APOLLO on sharded parameters: FSDP2's DTensors, sharded along one dimension (any Shard(d)) of a 1-D mesh.

Each rank holds a block of rows or columns of a matrix W (m x n), with C = max(m, n) channels and the
compressed side d = min(m, n). The step is the single-process one with the collectives its math needs:

    shards along the channel side   R = G_local P~^T needs only the local channels; moments, channel scales
                                    and the update are local. All-reduced: per-matrix scalars (the limiter's
                                    ||S||^2; with tensor scaling ||N||^2, ||R||^2, ||G||^2)
    shards along the compressed side  each rank's R_part = Gc[:, mine] P~[:, mine]^T sums to R: one
                                    reduce-scatter by channels (with ||G_k||^2) leaves each rank the moments of
                                    its slice of channels (the optimizer state stays sharded), the scalars are
                                    all-reduced, and the slice's channel scales are all-gathered (C floats) for
                                    the local update

P~ is regenerated on every rank from the same key (its full r x d, or the columns a rank needs), never sent.
A launch's collectives are batched: one reduce-scatter, one all-reduce and one all-gather per process group
and step, whatever the number of matrices. AdamW tensors are elementwise and stay local; shards of 16-bit
parameters take the rounding bits of their places in the whole tensor, so results equal a single process's.

The APOLLO moments of a sharded matrix are DTensors of global shape (C, r), Shard(0) over channels with
torch.chunk's split (FSDP2's), so `torch.distributed.checkpoint` saves and reshards them like parameters.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from ..reference.apollo import NORM_EPS, apollo_step_size, limiter_factor, update_moments
from ..reference.rounding import compensated_value, store_rounded
from .lists import ApolloLists, Hyper, cached_projection
from .placement import ShardSpec, chunk_range

__all__ = ["all_gather_single", "apollo_reference_sharded", "moments_state", "reduce_scatter_single"]

# torch 2.13 renamed the one-tensor collectives (the old names warn); older releases have only the old names
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def moments_state(spec: ShardSpec, shape: tuple[int, int], device: torch.device) -> DTensor:
    """Zero moments of global shape (C, r) for a sharded matrix: this rank's channel slice, Shard(0)."""
    c_lo, c_hi = spec.channels()
    local = torch.zeros(c_hi - c_lo, shape[1], dtype=torch.float32, device=device)
    return DTensor.from_local(
        local, spec.mesh, [Shard(0)], run_check=False, shape=torch.Size(shape), stride=(shape[1], 1)
    )


def _reduce_scatter_channels(parts: list[torch.Tensor], spec: ShardSpec) -> list[torch.Tensor]:
    """Sum each [C_i, k_i] tensor over the ranks and keep this rank's slice of its C_i rows (one collective)."""
    world = spec.world
    padded = []
    for t in parts:
        piece = -(-t.shape[0] // world)
        full = t.new_zeros(world * piece, t.shape[1])
        full[: t.shape[0]] = t
        padded.append(full.view(world, piece * t.shape[1]))
    send = torch.cat(padded, dim=1).flatten()
    out = send.new_empty(send.numel() // world)
    reduce_scatter_single(out, send, group=spec.group)
    pieces, offset = [], 0
    for t in parts:
        piece = -(-t.shape[0] // world)
        lo, hi = chunk_range(t.shape[0], world, spec.rank)
        block = out[offset : offset + piece * t.shape[1]].view(piece, t.shape[1])
        pieces.append(block[: hi - lo])
        offset += piece * t.shape[1]
    return pieces


def _all_gather_channels(slices: list[torch.Tensor], sizes: list[int], spec: ShardSpec) -> list[torch.Tensor]:
    """Each rank's slice of per-channel vectors (C_i entries in all) -> the whole vectors (one collective)."""
    world = spec.world
    pieces = [-(-c // world) for c in sizes]
    send = torch.cat([torch.cat([s, s.new_zeros(p - s.numel())]) for s, p in zip(slices, pieces, strict=True)])
    out = send.new_empty(world * send.numel())
    all_gather_single(out, send, group=spec.group)
    out = out.view(world, send.numel())
    whole, offset = [], 0
    for c, p in zip(sizes, pieces, strict=True):
        whole.append(out[:, offset : offset + p].reshape(-1)[:c])
        offset += p
    return whole


@torch.no_grad()
def apollo_reference_sharded(t: ApolloLists, h: Hyper, projection_cache: dict) -> None:
    """One APOLLO step for sharded matrices: `t` holds local shards (params, grads, state) and t.shards their
    ShardSpecs, all on one process group. Same function as functional.apollo_reference on the whole matrices."""
    if not t.params:
        return
    spec0 = t.shards[0]
    lr = float(h.lr)
    staged = []
    for i, p in enumerate(t.params):
        spec = t.shards[i]
        m, n = spec.shape
        tall = m >= n
        t.steps[i] += 1
        step = int(t.steps[i].item())
        rank_r = t.exp_avgs[i].shape[1]
        proj = t.projections[i]
        if proj is None:
            proj = cached_projection(projection_cache, t.keys[i], rank_r, min(m, n), h, step, p.device)
        if not spec.channel_sharded:
            proj = proj[:, spec.lo : spec.hi]  # the compressed-side columns this rank holds
        g = t.grads[i].float()
        g = g if tall else g.t()  # channel-major: [local channels, d] or [C, local d]
        if h.maximize:
            g = -g
        staged.append((step, g, g @ proj.t(), (g * g).sum(1)))

    # compressed-side shards: R and ||G_k||^2 summed over the ranks, each keeping its slice of channels
    spread = [i for i, s in enumerate(t.shards) if not s.channel_sharded]
    if spread:
        sums = _reduce_scatter_channels([torch.cat((staged[i][2], staged[i][3][:, None]), 1) for i in spread], spec0)
        for i, rg in zip(spread, sums, strict=True):
            staged[i] = (staged[i][0], staged[i][1], rg[:, :-1], rg[:, -1])

    scalars, scales = [], []
    for i, (_, _, r_proj, gg) in enumerate(staged):
        n_proj = update_moments(r_proj, t.exp_avgs[i], t.exp_avg_sqs[i], h.beta1, h.beta2, h.eps)
        if h.scale_type == "channel":
            s = n_proj.norm(dim=1) / (r_proj.norm(dim=1) + NORM_EPS)
            scalars.append(torch.stack([(s * s * gg).sum(), s.new_zeros(()), s.new_zeros(())]))
        else:
            s = None
            scalars.append(torch.stack([n_proj.square().sum(), r_proj.square().sum(), gg.sum()]))
        scales.append(s)
    totals = torch.stack(scalars)
    dist.all_reduce(totals, group=spec0.group)

    if h.scale_type == "channel" and spread:  # the whole channel scale vectors for the local updates
        whole = _all_gather_channels([scales[i] for i in spread], [max(t.shards[i].shape) for i in spread], spec0)
        for i, s in zip(spread, whole, strict=True):
            scales[i] = s

    for i, p in enumerate(t.params):
        spec, (step, g, _, _) = t.shards[i], staged[i]
        if h.scale_type == "channel":
            scaled = g * scales[i][:, None]
            norm = totals[i, 0].sqrt()
        else:
            s = totals[i, 0].sqrt() / (totals[i, 1].sqrt() + NORM_EPS)
            scaled = g * s
            norm = s * totals[i, 2].sqrt()
        if h.norm_growth_limit is not None:
            lam = limiter_factor(norm, t.limiter_norms[i], step, h.norm_growth_limit)
            if lam is not None:
                scaled = scaled / lam
        tall = spec.shape[0] >= spec.shape[1]
        x = compensated_value(p, t.compensations[i])
        eta = apollo_step_size(lr, h.beta1, h.beta2, step)
        new_w = (x if tall else x.t()) - (eta * h.alpha) * scaled
        if h.weight_decay > 0.0:
            new_w.add_(new_w, alpha=-(lr * h.weight_decay))
        store_rounded(
            p, new_w if tall else new_w.t(), h.param_rounding, t.compensations[i],
            param_index=t.keys[i], seed=h.seed, step=step, block=spec.block(),
        )  # fmt: skip
