"""GDN gate: g = -exp(A_log) softplus(a + dt_bias), beta = sigmoid(b), forward and backward.

Inputs are [B, T, Hv] with any strides (views of fused projections); outputs are contiguous. The
backward writes da, db and per-program partial sums of d A_log and d dt_bias (Kahan-compensated
fp32: value and compensation), which the caller adds in fp64 in a fixed order: deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import utils

BLOCK_R = 64  # rows (b, t) per tile
MAX_PROGRAMS = 512  # backward partials: programs are a function of the shape only


@triton.jit
def _softplus_sigmoid(x):
    """softplus(x) (threshold 20) and its derivative sigmoid(x), accurate for very negative x."""
    y = tl.exp(-tl.abs(x))
    u = 1.0 + y
    # log1p(y) without log1p: log(u) * y / (u - 1) is exact to rounding; u == 1 means log1p(y) == y.
    l1p = tl.where(u == 1.0, y, tl.log(u) * (y / tl.where(u == 1.0, 1.0, u - 1.0)))
    sp = tl.where(x > 20.0, x, tl.maximum(x, 0.0) + l1p)
    sig = tl.where(x >= 0, 1.0 / u, y / u)
    sig = tl.where(x > 20.0, 1.0, sig)
    return sp, sig


@triton.jit
def _gdn_gate_fwd_kernel(
    a,
    b,
    A_log,
    dt_bias,
    g,
    beta,
    R,
    T,
    sa_b,
    sa_t,
    sa_h,
    sb_b,
    sb_t,
    sb_h,
    HV: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    mr = rows < R
    mh = heads < HV
    m = mr[:, None] & mh[None, :]
    bi = rows // T
    ti = rows % T
    a_off = (bi * sa_b + ti * sa_t)[:, None] + heads[None, :] * sa_h
    b_off = (bi * sb_b + ti * sb_t)[:, None] + heads[None, :] * sb_h
    o_off = rows[:, None] * HV + heads[None, :]
    A = tl.exp(tl.load(A_log + heads, mask=mh, other=0.0).to(tl.float32))
    bias = tl.load(dt_bias + heads, mask=mh, other=0.0).to(tl.float32)
    x = tl.load(a + a_off, mask=m, other=0.0).to(tl.float32) + bias[None, :]
    sp, _ = _softplus_sigmoid(x)
    tl.store(g + o_off, -A[None, :] * sp, mask=m)
    xb = tl.load(b + b_off, mask=m, other=0.0).to(tl.float32)
    _, sb = _softplus_sigmoid(xb)
    tl.store(beta + o_off, sb.to(beta.dtype.element_ty), mask=m)


@triton.jit
def _gdn_gate_bwd_kernel(
    a,
    b,
    A_log,
    dt_bias,
    dg,
    dbeta,
    da,
    db,
    dA_part,
    dbias_part,
    R,
    T,
    rows_per_prog,
    sa_b,
    sa_t,
    sa_h,
    sb_b,
    sb_t,
    sb_h,
    sg_b,
    sg_t,
    sg_h,
    sd_b,
    sd_t,
    sd_h,
    HV: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    mh = heads < HV
    A = tl.exp(tl.load(A_log + heads, mask=mh, other=0.0).to(tl.float32))
    bias = tl.load(dt_bias + heads, mask=mh, other=0.0).to(tl.float32)
    # Kahan sums per head: sum and running compensation
    sA = tl.zeros([BLOCK_H], tl.float32)
    cA = tl.zeros([BLOCK_H], tl.float32)
    sD = tl.zeros([BLOCK_H], tl.float32)
    cD = tl.zeros([BLOCK_H], tl.float32)
    start = pid * rows_per_prog
    for r0 in range(0, rows_per_prog, BLOCK_R):
        rows = start + r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        mr = rows < R
        m = mr[:, None] & mh[None, :]
        bi = rows // T
        ti = rows % T
        x = tl.load(a + ((bi * sa_b + ti * sa_t)[:, None] + heads[None, :] * sa_h), mask=m, other=0.0)
        x = x.to(tl.float32) + bias[None, :]
        d = tl.load(dg + ((bi * sg_b + ti * sg_t)[:, None] + heads[None, :] * sg_h), mask=m, other=0.0)
        d = d.to(tl.float32)
        sp, sig = _softplus_sigmoid(x)
        gval = -A[None, :] * sp
        dx = tl.where(m, d * (-A[None, :] * sig), 0.0)  # dg/dx = -A sigmoid(x)
        o_off = rows[:, None] * HV + heads[None, :]
        tl.store(da + o_off, dx.to(da.dtype.element_ty), mask=m)
        # dbeta -> db = dbeta * beta (1 - beta)
        xb = tl.load(b + ((bi * sb_b + ti * sb_t)[:, None] + heads[None, :] * sb_h), mask=m, other=0.0)
        _, sb = _softplus_sigmoid(xb.to(tl.float32))
        dbe = tl.load(dbeta + ((bi * sd_b + ti * sd_t)[:, None] + heads[None, :] * sd_h), mask=m, other=0.0)
        tl.store(db + o_off, (dbe.to(tl.float32) * sb * (1.0 - sb)).to(db.dtype.element_ty), mask=m)
        # d A_log = sum dg * g ; d dt_bias = sum da (tile sums, then Kahan across tiles)
        tA = tl.sum(tl.where(m, d * gval, 0.0), 0) - cA
        nA = sA + tA
        cA = (nA - sA) - tA
        sA = nA
        tD = tl.sum(dx, 0) - cD
        nD = sD + tD
        cD = (nD - sD) - tD
        sD = nD
    # partials [programs, 2, HV]: value and minus compensation (value - c is the compensated sum)
    p_off = pid * 2 * HV + heads
    tl.store(dA_part + p_off, sA, mask=mh)
    tl.store(dA_part + p_off + HV, -cA, mask=mh)
    tl.store(dbias_part + p_off, sD, mask=mh)
    tl.store(dbias_part + p_off + HV, -cD, mask=mh)


def _bth_strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def gdn_gate_fwd(
    a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """a, b [B, T, Hv] (any strides); A_log, dt_bias [Hv] contiguous -> g fp32, beta (b's dtype), contiguous."""
    B, T, HV = a.shape
    R = B * T
    g = utils.empty(B, T, HV, dtype=torch.float32, device=a.device)
    beta = utils.empty(B, T, HV, dtype=b.dtype, device=b.device)
    if R == 0:
        return g, beta
    grid = (triton.cdiv(R, BLOCK_R),)
    _gdn_gate_fwd_kernel[grid](
        a,
        b,
        A_log,
        dt_bias,
        g,
        beta,
        R,
        T,
        *_bth_strides(a),
        *_bth_strides(b),
        HV=HV,
        BLOCK_R=BLOCK_R,
        BLOCK_H=triton.next_power_of_2(HV),
    )
    return g, beta


def gdn_gate_bwd(
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    dg: torch.Tensor,
    dbeta: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> da (a's dtype), db (b's dtype) [B, T, Hv] contiguous; partials of d A_log, d dt_bias [P, 2, Hv] fp32."""
    B, T, HV = a.shape
    R = B * T
    da = utils.empty(B, T, HV, dtype=a.dtype, device=a.device)
    db = utils.empty(B, T, HV, dtype=b.dtype, device=b.device)
    if R == 0:
        zeros = torch.zeros(1, 2, HV, dtype=torch.float32, device=a.device)
        return da, db, zeros, zeros.clone()
    n_prog = min(triton.cdiv(R, BLOCK_R), MAX_PROGRAMS)
    rows_per_prog = triton.cdiv(triton.cdiv(R, n_prog), BLOCK_R) * BLOCK_R
    n_prog = triton.cdiv(R, rows_per_prog)
    dA_part = utils.empty(n_prog, 2, HV, dtype=torch.float32, device=a.device)
    dbias_part = utils.empty(n_prog, 2, HV, dtype=torch.float32, device=a.device)
    _gdn_gate_bwd_kernel[(n_prog,)](
        a,
        b,
        A_log,
        dt_bias,
        dg,
        dbeta,
        da,
        db,
        dA_part,
        dbias_part,
        R,
        T,
        rows_per_prog,
        *_bth_strides(a),
        *_bth_strides(b),
        *_bth_strides(dg),
        *_bth_strides(dbeta),
        HV=HV,
        BLOCK_R=BLOCK_R,
        BLOCK_H=triton.next_power_of_2(HV),
    )
    return da, db, dA_part, dbias_part
