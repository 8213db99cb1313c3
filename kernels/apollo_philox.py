"""Philox4x32-10 + Box-Muller normals in Triton, and the kernel that materialises APOLLO's P~.

Spec: apollo_fast/reference/philox.py (integer words bit-exact, log/cos in fp32). The projection is
written once per step into a small scratch buffer rather than regenerated inside the GEMM: every
channel tile of the GEMM reads all of P~, so in-GEMM generation would cost (C / BLOCK_C) times more
Philox work (see benches/NOTES-apollo.md for the count).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .apollo_tables import (
    AP_D,
    AP_D_FULL,
    AP_D_OFF,
    AP_KEY_HI,
    AP_KEY_LO,
    AP_P,
    AP_RANK,
    AP_STEP,
    AP_TILE_PX,
    AP_WIDTH,
    APD_REFRESH,
    APD_WIDTH,
    field_ptr,
    row_of,
)

PHILOX_BLOCK = 1024

_M0 = tl.constexpr(0xD2511F53)
_M1 = tl.constexpr(0xCD9E8D57)
_W0 = tl.constexpr(0x9E3779B9)
_W1 = tl.constexpr(0xBB67AE85)


@triton.jit
def philox4x32_10(c0, c1, c2, k0, k1):
    """Ten Philox4x32 rounds on counter (c0, c1, c2, 0), key (k0, k1); all uint32 (same shape)."""
    x0 = c0
    x1 = c1
    x2 = c2
    x3 = tl.zeros_like(c0)
    for _ in tl.static_range(10):
        # constexpr operands become uint32 constants (values >= 2**31 < 2**32), as in triton.language.random
        hi0 = tl.umulhi(x0, _M0)
        lo0 = x0 * _M0
        hi1 = tl.umulhi(x2, _M1)
        lo1 = x2 * _M1
        x0, x1, x2, x3 = hi1 ^ x1 ^ k0, lo1, hi0 ^ x3 ^ k1, lo0
        k0 = k0 + _W0
        k1 = k1 + _W1
    return x0, x1, x2, x3


@triton.jit
def _philox_normal(c0, c1, k0, k1):
    """One standard normal per counter (c0 = low word, c1 = high word), fp32; key (k0, k1) uint32."""
    x0, x1, _, _ = philox4x32_10(c0, c1, tl.zeros_like(c0), k0, k1)
    u1 = ((x0 >> 8) + 1).to(tl.float32) * 5.9604644775390625e-08  # 2**-24, exact
    u2 = (x1 >> 8).to(tl.float32) * 5.9604644775390625e-08
    return tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(6.283185307179586 * u2)


@triton.jit
def _philox_words_fwd_kernel(out_ptr, n, c_hi, k_lo, k_hi, BLOCK: tl.constexpr):
    """out (4 x n uint32 as int64) <- Philox words for counters 0..n-1 (test hook for bit-exactness)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    c0 = offs.to(tl.uint32)
    c1 = tl.zeros_like(c0) + c_hi.to(tl.uint32)
    k0 = tl.zeros_like(c0) + k_lo.to(tl.uint32)
    k1 = tl.zeros_like(c0) + k_hi.to(tl.uint32)
    x0, x1, x2, x3 = philox4x32_10(c0, c1, tl.zeros_like(c0), k0, k1)
    tl.store(out_ptr + offs, x0.to(tl.int64), mask=mask)
    tl.store(out_ptr + n + offs, x1.to(tl.int64), mask=mask)
    tl.store(out_ptr + 2 * n + offs, x2.to(tl.int64), mask=mask)
    tl.store(out_ptr + 3 * n + offs, x3.to(tl.int64), mask=mask)


def philox_words(n: int, key: int, counter_hi: int, device: torch.device) -> torch.Tensor:
    """The four Philox4x32-10 words (4 x n, int64 holding uint32) for counters 0..n-1."""
    out = torch.empty((4, n), dtype=torch.int64, device=device)
    grid = (triton.cdiv(n, PHILOX_BLOCK),)
    _philox_words_fwd_kernel[grid](out, n, counter_hi, key & 0xFFFFFFFF, key >> 32, BLOCK=PHILOX_BLOCK)
    return out


@triton.jit
def _philox_projection_fwd_kernel(
    meta, dyn, tile_map, tile_refresh, gap, CAPTURABLE: tl.constexpr, SPREAD: tl.constexpr, BLOCK: tl.constexpr
):
    """P~ (r x d fp32, N(0, 1/r)) for every matrix in `meta`: element (a, b) uses counter a*d + b.
    SPREAD (shards along the compressed side): the r x d_local columns [d_off, d_off + d_local) of the whole
    matrix's P~, element (a, b) with counter a * d_full + d_off + b.

    meta: n_mats x AP_WIDTH int64 rows (tables.py); tile_map: int32 tile -> matrix.
    The refresh index (high counter word) is in dyn, or (CAPTURABLE) floor((step - 1) / gap)
    computed from the device step counter, which already counts this step.
    tile_refresh (int64, one per program) holds 1 + the refresh index this tile's P~ was drawn
    for (0: never): a program whose tile is current returns at once, so that P~ is regenerated
    only on refresh steps, still without the host knowing the step.
    """
    pid = tl.program_id(0)
    row, mat = row_of(meta, tile_map, pid, AP_WIDTH)
    p_ptr = field_ptr(row, AP_P, tl.float32)
    r = tl.load(row + AP_RANK)
    d = tl.load(row + AP_D)
    tile0 = tl.load(row + AP_TILE_PX)
    offs = (pid - tile0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < r * d
    if CAPTURABLE:
        step = tl.load(field_ptr(row, AP_STEP, tl.float32))
        refresh = ((step.to(tl.int64) - 1) // gap).to(tl.uint32)  # integer division: exact at multiples of gap
    else:
        refresh = tl.load(dyn + mat * APD_WIDTH + APD_REFRESH).to(tl.uint32)
    held = refresh.to(tl.int64) + 1
    if tl.load(tile_refresh + pid) == held:
        return
    if SPREAD:
        counter = (offs // d) * tl.load(row + AP_D_FULL) + tl.load(row + AP_D_OFF) + offs % d
        c0 = counter.to(tl.uint32)
    else:
        c0 = offs.to(tl.uint32)
    c1 = tl.zeros_like(c0) + refresh
    k0 = tl.zeros_like(c0) + tl.load(row + AP_KEY_LO).to(tl.uint32)
    k1 = tl.zeros_like(c0) + tl.load(row + AP_KEY_HI).to(tl.uint32)
    z = _philox_normal(c0, c1, k0, k1)
    inv_sqrt_r = 1.0 / tl.sqrt(r.to(tl.float32))
    tl.store(p_ptr + offs, z * inv_sqrt_r, mask=mask)
    tl.store(tile_refresh + pid, held)


def philox_projection_group(
    meta: torch.Tensor,
    dyn: torch.Tensor,
    tile_map: torch.Tensor,
    tile_refresh: torch.Tensor,
    gap: int,
    capturable: bool,
    spread: bool = False,
) -> None:
    """Bring every matrix's P~ buffer named in `meta` up to this step's refresh index (one launch); spread: the
    matrices are shards along their compressed side (each gets the columns it holds)."""
    grid = (tile_map.numel(),)
    _philox_projection_fwd_kernel[grid](
        meta, dyn, tile_map, tile_refresh, int(gap), CAPTURABLE=capturable, SPREAD=spread, BLOCK=PHILOX_BLOCK
    )
