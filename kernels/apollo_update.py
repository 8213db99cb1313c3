"""Stage B and pass C of the fused APOLLO step.

Stage B touches only r-sized data: the moments kernel updates M and V from the R scratch and
writes the per-channel ||N_k||^2 and ||R_k||^2; the scale kernel (one program per matrix, C-sized
vectors) turns them into the scaling factors, ||S||^2 = sum_k s_k^2 ||G_k||^2, the limiter factor
and one coefficient per channel, coef_k = sign * eta_t * alpha * s_k / lam. Pass C then applies
x = W - coef ⊙ G, x <- x - (lr wd) x in one read of G and W and one write of W, fp32 math, and stores x
by the parameter rounding mode (apollo_rounding.py; 'compensated' also reads and writes the residual).
With SKIP_ON_FOUND every kernel leaves everything untouched once the found flag is raised.

Sharded matrices (optim/sharded.py; the caller runs the collectives between these launches): the moments kernel
of compressed-side shards (SPREAD) reads its slice of channels from the reduce-scatter's output (rows of r + 1
floats, [R_k | ||G_k||^2]); the scale kernel runs in two parts, PARTIAL (each matrix's partial sums over the local
channels, written as 3 floats per matrix for the all-reduce) and FINAL (the scale factors from the summed
scalars); pass C of compressed-side shards reads the all-gathered coefficients, and every shard draws the
stochastic rounding bits of its elements' places in the whole matrix.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .apollo_rounding import ROUNDING_CODES, STOCHASTIC, load_value, rounding_words, store_value
from .apollo_tables import (
    AP_C,
    AP_COL0,
    AP_COMP,
    AP_CS,
    AP_D,
    AP_G,
    AP_KEY_HI,
    AP_KEY_LO,
    AP_LIM,
    AP_M,
    AP_NT,
    AP_PIECE,
    AP_RANK,
    AP_RB,
    AP_ROW0,
    AP_STEP,
    AP_SUM,
    AP_TILE_B,
    AP_TILE_C,
    AP_V,
    AP_W,
    AP_WIDTH,
    AP_WS,
    APD_ETA,
    APD_FIRST,
    APD_STEP,
    APD_WIDTH,
    bias_corrections,
    field_ptr,
    row_of,
)

SCALE_BLOCK = 1024
# modes of the scale kernel: the whole computation (plain matrices), or its two parts around the all-reduce
SCALE_WHOLE = tl.constexpr(0)
SCALE_PARTIAL = tl.constexpr(1)
SCALE_FINAL = tl.constexpr(2)
SCALE_MODES = {"whole": 0, "partial": 1, "final": 2}


@triton.jit
def _apollo_moments_fwd_kernel(
    meta,
    tile_map,
    nn_ws,
    rr_ws,
    gg_ws,
    found,
    beta1,
    beta2,
    eps,
    M_DTYPE: tl.constexpr,
    SKIP_ON_FOUND: tl.constexpr,
    SPREAD: tl.constexpr,
    N_RCHUNK: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    SUB_C: tl.constexpr,
):
    """M <- b1 M + (1-b1) R; V <- b2 V + (1-b2) R^2 on one tile; per-channel ||N_k||^2, ||R_k||^2.
    SPREAD: R rows are r + 1 floats apart, the last one ||G_k||^2, which chunk 0 copies to gg_ws."""
    if SKIP_ON_FOUND:
        if tl.load(found) != 0:
            return
    pid = tl.program_id(0)
    tile = pid // N_RCHUNK
    chunk = pid % N_RCHUNK
    row, _ = row_of(meta, tile_map, tile, AP_WIDTH)
    m_ptr = field_ptr(row, AP_M, M_DTYPE)
    v_ptr = field_ptr(row, AP_V, M_DTYPE)
    r_ptr = field_ptr(row, AP_RB, tl.float32)
    ws = tl.load(row + AP_WS)
    C = tl.load(row + AP_CS)
    r = tl.load(row + AP_RANK)
    tile0 = tl.load(row + AP_TILE_B)
    r_stride = r + 1 if SPREAD else r
    offs_r = chunk.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    # SUB_C channels at a time: three live SUB_C x BLOCK_R fp32 tiles stay in registers.
    for cs in tl.static_range(0, BLOCK_C, SUB_C):
        offs_c = (tile - tile0).to(tl.int64) * BLOCK_C + cs + tl.arange(0, SUB_C)
        mask_c = offs_c < C
        mask = mask_c[:, None] & (offs_r < r)[None, :]
        offs = offs_c[:, None] * r + offs_r[None, :]
        rp = tl.load(r_ptr + offs_c[:, None] * r_stride + offs_r[None, :], mask=mask, other=0.0)
        if SPREAD:
            if chunk == 0:
                gg = tl.load(r_ptr + offs_c * r_stride + r, mask=mask_c, other=0.0)
                tl.store(gg_ws + ws + offs_c, gg, mask=mask_c)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = m * beta1 + rp * (1.0 - beta1)
        v = v * beta2 + (rp * rp) * (1.0 - beta2)
        n = m / (tl.sqrt(v) + eps)
        n = tl.where(mask, n, 0.0)
        tl.store(m_ptr + offs, m.to(M_DTYPE), mask=mask)
        tl.store(v_ptr + offs, v.to(M_DTYPE), mask=mask)
        nn = tl.sum(n * n, axis=1)
        rr = tl.sum(rp * rp, axis=1)
        if N_RCHUNK == 1:
            tl.store(nn_ws + ws + offs_c, nn, mask=mask_c)
            tl.store(rr_ws + ws + offs_c, rr, mask=mask_c)
        else:
            tl.atomic_add(nn_ws + ws + offs_c, nn, mask=mask_c)
            tl.atomic_add(rr_ws + ws + offs_c, rr, mask=mask_c)


def apollo_moments_group(
    meta: torch.Tensor,
    tile_map: torch.Tensor,
    nn_ws: torch.Tensor,
    rr_ws: torch.Tensor,
    gg_ws: torch.Tensor,
    found: torch.Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    m_dtype: tl.dtype,
    skip_on_found: bool,
    spread: bool = False,
    n_rchunk: int,
    block_c: int,
    block_r: int,
) -> None:
    """Moments and per-channel norms for every matrix in `meta` (nn/rr pre-zeroed when n_rchunk > 1); spread:
    compressed-side shards, whose R and ||G_k||^2 come from the reduce-scatter (||G_k||^2 copied to gg_ws)."""
    grid = (tile_map.numel() * n_rchunk,)
    _apollo_moments_fwd_kernel[grid](
        meta, tile_map, nn_ws, rr_ws, gg_ws, found, beta1, beta2, eps,
        M_DTYPE=m_dtype, SKIP_ON_FOUND=skip_on_found, SPREAD=spread, N_RCHUNK=n_rchunk, BLOCK_C=block_c,
        BLOCK_R=block_r,
        SUB_C=min(block_c, max(1, 2048 // block_r)), num_warps=4,
    )  # fmt: skip


@triton.jit
def _apollo_scale_fwd_kernel(
    meta,
    dyn,
    nn_ws,
    rr_ws,
    gg_ws,
    found,
    lr_ptr,
    sums,
    coef_all,
    alpha,
    beta1,
    beta2,
    gamma,
    sign,
    gather_block,
    world,
    CAPTURABLE: tl.constexpr,
    SKIP_ON_FOUND: tl.constexpr,
    CHANNEL: tl.constexpr,
    LIMITER: tl.constexpr,
    MODE: tl.constexpr,
    SPREAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program per matrix: coef_k (written over nn_ws) and the limiter's stored norm.

    MODE SCALE_PARTIAL only writes the matrix's sums over its (local) channels to sums[AP_SUM] (3 floats:
    ||S||^2, 0, 0 with channel scaling; ||N||^2, ||R||^2, ||G||^2 with tensor scaling); SCALE_FINAL reads them
    back summed over the ranks and does the rest. A compressed-side shard (SPREAD) with tensor scaling has one
    coefficient every rank knows: FINAL writes it over the whole vector, in the all-gather's layout (coef_all,
    rank blocks gather_block floats apart), so that no all-gather is needed."""
    if SKIP_ON_FOUND:
        if tl.load(found) != 0:
            return
    mat = tl.program_id(0).to(tl.int64)
    row = meta + mat * AP_WIDTH
    ws = tl.load(row + AP_WS)
    C = tl.load(row + AP_CS)
    if MODE == SCALE_FINAL:
        total = sums + tl.load(row + AP_SUM) * 3
        if CHANNEL:
            norm_s = tl.sqrt(tl.load(total))
            s_tensor = 0.0
        else:
            s_tensor = tl.sqrt(tl.load(total)) / (tl.sqrt(tl.load(total + 1)) + 1e-8)
            norm_s = s_tensor * tl.sqrt(tl.load(total + 2))
    else:
        nn_sum = tl.zeros((BLOCK,), dtype=tl.float32)
        rr_sum = tl.zeros((BLOCK,), dtype=tl.float32)
        gg_sum = tl.zeros((BLOCK,), dtype=tl.float32)
        ss_sum = tl.zeros((BLOCK,), dtype=tl.float32)
        for c0 in range(0, C, BLOCK):
            offs = ws + c0 + tl.arange(0, BLOCK)
            mask = (c0 + tl.arange(0, BLOCK)) < C
            nn = tl.load(nn_ws + offs, mask=mask, other=0.0)
            rr = tl.load(rr_ws + offs, mask=mask, other=0.0)
            gg = tl.load(gg_ws + offs, mask=mask, other=0.0)
            if CHANNEL:
                s = tl.sqrt(nn) / (tl.sqrt(rr) + 1e-8)
                ss_sum += s * s * gg
            else:
                nn_sum += nn
                rr_sum += rr
                gg_sum += gg
        if MODE == SCALE_PARTIAL:
            part = sums + tl.load(row + AP_SUM) * 3
            if CHANNEL:
                tl.store(part, tl.sum(ss_sum, axis=0))
                tl.store(part + 1, 0.0)
                tl.store(part + 2, 0.0)
            else:
                tl.store(part, tl.sum(nn_sum, axis=0))
                tl.store(part + 1, tl.sum(rr_sum, axis=0))
                tl.store(part + 2, tl.sum(gg_sum, axis=0))
            return
        if CHANNEL:
            norm_s = tl.sqrt(tl.sum(ss_sum, axis=0))
            s_tensor = 0.0
        else:
            s_tensor = tl.sqrt(tl.sum(nn_sum, axis=0)) / (tl.sqrt(tl.sum(rr_sum, axis=0)) + 1e-8)
            norm_s = s_tensor * tl.sqrt(tl.sum(gg_sum, axis=0))
    if CAPTURABLE:
        step = tl.load(field_ptr(row, AP_STEP, tl.float32))
        bc1, bc2 = bias_corrections(step, beta1, beta2)
        eta_alpha = tl.load(lr_ptr).to(tl.float32) * tl.sqrt(bc2) / bc1 * alpha
        first = step == 1.0
    else:
        eta_alpha = tl.load(dyn + mat * APD_WIDTH + APD_ETA).to(tl.float32)
        first = tl.load(dyn + mat * APD_WIDTH + APD_FIRST) != 0.0
    lam = 1.0
    if LIMITER:
        lim_ptr = field_ptr(row, AP_LIM, tl.float32)
        prev = tl.load(lim_ptr)
        lam = tl.where(first, 1.0, tl.maximum(norm_s / (prev + 1e-8), gamma) / gamma)
        tl.store(lim_ptr, norm_s / lam)
    factor = sign * eta_alpha / lam
    if SPREAD and not CHANNEL:
        piece = tl.load(row + AP_PIECE)
        for e0 in range(0, world * piece, BLOCK):
            e = e0 + tl.arange(0, BLOCK)
            coef = tl.zeros((BLOCK,), dtype=tl.float32) + s_tensor * factor
            tl.store(coef_all + (e // piece) * gather_block + ws + e % piece, coef, mask=e < world * piece)
    else:
        for c0 in range(0, C, BLOCK):
            offs = ws + c0 + tl.arange(0, BLOCK)
            mask = (c0 + tl.arange(0, BLOCK)) < C
            if CHANNEL:
                nn = tl.load(nn_ws + offs, mask=mask, other=0.0)
                rr = tl.load(rr_ws + offs, mask=mask, other=0.0)
                s = tl.sqrt(nn) / (tl.sqrt(rr) + 1e-8)
            else:
                s = tl.zeros((BLOCK,), dtype=tl.float32) + s_tensor
            tl.store(nn_ws + offs, s * factor, mask=mask)


def apollo_scale_group(
    meta: torch.Tensor,
    dyn: torch.Tensor,
    nn_ws: torch.Tensor,
    rr_ws: torch.Tensor,
    gg_ws: torch.Tensor,
    found: torch.Tensor,
    lr_t: torch.Tensor,
    *,
    alpha: float,
    beta1: float,
    beta2: float,
    gamma: float | None,
    sign: float,
    capturable: bool,
    skip_on_found: bool,
    channel: bool,
    mode: str = "whole",
    spread: bool = False,
    sums: torch.Tensor | None = None,
    coef_all: torch.Tensor | None = None,
    gather_block: int = 0,
    world: int = 1,
) -> None:
    """Per-channel update coefficients (over nn_ws) and limiter norms for every matrix in `meta`; for sharded
    matrices in two launches (mode 'partial', then 'final' once `sums` is all-reduced)."""
    grid = (meta.shape[0],)
    _apollo_scale_fwd_kernel[grid](
        meta, dyn, nn_ws, rr_ws, gg_ws, found, lr_t, nn_ws if sums is None else sums,
        nn_ws if coef_all is None else coef_all, alpha, beta1, beta2, 1.0 if gamma is None else gamma, sign,
        gather_block, world,
        CAPTURABLE=capturable, SKIP_ON_FOUND=skip_on_found, CHANNEL=channel, LIMITER=gamma is not None,
        MODE=SCALE_MODES[mode],
        SPREAD=spread, BLOCK=SCALE_BLOCK,
    )  # fmt: skip


@triton.jit
def _apollo_update_fwd_kernel(
    meta,
    dyn,
    tile_map,
    coef_ws,
    found,
    lr_ptr,
    lr_wd,
    weight_decay,
    gather_block,
    W_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr,
    TALL: tl.constexpr,
    CAPTURABLE: tl.constexpr,
    SKIP_ON_FOUND: tl.constexpr,
    DECAY: tl.constexpr,
    ROUNDING: tl.constexpr,
    SHARD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """x <- W (+ residual) - coef ⊙ G; x <- x - (lr wd) x (one fma); W <- x rounded by ROUNDING, on a
    BLOCK_M x BLOCK_N tile of the row-major m x n W (BLOCK_N a multiple of 4: the rounding bits' groups).

    SHARD 1 / 2: a shard along the channel / the compressed side. Its column tiles start at columns of the whole
    matrix that are multiples of 4 (the first one shifted left by COL0 mod 4, masked), so that each tile draws
    the bits of its elements' places in the whole matrix in groups of 4, as a single process does. Shards along
    the compressed side read coef_k of the whole channel vector from the all-gather's output (coef_ws, rank
    blocks gather_block floats apart)."""
    if SKIP_ON_FOUND:
        if tl.load(found) != 0:
            return
    pid = tl.program_id(0)
    row, mat = row_of(meta, tile_map, pid, AP_WIDTH)
    w_ptr = field_ptr(row, AP_W, W_DTYPE)
    g_ptr = field_ptr(row, AP_G, G_DTYPE)
    ws = tl.load(row + AP_WS)
    C = tl.load(row + AP_C)
    d = tl.load(row + AP_D)
    tile0 = tl.load(row + AP_TILE_C)
    if TALL:
        m = C
        n = d
    else:
        m = d
        n = C
    shift = 0
    if SHARD > 0:
        shift = tl.load(row + AP_COL0) % 4
    tiles_n = tl.cdiv(n + shift, BLOCK_N)
    local = (pid - tile0).to(tl.int64)
    rows = (local // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    col0 = (local % tiles_n) * BLOCK_N - shift
    cols = col0 + tl.arange(0, BLOCK_N)
    mask_m = rows < m
    mask_n = cols < n
    if SHARD > 0:
        mask_n = mask_n & (cols >= 0)
    mask = mask_m[:, None] & mask_n[None, :]
    offs = rows[:, None] * n + cols[None, :]
    if SHARD == 2:  # channel k of the whole vector: rank k // piece's block, entry k % piece
        piece = tl.load(row + AP_PIECE)
        if TALL:
            coef = tl.load(coef_ws + (rows // piece) * gather_block + ws + rows % piece, mask=mask_m, other=0.0)
            coef = coef[:, None]
        else:
            coef = tl.load(coef_ws + (cols // piece) * gather_block + ws + cols % piece, mask=mask_n, other=0.0)
            coef = coef[None, :]
    elif TALL:
        coef = tl.load(coef_ws + ws + rows, mask=mask_m, other=0.0)[:, None]
    else:
        coef = tl.load(coef_ws + ws + cols, mask=mask_n, other=0.0)[None, :]
    comp_ptr = field_ptr(row, AP_COMP, tl.int16)  # 0 unless 'compensated' (then never read)
    w = load_value(w_ptr, comp_ptr, offs, mask, W_DTYPE, ROUNDING)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = w - coef * g
    if DECAY:
        if CAPTURABLE:
            lr_wd = tl.load(lr_ptr).to(tl.float32) * weight_decay
        w = tl.fma(w, -lr_wd, w)
    word = 0
    if ROUNDING == STOCHASTIC:
        if CAPTURABLE:
            step = tl.load(field_ptr(row, AP_STEP, tl.float32)).to(tl.int64)
        else:
            step = tl.load(dyn + mat * APD_WIDTH + APD_STEP).to(tl.int64)
        if SHARD > 0:  # counters of the elements' places in the whole matrix; COL0 + col0 is a multiple of 4
            row0, col_w = tl.load(row + AP_ROW0), tl.load(row + AP_COL0) + col0
            groups = tl.cdiv(tl.load(row + AP_NT), 4)
            quads = (row0 + rows)[:, None] * groups + (col_w // 4 + tl.arange(0, BLOCK_N // 4))[None, :]
        else:
            quads = rows[:, None] * tl.cdiv(n, 4) + (col0 // 4 + tl.arange(0, BLOCK_N // 4))[None, :]
        word = rounding_words(quads, step, tl.load(row + AP_KEY_LO), tl.load(row + AP_KEY_HI), (BLOCK_M, BLOCK_N))
    store_value(w_ptr, comp_ptr, offs, mask, w, word, W_DTYPE, ROUNDING)


def apollo_update_group(
    meta: torch.Tensor,
    dyn: torch.Tensor,
    tile_map: torch.Tensor,
    coef_ws: torch.Tensor,
    found: torch.Tensor,
    lr_t: torch.Tensor,
    *,
    lr_wd: float,
    weight_decay: float,
    w_dtype: tl.dtype,
    g_dtype: tl.dtype,
    tall: bool,
    capturable: bool,
    skip_on_found: bool,
    rounding: str,
    block_m: int,
    block_n: int,
    shard: int = 0,
    gather_block: int = 0,
) -> None:
    """Pass C for every matrix in `meta` (one launch). lr_wd: lr * weight_decay (non-capturable; capturable
    kernels read lr from lr_t); rounding: 'nearest' | 'stochastic' | 'compensated' (16-bit W only); shard: 0 plain
    matrices, 1 shards along the channel side, 2 along the compressed side (coef_ws: the all-gathered
    coefficients, rank blocks gather_block floats apart)."""
    grid = (tile_map.numel(),)
    _apollo_update_fwd_kernel[grid](
        meta, dyn, tile_map, coef_ws, found, lr_t, lr_wd, weight_decay, gather_block,
        W_DTYPE=w_dtype, G_DTYPE=g_dtype, TALL=tall, CAPTURABLE=capturable, SKIP_ON_FOUND=skip_on_found,
        DECAY=weight_decay > 0.0, ROUNDING=ROUNDING_CODES[rounding], SHARD=shard, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=4,
    )  # fmt: skip
