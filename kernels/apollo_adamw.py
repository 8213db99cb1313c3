"""AdamW for the non-matrix parameters, all of one dtype in one multi-tensor launch.

Same function as apollo_fast.reference.adamw_update (torch.optim.AdamW): decay first, then
m <- lerp(m, g, 1 - b1), v <- b2 v + (1 - b2) g^2, p <- p - lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps), the result
stored by the parameter rounding mode (apollo_rounding.py).
The found-flag kernel checks these gradients before anything is updated.

Stochastic rounding bits follow reference/rounding.py: element (i, j) of the tensor seen as an m x n matrix (a
tensor that is not a matrix: one row) takes word j mod 4 of counter i * ceil(n / 4) + j div 4. A launch class
whose tensors hold whole groups of 4 in order (QUADS: one row, or rows of a multiple of 4, starting at a group)
draws one Philox call per 4 elements; the others (odd row lengths, shards starting inside a group or holding
column blocks) one per element.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .apollo_rounding import ROUNDING_CODES, STOCHASTIC, element_words, load_value, rounding_words, store_value
from .apollo_tables import (
    AW_COL0,
    AW_COMP,
    AW_G,
    AW_KEY_HI,
    AW_KEY_LO,
    AW_M,
    AW_N,
    AW_NL,
    AW_NT,
    AW_P,
    AW_Q0,
    AW_ROW0,
    AW_STEP,
    AW_TILE,
    AW_V,
    AW_WIDTH,
    AWD_BC2,
    AWD_STEP,
    AWD_STEP_SIZE,
    AWD_WIDTH,
    bias_corrections,
    field_ptr,
    row_of,
)

ADAMW_BLOCK = 2048


@triton.jit
def _nonfinite_check_fwd_kernel(meta, tile_map, found, G_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """found <- 1 when any gradient element of this tile is inf or NaN."""
    pid = tl.program_id(0)
    row, _ = row_of(meta, tile_map, pid, AW_WIDTH)
    g_ptr = field_ptr(row, AW_G, G_DTYPE)
    n = tl.load(row + AW_N)
    offs = (pid - tl.load(row + AW_TILE)).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    g = tl.load(g_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    bad = tl.max(((g * 0.0) != 0.0).to(tl.int32), axis=0)
    if bad > 0:
        tl.atomic_max(found, bad)


def nonfinite_check_group(meta: torch.Tensor, tile_map: torch.Tensor, found: torch.Tensor, g_dtype: tl.dtype) -> None:
    """Raise the found flag if any gradient named in `meta` holds inf/NaN (one launch)."""
    _nonfinite_check_fwd_kernel[(tile_map.numel(),)](meta, tile_map, found, G_DTYPE=g_dtype, BLOCK=ADAMW_BLOCK)


@triton.jit
def _adamw_fwd_kernel(
    meta,
    dyn,
    tile_map,
    found,
    lr_ptr,
    decay,
    beta1,
    beta2,
    eps,
    weight_decay,
    sign,
    P_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr,
    CAPTURABLE: tl.constexpr,
    SKIP_ON_FOUND: tl.constexpr,
    ROUNDING: tl.constexpr,
    QUADS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One AdamW step on BLOCK elements of one tensor (fp32 moments, fp32 math), the result stored by ROUNDING.
    decay: 1 - lr wd (non-capturable; capturable kernels compute it from the device lr)."""
    if SKIP_ON_FOUND:
        if tl.load(found) != 0:
            return
    pid = tl.program_id(0)
    row, mat = row_of(meta, tile_map, pid, AW_WIDTH)
    p_ptr = field_ptr(row, AW_P, P_DTYPE)
    g_ptr = field_ptr(row, AW_G, G_DTYPE)
    m_ptr = field_ptr(row, AW_M, tl.float32)
    v_ptr = field_ptr(row, AW_V, tl.float32)
    n = tl.load(row + AW_N)
    start = (pid - tl.load(row + AW_TILE)).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    if CAPTURABLE:
        lr = tl.load(lr_ptr).to(tl.float32)
        step = tl.load(field_ptr(row, AW_STEP, tl.float32))
        bc1, bc2 = bias_corrections(step, beta1, beta2)
        step_size = lr / bc1
        bc2 = tl.sqrt(bc2)
        decay = 1.0 - lr * weight_decay
    else:
        step_size = tl.load(dyn + mat * AWD_WIDTH + AWD_STEP_SIZE).to(tl.float32)
        bc2 = tl.load(dyn + mat * AWD_WIDTH + AWD_BC2).to(tl.float32)
        step = tl.load(dyn + mat * AWD_WIDTH + AWD_STEP)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * sign
    comp_ptr = field_ptr(row, AW_COMP, tl.int16)  # 0 unless 'compensated' (then never read)
    w = load_value(p_ptr, comp_ptr, offs, mask, P_DTYPE, ROUNDING)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    w = w * decay
    m = m + (g - m) * (1.0 - beta1)
    v = v * beta2 + (g * g) * (1.0 - beta2)
    w = w - step_size * m / (tl.sqrt(v) / bc2 + eps)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    word = 0
    if ROUNDING == STOCHASTIC:
        key_lo, key_hi = tl.load(row + AW_KEY_LO), tl.load(row + AW_KEY_HI)
        if QUADS:  # local element k takes word k mod 4 of counter Q0 + k div 4
            quads = tl.load(row + AW_Q0) + start // 4 + tl.arange(0, BLOCK // 4)
            word = rounding_words(quads, step.to(tl.int64), key_lo, key_hi, (BLOCK,))
        else:
            nl = tl.load(row + AW_NL)
            col = tl.load(row + AW_COL0) + offs % nl
            counter = (tl.load(row + AW_ROW0) + offs // nl) * tl.cdiv(tl.load(row + AW_NT), 4) + col // 4
            word = element_words(counter, col % 4, step.to(tl.int64), key_lo, key_hi)
    store_value(p_ptr, comp_ptr, offs, mask, w, word, P_DTYPE, ROUNDING)


def adamw_group(
    meta: torch.Tensor,
    dyn: torch.Tensor,
    tile_map: torch.Tensor,
    found: torch.Tensor,
    lr_t: torch.Tensor,
    *,
    decay: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    sign: float,
    p_dtype: tl.dtype,
    g_dtype: tl.dtype,
    capturable: bool,
    skip_on_found: bool,
    rounding: str,
    quads: bool = True,
) -> None:
    """AdamW on every tensor named in `meta` (one launch). decay: 1 - lr * weight_decay (non-capturable); quads:
    every tensor's elements come in whole groups of 4 of the rounding bits' counters (see the module)."""
    _adamw_fwd_kernel[(tile_map.numel(),)](
        meta, dyn, tile_map, found, lr_t, decay, beta1, beta2, eps, weight_decay, sign,
        P_DTYPE=p_dtype, G_DTYPE=g_dtype, CAPTURABLE=capturable, SKIP_ON_FOUND=skip_on_found,
        ROUNDING=ROUNDING_CODES[rounding], QUADS=quads, BLOCK=ADAMW_BLOCK,
    )  # fmt: skip
