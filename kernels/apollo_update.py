"""Stage B and pass C of the fused APOLLO step.

Stage B touches only r-sized data: the moments kernel updates M and V from the R scratch and
writes the per-channel ||N_k||^2 and ||R_k||^2; the scale kernel (one program per matrix, C-sized
vectors) turns them into the scaling factors, ||S||^2 = sum_k s_k^2 ||G_k||^2, the limiter factor
and one coefficient per channel, coef_k = sign * eta_t * alpha * s_k / lam. Pass C then applies
x = W - coef ⊙ G, x <- x - (lr wd) x in one read of G and W and one write of W, fp32 math, and stores x
by the parameter rounding mode (apollo_rounding.py; 'compensated' also reads and writes the residual).
With SKIP_ON_FOUND every kernel leaves everything untouched once the found flag is raised.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .apollo_rounding import ROUNDING_CODES, STOCHASTIC, load_value, rounding_words, store_value
from .apollo_tables import (
    AP_C,
    AP_COMP,
    AP_D,
    AP_G,
    AP_KEY_HI,
    AP_KEY_LO,
    AP_LIM,
    AP_M,
    AP_R,
    AP_RANK,
    AP_STEP,
    AP_TILE_A,
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


@triton.jit
def _apollo_moments_fwd_kernel(
    meta,
    tile_map,
    nn_ws,
    rr_ws,
    found,
    beta1,
    beta2,
    eps,
    M_DTYPE: tl.constexpr,
    SKIP_ON_FOUND: tl.constexpr,
    N_RCHUNK: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    SUB_C: tl.constexpr,
):
    """M <- b1 M + (1-b1) R; V <- b2 V + (1-b2) R^2 on one tile; per-channel ||N_k||^2, ||R_k||^2."""
    if SKIP_ON_FOUND:
        if tl.load(found) != 0:
            return
    pid = tl.program_id(0)
    tile = pid // N_RCHUNK
    chunk = pid % N_RCHUNK
    row, _ = row_of(meta, tile_map, tile, AP_WIDTH)
    m_ptr = field_ptr(row, AP_M, M_DTYPE)
    v_ptr = field_ptr(row, AP_V, M_DTYPE)
    r_ptr = field_ptr(row, AP_R, tl.float32)
    ws = tl.load(row + AP_WS)
    C = tl.load(row + AP_C)
    r = tl.load(row + AP_RANK)
    tile0 = tl.load(row + AP_TILE_A)
    offs_r = chunk.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    # SUB_C channels at a time: three live SUB_C x BLOCK_R fp32 tiles stay in registers.
    for cs in tl.static_range(0, BLOCK_C, SUB_C):
        offs_c = (tile - tile0).to(tl.int64) * BLOCK_C + cs + tl.arange(0, SUB_C)
        mask_c = offs_c < C
        mask = mask_c[:, None] & (offs_r < r)[None, :]
        offs = offs_c[:, None] * r + offs_r[None, :]
        rp = tl.load(r_ptr + offs, mask=mask, other=0.0)
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
    found: torch.Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    m_dtype: tl.dtype,
    skip_on_found: bool,
    n_rchunk: int,
    block_c: int,
    block_r: int,
) -> None:
    """Moments and per-channel norms for every matrix in `meta` (nn/rr pre-zeroed when n_rchunk > 1)."""
    grid = (tile_map.numel() * n_rchunk,)
    _apollo_moments_fwd_kernel[grid](
        meta, tile_map, nn_ws, rr_ws, found, beta1, beta2, eps,
        M_DTYPE=m_dtype, SKIP_ON_FOUND=skip_on_found, N_RCHUNK=n_rchunk, BLOCK_C=block_c, BLOCK_R=block_r,
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
    alpha,
    beta1,
    beta2,
    gamma,
    sign,
    CAPTURABLE: tl.constexpr,
    SKIP_ON_FOUND: tl.constexpr,
    CHANNEL: tl.constexpr,
    LIMITER: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program per matrix: coef_k (written over nn_ws) and the limiter's stored norm."""
    if SKIP_ON_FOUND:
        if tl.load(found) != 0:
            return
    mat = tl.program_id(0).to(tl.int64)
    row = meta + mat * AP_WIDTH
    ws = tl.load(row + AP_WS)
    C = tl.load(row + AP_C)
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
) -> None:
    """Per-channel update coefficients (over nn_ws) and limiter norms for every matrix in `meta`."""
    grid = (meta.shape[0],)
    _apollo_scale_fwd_kernel[grid](
        meta, dyn, nn_ws, rr_ws, gg_ws, found, lr_t, alpha, beta1, beta2,
        1.0 if gamma is None else gamma, sign,
        CAPTURABLE=capturable, SKIP_ON_FOUND=skip_on_found, CHANNEL=channel, LIMITER=gamma is not None,
        BLOCK=SCALE_BLOCK,
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
    W_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr,
    TALL: tl.constexpr,
    CAPTURABLE: tl.constexpr,
    SKIP_ON_FOUND: tl.constexpr,
    DECAY: tl.constexpr,
    ROUNDING: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """x <- W (+ residual) - coef ⊙ G; x <- x - (lr wd) x (one fma); W <- x rounded by ROUNDING, on a
    BLOCK_M x BLOCK_N tile of the row-major m x n W (BLOCK_N a multiple of 4: the rounding bits' groups)."""
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
    tiles_n = tl.cdiv(n, BLOCK_N)
    local = (pid - tile0).to(tl.int64)
    rows = (local // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    col0 = (local % tiles_n) * BLOCK_N
    cols = col0 + tl.arange(0, BLOCK_N)
    mask_m = rows < m
    mask_n = cols < n
    mask = mask_m[:, None] & mask_n[None, :]
    offs = rows[:, None] * n + cols[None, :]
    if TALL:
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
) -> None:
    """Pass C for every matrix in `meta` (one launch). lr_wd: lr * weight_decay (non-capturable; capturable
    kernels read lr from lr_t); rounding: 'nearest' | 'stochastic' | 'compensated' (16-bit W only)."""
    grid = (tile_map.numel(),)
    _apollo_update_fwd_kernel[grid](
        meta, dyn, tile_map, coef_ws, found, lr_t, lr_wd, weight_decay,
        W_DTYPE=w_dtype, G_DTYPE=g_dtype, TALL=tall, CAPTURABLE=capturable, SKIP_ON_FOUND=skip_on_found,
        DECAY=weight_decay > 0.0, ROUNDING=ROUNDING_CODES[rounding], BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=4,
    )  # fmt: skip
