"""Causal softmax attention after a frozen context, reading the context's keys/values in place.

Queries q [B, H, T, D] of a segment at absolute positions Lc..Lc+T-1 attend to every key of a frozen
context ctx_k/ctx_v [B, Hkv, Lc, D] (a view with batch stride 0 when one context serves all rows), then
causally to the segment's own k, v [B, Hkv, T, D]. The two key/value sources are two pointers: the context
is never concatenated, copied or written, and gets no gradient (nothing is allocated for one).

GQA without repeating K/V: one program owns BLOCK_M rows of the G = H / Hkv query heads of one KV head,
folded as row r = g * T + t (head Hkv_index * G + g, token t), so each K/V tile it loads serves all of them.

Forward (online softmax, fp32 statistics and accumulator, exp in natural units):
    s = scale q k^T; m' = max(m, rowmax s); p = exp(s - m'); l = l e^(m - m') + rowsum p; acc = acc e^(m - m') + p v
over the context blocks, then the segment blocks (causal: key j <= t); o = acc / l, lse = m + log l.
Backward (P recomputed per tile from lse, delta = rowsum(do * o)):
    p = exp(s - lse); dp = do v^T; ds = p (dp - delta); dq = scale sum ds k (both sources);
    dv = sum p^T do, dk = scale sum ds^T q (segment keys only, summed over the G heads of the group).
Strides are in elements with the last (head) dimension contiguous; o, lse, do, dq, delta are dense.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import utils


@triton.jit
def _scores(q, k_ptrs, mask_n, mask_d, scale, DOT_PRECISION: tl.constexpr):
    """The [BLOCK_M, BLOCK_N] tile scale * q k^T and the loaded k tile (cast to q's dtype)."""
    k = tl.load(k_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(q.dtype)
    return tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale, k


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, mask_n, mask_d, visible, scale, DOT_PRECISION: tl.constexpr):
    """One key/value tile of the online softmax (visible: [BLOCK_M, BLOCK_N] mask of keys a row may see)."""
    s, _ = _scores(q, k_ptrs, mask_n, mask_d, scale, DOT_PRECISION)
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _query_rows(T, HKV: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's BLOCK_M folded query rows r = g * T + t of KV head i_hkv in batch row i_b -> (i_b, i_hkv,
    query head per row, t per row, row mask, segment keys to visit: up to the largest t + 1). Rows past G * T
    have t < T and zero q: they see key 0, stay finite, and are never stored."""
    i_bh = tl.program_id(1).to(tl.int64)
    i_hkv = i_bh % HKV
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_t = rows % T
    mask_m = rows < G * T
    hi = tl.minimum(tl.max(tl.where(mask_m, row_t, 0), 0) + 1, T)
    return i_bh // HKV, i_hkv, i_hkv * G + rows // T, row_t, mask_m, hi


@triton.jit
def _frozen_attention_fwd_kernel(
    Q, K, V, CK, CV, O, LSE,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_ckb, stride_ckh, stride_ckt, stride_cvb, stride_cvh, stride_cvt,
    T, Lc, scale,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, HAS_CTX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    i_b, i_hkv, head, row_t, mask_m, hi = _query_rows(T, HKV, G, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    q_ptrs = Q + i_b * stride_qb + head[:, None] * stride_qh + row_t[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    if HAS_CTX:  # every context key is visible to every row
        ck_ptrs = CK + i_b * stride_ckb + i_hkv * stride_ckh + offs_n[:, None] * stride_ckt + offs_d[None, :]
        cv_ptrs = CV + i_b * stride_cvb + i_hkv * stride_cvh + offs_n[:, None] * stride_cvt + offs_d[None, :]
        for start_n in range(0, Lc, BLOCK_N):
            mask_n = start_n + offs_n < Lc
            acc, m_i, l_i = _fwd_tile(
                acc, m_i, l_i, q, ck_ptrs, cv_ptrs, mask_n, mask_d, mask_n[None, :], scale, DOT_PRECISION
            )
            ck_ptrs += BLOCK_N * stride_ckt
            cv_ptrs += BLOCK_N * stride_cvt
    k_ptrs = K + i_b * stride_kb + i_hkv * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V + i_b * stride_vb + i_hkv * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        visible = cols[None, :] <= row_t[:, None]
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, cols < T, mask_d, visible, scale, DOT_PRECISION)
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
    o = acc / l_i[:, None]
    out_rows = (i_b * (HKV * G) + head) * T + row_t  # dense [B, H, T]
    mask_md = mask_m[:, None] & mask_d[None, :]
    tl.store(O + out_rows[:, None] * D + offs_d[None, :], o.to(O.dtype.element_ty), mask=mask_md)
    tl.store(LSE + out_rows, m_i + tl.log(l_i), mask=mask_m)


@triton.jit
def _frozen_attention_bwd_preprocess_kernel(O, DO, DELTA, N, D: tl.constexpr, BLOCK_M: tl.constexpr,
                                            BLOCK_D: tl.constexpr):  # fmt: skip
    """delta = rowsum(do * o) (fp32) over the N = B * H * T dense rows."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < N)[:, None] & (offs_d < D)[None, :]
    o = tl.load(O + rows[:, None] * D + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + rows[:, None] * D + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + rows, tl.sum(o * do, 1), mask=rows < N)


@triton.jit
def _dq_tile(dq, q, do, lse, delta, k_ptrs, v_ptrs, mask_n, mask_d, visible, scale, DOT_PRECISION: tl.constexpr):
    """dq += ds k over one key/value tile, ds = p (do v^T - delta) (dq is scaled by the caller)."""
    s, k = _scores(q, k_ptrs, mask_n, mask_d, scale, DOT_PRECISION)
    p = tl.exp(tl.where(visible, s - lse[:, None], float("-inf")))
    v = tl.load(v_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(q.dtype)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(q.dtype), k, input_precision=DOT_PRECISION)


@triton.jit
def _frozen_attention_bwd_dq_kernel(
    Q, K, V, CK, CV, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_ckb, stride_ckh, stride_ckt, stride_cvb, stride_cvh, stride_cvt,
    T, Lc, scale,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, HAS_CTX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    i_b, i_hkv, head, row_t, mask_m, hi = _query_rows(T, HKV, G, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask_md = mask_m[:, None] & mask_d[None, :]
    dense_rows = (i_b * (HKV * G) + head) * T + row_t
    q = tl.load(
        Q + i_b * stride_qb + head[:, None] * stride_qh + row_t[:, None] * stride_qt + offs_d[None, :],
        mask=mask_md,
        other=0.0,
    )
    do = tl.load(DO + dense_rows[:, None] * D + offs_d[None, :], mask=mask_md, other=0.0).to(q.dtype)
    lse = tl.load(LSE + dense_rows, mask=mask_m, other=0.0)
    delta = tl.load(DELTA + dense_rows, mask=mask_m, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    if HAS_CTX:
        ck_ptrs = CK + i_b * stride_ckb + i_hkv * stride_ckh + offs_n[:, None] * stride_ckt + offs_d[None, :]
        cv_ptrs = CV + i_b * stride_cvb + i_hkv * stride_cvh + offs_n[:, None] * stride_cvt + offs_d[None, :]
        for start_n in range(0, Lc, BLOCK_N):
            mask_n = start_n + offs_n < Lc
            visible = mask_m[:, None] & mask_n[None, :]
            dq = _dq_tile(dq, q, do, lse, delta, ck_ptrs, cv_ptrs, mask_n, mask_d, visible, scale, DOT_PRECISION)
            ck_ptrs += BLOCK_N * stride_ckt
            cv_ptrs += BLOCK_N * stride_cvt
    k_ptrs = K + i_b * stride_kb + i_hkv * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V + i_b * stride_vb + i_hkv * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        visible = mask_m[:, None] & (cols[None, :] <= row_t[:, None])
        dq = _dq_tile(dq, q, do, lse, delta, k_ptrs, v_ptrs, cols < T, mask_d, visible, scale, DOT_PRECISION)
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
    tl.store(DQ + dense_rows[:, None] * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=mask_md)


@triton.jit
def _frozen_attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    T, scale,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """dk, dv of BLOCK_N segment keys of one KV head: a loop over its G query heads, then their rows t >= key."""
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // HKV
    i_hkv = i_bh % HKV
    cols = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < T
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask_nd = mask_n[:, None] & mask_d[None, :]
    k = tl.load(
        K + i_b * stride_kb + i_hkv * stride_kh + cols[:, None] * stride_kt + offs_d[None, :], mask=mask_nd, other=0.0
    )
    v = tl.load(
        V + i_b * stride_vb + i_hkv * stride_vh + cols[:, None] * stride_vt + offs_d[None, :], mask=mask_nd, other=0.0
    ).to(k.dtype)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    offs_m = tl.arange(0, BLOCK_M)
    lo = (i_n * BLOCK_N) // BLOCK_M * BLOCK_M  # the first row block holding a query t >= the first key
    for g in range(0, G):
        head = i_hkv * G + g
        q_base = Q + i_b * stride_qb + head * stride_qh
        dense_base = (i_b * (HKV * G) + head) * T
        for start_m in range(lo, T, BLOCK_M):
            row_t = start_m + offs_m
            mask_m = row_t < T
            mask_md = mask_m[:, None] & mask_d[None, :]
            q = tl.load(q_base + row_t[:, None] * stride_qt + offs_d[None, :], mask=mask_md, other=0.0).to(k.dtype)
            do = tl.load(DO + (dense_base + row_t)[:, None] * D + offs_d[None, :], mask=mask_md, other=0.0)
            do = do.to(k.dtype)
            lse = tl.load(LSE + dense_base + row_t, mask=mask_m, other=0.0)
            delta = tl.load(DELTA + dense_base + row_t, mask=mask_m, other=0.0)
            s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * scale  # [BLOCK_N, BLOCK_M]
            visible = mask_m[None, :] & (cols[:, None] <= row_t[None, :])
            p_t = tl.exp(tl.where(visible, s_t - lse[None, :], float("-inf")))
            dv += tl.dot(p_t.to(k.dtype), do, input_precision=DOT_PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(k.dtype), q, input_precision=DOT_PRECISION)
    out = (i_b * HKV + i_hkv) * T + cols  # dense [B, Hkv, T]
    tl.store(DK + out[:, None] * D + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=mask_nd)
    tl.store(DV + out[:, None] * D + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=mask_nd)


def _config(D: int, dtype: torch.dtype) -> dict[str, int | str]:
    """Block sizes and launch options shared by the kernels (tests shrink the blocks to cover multi-tile loops).

    Picked without a GPU, by register spills (Triton 3.6, sm_90, cuobjdump): at D = 256 bf16, 64 x 32 tiles
    with 8 warps spilled 1.3-1.7 KB per thread in the forward and dq kernels, 32 x 32 with 4 warps 0.1-0.2 KB;
    at D = 128 bf16, 64 x 64 with 4 warps spilled 2 KB, 64 x 32 with 8 warps 0.1-0.3 KB. fp32 halves the keys.
    """
    wide = D > 128
    big = dtype.itemsize >= 4
    if wide:
        block_m, block_n, warps = (32, 16, 8) if big else (32, 32, 4)
    else:
        block_m, block_n, warps = (64, 32, 4) if big else (64, 32, 8)
    return dict(
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(D)),
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
        num_warps=warps,
        num_stages=2,
    )


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def frozen_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx_k: torch.Tensor | None, ctx_v: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """q [B, H, T, D]; k, v [B, Hkv, T, D]; ctx_k, ctx_v [B, Hkv, Lc, D] (batch stride 0 allowed) or None, each with
    a contiguous last dim -> o [B, H, T, D] dense in q's dtype, lse [B, H, T] fp32 (natural log)."""
    B, H, T, D = q.shape
    HKV = k.shape[1]
    Lc = 0 if ctx_k is None else ctx_k.shape[2]
    cfg = _config(D, q.dtype)
    o = utils.empty(B, H, T, D, dtype=q.dtype, device=q.device)
    lse = utils.empty(B, H, T, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv((H // HKV) * T, cfg["BLOCK_M"]), B * HKV)
    _frozen_attention_fwd_kernel[grid](
        q, k, v, ctx_k, ctx_v, o, lse,
        *_strides(q), *_strides(k), *_strides(v),
        *(_strides(ctx_k) if Lc else (0, 0, 0)), *(_strides(ctx_v) if Lc else (0, 0, 0)),
        T, Lc, scale,
        HKV=HKV, G=H // HKV, D=D, HAS_CTX=Lc > 0, **cfg,
    )  # fmt: skip
    return o, lse


def frozen_attention_bwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx_k: torch.Tensor | None, ctx_v: torch.Tensor | None,
    o: torch.Tensor, lse: torch.Tensor, do: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """As frozen_attention_fwd, plus o, lse from it and a dense do [B, H, T, D] -> dq [B, H, T, D], dk, dv
    [B, Hkv, T, D] (dense, in q's, k's, v's dtypes). Nothing is computed or allocated for the context."""
    B, H, T, D = q.shape
    HKV = k.shape[1]
    Lc = 0 if ctx_k is None else ctx_k.shape[2]
    cfg = _config(D, q.dtype)
    delta = utils.empty(B, H, T, dtype=torch.float32, device=q.device)
    dq = utils.empty(B, H, T, D, dtype=q.dtype, device=q.device)
    dk = utils.empty(B, HKV, T, D, dtype=k.dtype, device=k.device)
    dv = utils.empty(B, HKV, T, D, dtype=v.dtype, device=v.device)
    _frozen_attention_bwd_preprocess_kernel[(triton.cdiv(B * H * T, cfg["BLOCK_M"]),)](
        o, do, delta, B * H * T, D=D, BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"],
    )  # fmt: skip
    _frozen_attention_bwd_dq_kernel[(triton.cdiv((H // HKV) * T, cfg["BLOCK_M"]), B * HKV)](
        q, k, v, ctx_k, ctx_v, do, lse, delta, dq,
        *_strides(q), *_strides(k), *_strides(v),
        *(_strides(ctx_k) if Lc else (0, 0, 0)), *(_strides(ctx_v) if Lc else (0, 0, 0)),
        T, Lc, scale,
        HKV=HKV, G=H // HKV, D=D, HAS_CTX=Lc > 0, **cfg,
    )  # fmt: skip
    _frozen_attention_bwd_dkdv_kernel[(triton.cdiv(T, cfg["BLOCK_N"]), B * HKV)](
        q, k, v, do, lse, delta, dk, dv,
        *_strides(q), *_strides(k), *_strides(v),
        T, scale,
        HKV=HKV, G=H // HKV, D=D, **cfg,
    )  # fmt: skip
    return dq, dk, dv
