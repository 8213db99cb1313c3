"""Where a sharded parameter's local piece lies: FSDP2's DTensors, Shard(d) over a 1-D mesh, split as torch.chunk
splits (the last pieces shorter or empty). The step on shards is optim/sharded.py."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

__all__ = ["ShardSpec", "chunk_range", "shard_spec"]


def chunk_range(size: int, world: int, rank: int) -> tuple[int, int]:
    """[lo, hi) of `rank`'s piece when torch.chunk splits `size` into `world` pieces (as DTensor's Shard does:
    pieces of ceil(size / world), the last ones shorter or empty)."""
    piece = -(-size // world) if size else 0
    lo = min(size, rank * piece)
    return lo, min(size, lo + piece)


@dataclass(frozen=True)
class ShardSpec:
    """Where this rank's shard of a parameter lies."""

    mesh: object  # the DeviceMesh
    group: dist.ProcessGroup
    world: int
    rank: int
    dim: int  # the sharded dimension
    lo: int  # this rank's range along `dim`
    hi: int
    shape: torch.Size  # the whole parameter's shape

    @property
    def channel_sharded(self) -> bool:
        """A matrix sharded along its channel side (the larger one): its channels are local."""
        m, n = self.shape
        return self.dim == (0 if m >= n else 1)

    def channels(self) -> tuple[int, int]:
        """This rank's slice of the matrix's C channels: its moments' rows."""
        if self.channel_sharded:
            return self.lo, self.hi
        return chunk_range(max(self.shape), self.world, self.rank)

    def block(self) -> tuple[int, int, int]:
        """(first row, first column, columns of the whole) of the local shard, for the rounding bits; a tensor
        that is not a matrix counts as one row of its elements (sharded along dim 0 only)."""
        if len(self.shape) == 2:
            return (self.lo, 0, self.shape[1]) if self.dim == 0 else (0, self.lo, self.shape[1])
        inner = math.prod(self.shape[1:])
        return 0, self.lo * inner, math.prod(self.shape)


def shard_spec(p: torch.Tensor, name: str) -> ShardSpec | None:
    """The ShardSpec of a DTensor parameter (None for a plain tensor); ValueError naming the parameter for a
    placement this optimizer does not support."""
    if not isinstance(p, DTensor):
        return None
    mesh = p.device_mesh
    if mesh.ndim != 1:
        raise ValueError(
            f"APOLLO: {name} is a DTensor on a {mesh.ndim}-D device mesh; sharded parameters are supported on a "
            "1-D mesh (FSDP2's fully_shard over one process group), not with HSDP or tensor parallelism"
        )
    placement = p.placements[0]
    if not isinstance(placement, Shard):
        raise ValueError(f"APOLLO: {name} has placement {placement}; only Shard(d) DTensor parameters are supported")
    dim = placement.dim % p.dim()
    if p.dim() != 2 and dim != 0:
        raise ValueError(f"APOLLO: {name} is sharded along dim {dim}; tensors that are not matrices must be Shard(0)")
    group = mesh.get_group()
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    lo, hi = chunk_range(p.shape[dim], world, rank)
    if p.to_local().shape[dim] != hi - lo:
        raise ValueError(
            f"APOLLO: {name}'s local shard has {p.to_local().shape[dim]} of {p.shape[dim]} along dim {dim}; "
            f"expected torch.chunk's split ({hi - lo}): uneven custom shardings are not supported"
        )
    return ShardSpec(mesh, group, world, rank, dim, lo, hi, p.shape)
