"""Pass A of the fused APOLLO step: R = Gc P~^T and the per-channel ||G_k||^2 in one read of G.

Gc (C x d) is the channel-major gradient: G itself for a tall matrix (m >= n), G^T for a wide one;
TALL is a constexpr so that the contiguous axis is known to the compiler and loads vectorise.
A launch covers every matrix of one (dtype, orientation, rank block) class; R goes to an fp32
scratch (C x r per matrix), so that nothing in the optimizer state changes before the step knows
that every gradient is finite (the found flag is raised here from the channel norms).

SPREAD: shards along the compressed side (optim/sharded.py). Each rank's R and ||G_k||^2 are partial sums over
its columns of Gc: they go, as rows [R_k | ||G_k||^2] of r + 1 floats, straight into the reduce-scatter's send
buffer, laid out by destination rank (channel k to rank k // piece, row k % piece of its block).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .apollo_tables import (
    AP_C,
    AP_D,
    AP_G,
    AP_P,
    AP_P_STRIDE,
    AP_PIECE,
    AP_R,
    AP_RANK,
    AP_TILE_A,
    AP_WIDTH,
    AP_WS,
    field_ptr,
    row_of,
)


@triton.jit
def _apollo_project_fwd_kernel(
    meta,
    tile_map,
    gg_ws,
    found,
    sign,
    rs_block,
    G_DTYPE: tl.constexpr,
    TALL: tl.constexpr,
    SPREAD: tl.constexpr,
    N_RCHUNK: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program: BLOCK_C channels x BLOCK_R ranks of R = sign * Gc @ P~^T (fp32 accumulate).

    The rank chunk is the fastest-varying program index, so the chunks of one channel tile run
    together and re-read their G tile from L2. Chunk 0 also writes ||G_k||^2 and the found flag.
    """
    pid = tl.program_id(0)
    tile = pid // N_RCHUNK
    chunk = pid % N_RCHUNK
    row, _ = row_of(meta, tile_map, tile, AP_WIDTH)
    g_ptr = field_ptr(row, AP_G, G_DTYPE)
    p_ptr = field_ptr(row, AP_P, tl.float32)
    r_ptr = field_ptr(row, AP_R, tl.float32)
    ws = tl.load(row + AP_WS)
    C = tl.load(row + AP_C)
    d = tl.load(row + AP_D)
    r = tl.load(row + AP_RANK)
    tile0 = tl.load(row + AP_TILE_A)
    p_stride = tl.load(row + AP_P_STRIDE)

    offs_c = (tile - tile0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_r = chunk.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_c = offs_c < C
    mask_r = offs_r < r
    acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
    gg = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        mask_d = offs_d < d
        if TALL:
            g_ptrs = g_ptr + offs_c[:, None] * d + offs_d[None, :]
        else:
            g_ptrs = g_ptr + offs_d[None, :] * C + offs_c[:, None]
        g = tl.load(g_ptrs, mask=mask_c[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        gg += tl.sum(g * g, axis=1)
        p_ptrs = p_ptr + offs_r[None, :] * p_stride + offs_d[:, None]
        p = tl.load(p_ptrs, mask=mask_d[:, None] & mask_r[None, :], other=0.0)
        acc = tl.dot(g, p, acc, input_precision=DOT_PRECISION)
    if SPREAD:  # row k % piece of destination rank k // piece's block, r + 1 floats: [R_k | ||G_k||^2]
        piece = tl.load(row + AP_PIECE)
        dest = r_ptr + (offs_c // piece) * rs_block + (offs_c % piece) * (r + 1)
        tl.store(dest[:, None] + offs_r[None, :], acc * sign, mask=mask_c[:, None] & mask_r[None, :])
    else:
        tl.store(r_ptr + offs_c[:, None] * r + offs_r[None, :], acc * sign, mask=mask_c[:, None] & mask_r[None, :])
    if chunk == 0:
        if SPREAD:
            tl.store(dest + r, gg, mask=mask_c)
        else:
            tl.store(gg_ws + ws + offs_c, gg, mask=mask_c)
        # inf * 0 and NaN * 0 are NaN: any non-finite gradient element makes its channel norm fail this.
        bad = tl.max(((gg * 0.0) != 0.0).to(tl.int32), axis=0)
        if bad > 0:
            tl.atomic_max(found, bad)


def apollo_project_group(
    meta: torch.Tensor,
    tile_map: torch.Tensor,
    gg_ws: torch.Tensor,
    found: torch.Tensor,
    *,
    sign: float,
    g_dtype: tl.dtype,
    tall: bool,
    spread: bool = False,
    rs_block: int = 0,
    n_rchunk: int,
    block_c: int,
    block_r: int,
    block_d: int,
    dot_precision: str,
) -> None:
    """R scratch, ||G_k||^2 and the found flag for every matrix named in `meta` (one launch). spread: compressed-side
    shards, written into the reduce-scatter's send buffer whose rank blocks are rs_block floats apart."""
    grid = (tile_map.numel() * n_rchunk,)
    _apollo_project_fwd_kernel[grid](
        meta,
        tile_map,
        gg_ws,
        found,
        sign,
        rs_block,
        G_DTYPE=g_dtype,
        TALL=tall,
        SPREAD=spread,
        N_RCHUNK=n_rchunk,
        BLOCK_C=block_c,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        DOT_PRECISION=dot_precision,
        num_warps=8 if block_r >= 128 else 4,
    )
