"""Gated delta rule over segments from a constant initial state: chunked (WY) forward and backward.

Within a chunk of BT tokens (q, k L2-normalised in the kernel, q scaled; cumulative log decay
G_i = sum_{j<=i} g_j; D_ij = exp(G_i - G_j) for j <= i; e_j = exp(G_C - G_j)), from the state S at its start:
    A = strict_lower(beta_i D_ij k_i.k_j),  T = (I + A)^-1         (16x16 blocks, then a Neumann product)
    W = T diag(beta exp(G)) K,  U = T diag(beta) V - W S          (the chunk's delta-rule updates)
    O = diag(exp(G)) Q S + (D * Q K^T) U
    S <- exp(G_C) S + (diag(e) K)^T U
G is summed and differenced in fp64 (|G| reaches thousands for large-decay heads, and fp32 differences
of nearby G would spoil dA_log); everything else is fp32, the products on tensor cores in tf32x3 (fp32 accuracy;
APOLLO_FAST_GDN_DOT_PRECISION=tf32 is faster and coarser).

Kernels, in launch order:
    _chunk_prepare_kernel          per (chunk, head), parallel: T and W (training forward and backward)
    _chunk_delta_rule_fwd_kernel   per (segment, head, V-block), sequential over chunks: o, the final state,
                                   and S at every chunk start when a backward will follow
    _chunk_bwd_dh_kernel           per (segment, head, V-block), sequential in reverse: dL/dS at chunk ends
    _chunk_bwd_kernel              per (chunk, head), parallel: every gradient of the chunk
dq and dk come out per value head; the caller sums the value heads that share a key head in a fixed order
(deterministic). Tensors are contiguous: q, k [B*T, Hk, K]; v, o [B*T, Hv, V]; g, beta [B*T, Hv].
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import utils
from .gdn_tiles import _segment, _state_tile


@triton.jit
def _load_normed(x, t0, n_valid, i_hk, eps, rt, ok, mk, HK: tl.constexpr, K: tl.constexpr, L2NORM: tl.constexpr):
    """Rows t0.. of q or k as [BT, BK] fp32, L2-normalised when L2NORM, and the 1/|x| factors.
    Rows past the segment end load as zeros."""
    m = (rt < n_valid)[:, None] & mk[None, :]
    b = tl.load(x + ((t0 + rt)[:, None] * HK + i_hk) * K + ok[None, :], mask=m, other=0.0).to(tl.float32)
    if L2NORM:
        r = 1.0 / tl.sqrt(tl.sum(b * b, 1) + eps)
    else:
        r = tl.full([b.shape[0]], 1.0, tl.float32)
    return b * r[:, None], r


@triton.jit
def _load_rows(x, t0, n_valid, i_h, rt, ov, mv, HV: tl.constexpr, V: tl.constexpr):
    """Rows t0.. of v, do [BT, BV] (this program's V-block) in fp32; zeros past the segment end."""
    m = (rt < n_valid)[:, None] & mv[None, :]
    return tl.load(x + ((t0 + rt)[:, None] * HV + i_h) * V + ov[None, :], mask=m, other=0.0).to(tl.float32)


@triton.jit
def _load_gates(g, beta, t0, n_valid, i_h, rt, HV: tl.constexpr):
    """g and beta of rows t0.. [BT] in fp32; zeros past the segment end (g = beta = 0 leaves the state as is)."""
    m = rt < n_valid
    b_g = tl.load(g + (t0 + rt) * HV + i_h, mask=m, other=0.0).to(tl.float32)
    b_beta = tl.load(beta + (t0 + rt) * HV + i_h, mask=m, other=0.0).to(tl.float32)
    return b_g, b_beta


@triton.jit
def _decays(b_g, rt):
    """-> D [BT, BT] = exp(G_i - G_j) on j <= i (0 above), exp(G) [BT], e = exp(G_C - G) [BT], exp(G_C)."""
    incl = rt[:, None] >= rt[None, :]
    g64 = b_g.to(tl.float64)
    gam = tl.sum(tl.where(incl, g64[None, :], 0.0), 1)
    gam_last = tl.sum(g64, 0)
    diff = tl.where(incl, gam[:, None] - gam[None, :], 0.0).to(tl.float32)
    D = tl.where(incl, tl.exp(diff), 0.0)
    return D, tl.exp(gam.to(tl.float32)), tl.exp((gam_last - gam).to(tl.float32)), tl.exp(gam_last.to(tl.float32))


@triton.jit
def _unit_lower_inverse(A, rt, BT: tl.constexpr, DOT_PREC: tl.constexpr):
    """(I + A)^-1 for a strictly lower A [BT, BT], on tensor cores.

    First the 16x16 diagonal blocks, all at once by forward substitution (15 steps; step i fixes row i of
    every block: row <- e_row - sum_j A_row,j row_j). Then, with Dinv their block-diagonal inverse and A_off
    A's part below the diagonal blocks, I + A = (I + A_in)(I + N) with N = Dinv A_off strictly block-lower,
    so N^(BT/16) = 0 and (I + A)^-1 = (I - N + N^2 - ...) Dinv.
    """
    BD: tl.constexpr = 16
    same = (rt // BD)[:, None] == (rt // BD)[None, :]
    A_in = tl.where(same, A, 0.0)
    eye = (rt[:, None] == rt[None, :]).to(tl.float32)
    Dinv = eye
    for i in range(1, BD):
        Dinv -= tl.dot(tl.where((rt % BD)[:, None] == i, A_in, 0.0), Dinv, input_precision=DOT_PREC)
    N = tl.dot(Dinv, A - A_in, input_precision=DOT_PREC)
    P = eye
    term = eye
    for _ in tl.static_range(BT // BD - 1):
        term = -tl.dot(term, N, input_precision=DOT_PREC)
        P += term
    return tl.dot(P, Dinv, input_precision=DOT_PREC)


@triton.jit
def _chunk_delta_rule_fwd_kernel(
    q,
    k,
    v,
    g,
    beta,
    h0,
    o,
    ht,
    ckpt,
    Tb,
    Wb,
    cu_seqlens,
    T,
    scale,
    eps,
    n_ckpt,
    h0_stride,
    HK: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_H0: tl.constexpr,
    STORE_HT: tl.constexpr,
    SAVE_CKPT: tl.constexpr,
    VARLEN: tl.constexpr,
    L2NORM: tl.constexpr,
    DOT_PREC: tl.constexpr,
    PREPARED: tl.constexpr,
):
    """Sequential over chunks, per (segment, value head, V-block). PREPARED: T and W come from
    _chunk_prepare_kernel (computed in parallel beforehand) instead of being computed here."""
    i_v = tl.program_id(0)
    i_nh = tl.program_id(1).to(tl.int64)
    i_n, i_h, i_hk, bos, eos = _segment(i_nh, cu_seqlens, T, HV, HK, VARLEN)
    ok, ov, mk, mv, mkv, kv_off = _state_tile(i_v, K, V, BK, BV)
    rt = tl.arange(0, BT)
    strict = rt[:, None] > rt[None, :]
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        S += tl.load(h0 + i_n * h0_stride + i_h * K * V + kv_off, mask=mkv, other=0.0).to(tl.float32)
    for c in range(0, tl.cdiv(eos - bos, BT)):
        t0 = bos + c * BT
        if SAVE_CKPT:
            tl.store(ckpt + (i_nh * n_ckpt + c) * K * V + kv_off, S, mask=mkv)
        b_q, _ = _load_normed(q, t0, eos - t0, i_hk, eps, rt, ok, mk, HK, K, L2NORM)
        b_k, _ = _load_normed(k, t0, eos - t0, i_hk, eps, rt, ok, mk, HK, K, L2NORM)
        b_g, b_beta = _load_gates(g, beta, t0, eos - t0, i_h, rt, HV)
        b_v = _load_rows(v, t0, eos - t0, i_h, rt, ov, mv, HV, V)
        b_q = b_q * scale
        D, eG, e, eG_last = _decays(b_g, rt)
        if PREPARED:
            base = i_nh * n_ckpt + c
            Tm = tl.load(Tb + base * BT * BT + rt[:, None] * BT + rt[None, :])
            W = tl.load(Wb + base * BT * K + rt[:, None] * K + ok[None, :], mask=mk[None, :], other=0.0)
        else:
            kk = tl.dot(b_k, tl.trans(b_k), input_precision=DOT_PREC)
            Tm = _unit_lower_inverse(tl.where(strict, b_beta[:, None] * D * kk, 0.0), rt, BT, DOT_PREC)
            W = tl.dot(Tm, (b_beta * eG)[:, None] * b_k, input_precision=DOT_PREC)
        U = tl.dot(Tm, b_beta[:, None] * b_v, input_precision=DOT_PREC) - tl.dot(W, S, input_precision=DOT_PREC)
        M = D * tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC)
        b_o = eG[:, None] * tl.dot(b_q, S, input_precision=DOT_PREC) + tl.dot(M, U, input_precision=DOT_PREC)
        rows = t0 + rt
        tl.store(
            o + (rows[:, None] * HV + i_h) * V + ov[None, :],
            b_o.to(o.dtype.element_ty),
            mask=(rt < eos - t0)[:, None] & mv[None, :],
        )
        S = eG_last * S + tl.dot(tl.trans(b_k * e[:, None]), U, input_precision=DOT_PREC)
    if STORE_HT:
        tl.store(ht + i_nh * K * V + kv_off, S, mask=mkv)


@triton.jit
def _chunk_prepare_kernel(
    k,
    g,
    beta,
    Tb,
    Wb,
    cu_seqlens,
    T,
    eps,
    n_ckpt,
    HK: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    VARLEN: tl.constexpr,
    L2NORM: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Per (chunk, head), in parallel: T = (I + A)^-1 [BT, BT] and W = T diag(beta exp(G)) K [BT, K], for the
    backward's two kernels (full tiles: rows past the end hold T = I, W = 0)."""
    c = tl.program_id(0)
    i_nh = tl.program_id(1).to(tl.int64)
    i_n, i_h, i_hk, bos, eos = _segment(i_nh, cu_seqlens, T, HV, HK, VARLEN)
    t0 = bos + c * BT
    if t0 < eos:
        rt = tl.arange(0, BT)
        ok = tl.arange(0, BK)
        mk = ok < K
        b_k, _ = _load_normed(k, t0, eos - t0, i_hk, eps, rt, ok, mk, HK, K, L2NORM)
        b_g, b_beta = _load_gates(g, beta, t0, eos - t0, i_h, rt, HV)
        D, eG, _, _ = _decays(b_g, rt)
        kk = tl.dot(b_k, tl.trans(b_k), input_precision=DOT_PREC)
        Tm = _unit_lower_inverse(tl.where(rt[:, None] > rt[None, :], b_beta[:, None] * D * kk, 0.0), rt, BT, DOT_PREC)
        W = tl.dot(Tm, (b_beta * eG)[:, None] * b_k, input_precision=DOT_PREC)
        base = i_nh * n_ckpt + c
        tl.store(Tb + base * BT * BT + rt[:, None] * BT + rt[None, :], Tm)
        tl.store(Wb + base * BT * K + rt[:, None] * K + ok[None, :], W, mask=mk[None, :])


@triton.jit
def _chunk_bwd_dh_kernel(
    q,
    k,
    g,
    do,
    dht,
    Wb,
    dh,
    cu_seqlens,
    T,
    scale,
    eps,
    n_ckpt,
    HK: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_DHT: tl.constexpr,
    VARLEN: tl.constexpr,
    L2NORM: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """The sequential part of the backward, per (segment, value head, V-block): walks the chunks in reverse and
    stores dL/dS at every chunk's end. Per chunk: dU = M^T dO + diag(e) K dS;
    dS <- exp(G_C) dS + (diag(exp(G)) Q)^T dO - W^T dU."""
    i_v = tl.program_id(0)
    i_nh = tl.program_id(1).to(tl.int64)
    i_n, i_h, i_hk, bos, eos = _segment(i_nh, cu_seqlens, T, HV, HK, VARLEN)
    ok, ov, mk, mv, mkv, kv_off = _state_tile(i_v, K, V, BK, BV)
    rt = tl.arange(0, BT)
    dS = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        dS += tl.load(dht + i_nh * K * V + kv_off, mask=mkv, other=0.0)
    n_chunks = tl.cdiv(eos - bos, BT)
    for c_rev in range(0, n_chunks):
        c = n_chunks - 1 - c_rev
        t0 = bos + c * BT
        base = i_nh * n_ckpt + c
        tl.store(dh + base * K * V + kv_off, dS, mask=mkv)
        b_q, _ = _load_normed(q, t0, eos - t0, i_hk, eps, rt, ok, mk, HK, K, L2NORM)
        b_k, _ = _load_normed(k, t0, eos - t0, i_hk, eps, rt, ok, mk, HK, K, L2NORM)
        b_g = tl.load(g + (t0 + rt) * HV + i_h, mask=rt < eos - t0, other=0.0).to(tl.float32)
        b_do = _load_rows(do, t0, eos - t0, i_h, rt, ov, mv, HV, V)
        D, eG, e, eG_last = _decays(b_g, rt)
        b_q = b_q * scale
        M = D * tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC)
        W = tl.load(Wb + base * BT * K + rt[:, None] * K + ok[None, :], mask=mk[None, :], other=0.0)
        dU = tl.dot(tl.trans(M), b_do, input_precision=DOT_PREC) + tl.dot(
            b_k * e[:, None], dS, input_precision=DOT_PREC
        )
        dS = (
            eG_last * dS
            + tl.dot(tl.trans(b_q * eG[:, None]), b_do, input_precision=DOT_PREC)
            - tl.dot(tl.trans(W), dU, input_precision=DOT_PREC)
        )


@triton.jit
def _chunk_bwd_kernel(
    q,
    k,
    v,
    g,
    beta,
    ckpt,
    dh,
    Tb,
    Wb,
    do,
    dq_out,
    dk_out,
    dv,
    dg_out,
    dbeta_out,
    cu_seqlens,
    T,
    scale,
    eps,
    n_ckpt,
    HK: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    VARLEN: tl.constexpr,
    L2NORM: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """The parallel part of the backward, per (chunk, value head): every gradient of one chunk from the state at its
    start (saved by the forward) and dL/dS at its end (from _chunk_bwd_dh_kernel).

    A loop over V-blocks accumulates the V-sums the K side needs, so the K side is computed once and complete:
        P1 = dO S0^T, P2 = U dS^T, dW = -dU S0^T  [BT, K];  dO U^T, dU (diag(beta) V)^T  [BT, BT].
    """
    c = tl.program_id(0)
    i_nh = tl.program_id(1).to(tl.int64)
    i_n, i_h, i_hk, bos, eos = _segment(i_nh, cu_seqlens, T, HV, HK, VARLEN)
    t0 = bos + c * BT
    if t0 < eos:
        rt = tl.arange(0, BT)
        ok = tl.arange(0, BK)
        mk = ok < K
        strict = rt[:, None] > rt[None, :]
        incl = rt[:, None] >= rt[None, :]
        n_valid = eos - t0
        mt = rt < n_valid
        rows = t0 + rt
        base = i_nh * n_ckpt + c
        b_g, b_beta = _load_gates(g, beta, t0, n_valid, i_h, rt, HV)
        D, eG, e, eG_last = _decays(b_g, rt)
        k0, _ = _load_normed(k, t0, n_valid, i_hk, eps, rt, ok, mk, HK, K, L2NORM)
        q0, _ = _load_normed(q, t0, n_valid, i_hk, eps, rt, ok, mk, HK, K, L2NORM)
        qk = tl.dot(q0 * scale, tl.trans(k0), input_precision=DOT_PREC)
        Tm = tl.load(Tb + base * BT * BT + rt[:, None] * BT + rt[None, :])
        W = tl.load(Wb + base * BT * K + rt[:, None] * K + ok[None, :], mask=mk[None, :], other=0.0)
        ke = k0 * e[:, None]
        P1 = tl.zeros([BT, BK], dtype=tl.float32)
        P2 = tl.zeros([BT, BK], dtype=tl.float32)
        dW = tl.zeros([BT, BK], dtype=tl.float32)
        dqk = tl.zeros([BT, BT], dtype=tl.float32)
        dT = tl.zeros([BT, BT], dtype=tl.float32)
        b_dbeta = tl.zeros([BT], dtype=tl.float32)
        dS_S0 = tl.zeros([BK], dtype=tl.float32)
        for i_v in range(0, tl.cdiv(V, BV)):
            _ok, ov, _mk, mv, mkv, kv_off = _state_tile(i_v, K, V, BK, BV)
            S0 = tl.load(ckpt + base * K * V + kv_off, mask=mkv, other=0.0)
            dS = tl.load(dh + base * K * V + kv_off, mask=mkv, other=0.0)
            b_v = _load_rows(v, t0, n_valid, i_h, rt, ov, mv, HV, V)
            b_do = _load_rows(do, t0, n_valid, i_h, rt, ov, mv, HV, V)
            bv = b_beta[:, None] * b_v
            U = tl.dot(Tm, bv, input_precision=DOT_PREC) - tl.dot(W, S0, input_precision=DOT_PREC)
            # adjoint of O = diag(exp(G)) Q S0 + M U (M = D * Q K^T) and S1 = exp(G_C) S0 + (diag(e) K)^T U
            dU = tl.dot(tl.trans(D * qk), b_do, input_precision=DOT_PREC) + tl.dot(ke, dS, input_precision=DOT_PREC)
            P1 += tl.dot(b_do, tl.trans(S0), input_precision=DOT_PREC)
            P2 += tl.dot(U, tl.trans(dS), input_precision=DOT_PREC)
            dW -= tl.dot(dU, tl.trans(S0), input_precision=DOT_PREC)
            dqk += tl.dot(b_do, tl.trans(U), input_precision=DOT_PREC)
            dT += tl.dot(dU, tl.trans(bv), input_precision=DOT_PREC)
            # adjoint of U = T diag(beta) V - W S0 on this V-block: dv and dbeta's V part
            dXU = tl.dot(tl.trans(Tm), dU, input_precision=DOT_PREC)
            tl.store(
                dv + (rows[:, None] * HV + i_h) * V + ov[None, :],
                (b_beta[:, None] * dXU).to(dv.dtype.element_ty),
                mask=mt[:, None] & mv[None, :],
            )
            b_dbeta += tl.sum(dXU * b_v, 1)
            dS_S0 += tl.sum(dS * S0, 1)
        # The K side. dgam_i = dL/dexp(G_i) exp(G_i); tau_ij = dL/dD_ij D_ij (j < i), the decays' gradients.
        # q and k are loaded again (L2 hits) rather than held through the loop: fewer live registers there.
        b_k, rk = _load_normed(k, t0, n_valid, i_hk, eps, rt, ok, mk, HK, K, L2NORM)
        b_qn, rq = _load_normed(q, t0, n_valid, i_hk, eps, rt, ok, mk, HK, K, L2NORM)
        b_q = b_qn * scale
        dqk = D * dqk
        tau = dqk * qk + tl.where(rt[:, None] == BT - 1, (tl.sum(P2 * b_k, 1) * e)[None, :], 0.0)  # e_j = D_{C,j}
        b_dk = tl.dot(tl.trans(dqk), b_q, input_precision=DOT_PREC) + e[:, None] * P2
        dgam = eG * tl.sum(P1 * b_q, 1)
        dgam_last = eG_last * tl.sum(dS_S0, 0)
        b_dq = (eG[:, None] * P1 + tl.dot(dqk, b_k, input_precision=DOT_PREC)) * scale
        if L2NORM:  # through x * rsqrt(|x|^2 + eps): dx = r (dy - y (y . dy))
            b_dq = rq[:, None] * (b_dq - b_qn * tl.sum(b_qn * b_dq, 1)[:, None])
        out = rows * HV + i_h
        mqk = mt[:, None] & mk[None, :]
        tl.store(dq_out + out[:, None] * K + ok[None, :], b_dq, mask=mqk)
        # adjoint of W = T diag(beta exp(G)) K
        dT += tl.dot(dW, tl.trans((b_beta * eG)[:, None] * b_k), input_precision=DOT_PREC)
        dXW = tl.dot(tl.trans(Tm), dW, input_precision=DOT_PREC)
        t2 = tl.sum(dXW * b_k, 1)
        b_dbeta += eG * t2
        dgam += b_beta * eG * t2
        b_dk += (b_beta * eG)[:, None] * dXW
        # adjoint of T = (I + A)^-1: dA = -T^T dT T^T on the strictly lower part; A = beta_i D_ij k_i.k_j
        dA = -tl.dot(tl.trans(Tm), tl.dot(dT, tl.trans(Tm), input_precision=DOT_PREC), input_precision=DOT_PREC)
        kk = tl.dot(b_k, tl.trans(b_k), input_precision=DOT_PREC)
        t3 = tl.where(strict, dA * D * kk, 0.0)
        b_dbeta += tl.sum(t3, 1)
        dkk = tl.where(strict, dA * D, 0.0) * b_beta[:, None]
        b_dk += tl.dot(dkk, b_k, input_precision=DOT_PREC) + tl.dot(tl.trans(dkk), b_k, input_precision=DOT_PREC)
        tau = tl.where(strict, tau + t3 * b_beta[:, None], 0.0)
        # To dg. Absolute decays exp(G_i) depend on g_l for l <= i: dg_l += sum_{i>=l} dgam_i (+ dgam_last: G_C
        # sums every g of the chunk; rows past the end have g = 0). Relative decays D_ij (j < i), with
        # tau_ij = dL/dD_ij D_ij, depend on g_l for j < l <= i: dg_l += sum_{i>=l} sum_{j<l} tau_ij. Summing that
        # rectangle directly, rather than through dG_i = sum_j tau_ij - sum_j tau_ji, avoids a cancellation that
        # costs large-decay heads their dA_log accuracy.
        tau_rows = tl.dot(tau, (rt[:, None] < rt[None, :]).to(tl.float32), input_precision=DOT_PREC)
        b_dg = tl.sum(tl.where(incl, dgam[:, None] + tau_rows, 0.0), 0) + dgam_last
        if L2NORM:
            b_dk = rk[:, None] * (b_dk - b_k * tl.sum(b_k * b_dk, 1)[:, None])
        tl.store(dk_out + out[:, None] * K + ok[None, :], b_dk, mask=mqk)
        tl.store(dg_out + out, b_dg, mask=mt)
        tl.store(dbeta_out + out, b_dbeta, mask=mt)


NUM_WARPS = 8  # the tiles are large ([32|64, 128] fp32): with 4 warps ptxas spills more (sm_90, K=128)
NUM_STAGES = 1  # software pipelining of the chunk loop would buffer [64, 128] tiles beyond sm_90's 227 KiB
# Left to itself, ptxas (CUDA 13.4, sm_90) gave _chunk_bwd_kernel 32 registers and a 13 KB stack; capped at 255
# it uses them all and spills half as much.
MAX_REGISTERS = 255
_LAUNCH = dict(num_warps=NUM_WARPS, num_stages=NUM_STAGES, maxnreg=MAX_REGISTERS)
BWD_BLOCK_V = 32  # the parallel backward walks V in blocks of 32: S0 and dL/dS tiles [K, 32] beside its sums


def _block_sizes(K: int, V: int) -> tuple[int, int]:
    BK = max(16, triton.next_power_of_2(K))
    # 32: the sequential kernels spill nothing (Triton 3.6, sm_90, 8 warps) and run 4 programs per (segment, head)
    BV = max(16, min(triton.next_power_of_2(V), 32))
    return BK, BV


DOT_PRECISION_ENV = "APOLLO_FAST_GDN_DOT_PRECISION"


def _dot_precision(dtype: torch.dtype) -> str:
    """tf32x3 unless APOLLO_FAST_GDN_DOT_PRECISION says otherwise. Plain tf32 (operands truncated to 10 mantissa
    bits) left bf16 runs at 0.90-0.93 of the tests' bound (1.5x PyTorch's own bf16 error) in a CPU emulation of
    the GPU's roundings, too close; tf32x3 is at 0.65, but spills twice as much in the backward (Triton 3.6)."""
    prec = os.environ.get(DOT_PRECISION_ENV) or "tf32x3"
    if prec not in ("tf32x3", "tf32", "ieee"):
        raise ValueError(f"{DOT_PRECISION_ENV}={prec!r}: use tf32x3, tf32 or ieee")
    return prec


def _prepare(
    k: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    n_seq: int,
    n_ckpt: int,
    eps: float,
    l2norm: bool,
    chunk: int,
    prec: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> T [N, Hv, C, BT, BT] and W [N, Hv, C, BT, K] fp32 for every chunk (one program per chunk and head)."""
    B, T, HK, K = k.shape
    HV = g.shape[2]
    Tb = utils.empty(n_seq, HV, n_ckpt, chunk, chunk, dtype=torch.float32, device=k.device)
    Wb = utils.empty(n_seq, HV, n_ckpt, chunk, K, dtype=torch.float32, device=k.device)
    _chunk_prepare_kernel[(n_ckpt, n_seq * HV)](
        k,
        g,
        beta,
        Tb,
        Wb,
        cu_seqlens,
        T,
        eps,
        n_ckpt,
        HK=HK,
        HV=HV,
        K=K,
        BT=chunk,
        BK=_block_sizes(K, 16)[0],
        VARLEN=cu_seqlens is not None,
        L2NORM=l2norm,
        DOT_PREC=prec,
        **_LAUNCH,
    )
    return Tb, Wb


def chunk_delta_rule_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    h0: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    n_seq: int,
    max_len: int,
    scale: float,
    eps: float,
    l2norm: bool,
    store_ht: bool,
    save_ckpt: bool,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """q, k [B, T, Hk, K]; v [B, T, Hv, V]; g fp32, beta [B, T, Hv]; h0 [N|1, Hv, K, V] fp32 or None
    -> o [B, T, Hv, V] (v's dtype), final state [N, Hv, K, V] fp32, chunk-start states [N, Hv, C, K, V] fp32."""
    B, T, HK, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    BK, BV = _block_sizes(K, V)
    n_ckpt = triton.cdiv(max_len, chunk) if save_ckpt else 0
    o = utils.empty(*v.shape, dtype=v.dtype, device=v.device)
    ht = utils.empty(n_seq, HV, K, V, dtype=torch.float32, device=q.device) if store_ht else None
    ckpt = utils.empty(n_seq, HV, n_ckpt, K, V, dtype=torch.float32, device=q.device) if save_ckpt else None
    h0_stride = 0 if h0 is None or h0.shape[0] == 1 else HV * K * V
    prec = _dot_precision(q.dtype)
    # Training: T and W of every chunk in parallel first (the sequential kernel gets lighter). Inference (no
    # backward, possibly a context of many thousand tokens): all in one kernel, no [chunks, ...] buffers.
    Tb = Wb = None
    if save_ckpt:
        Tb, Wb = _prepare(k, g, beta, cu_seqlens, n_seq, n_ckpt, eps, l2norm, chunk, prec)
    _chunk_delta_rule_fwd_kernel[(triton.cdiv(V, BV), n_seq * HV)](
        q,
        k,
        v,
        g,
        beta,
        h0,
        o,
        ht,
        ckpt,
        Tb,
        Wb,
        cu_seqlens,
        T,
        scale,
        eps,
        n_ckpt,
        h0_stride,
        HK=HK,
        HV=HV,
        K=K,
        V=V,
        BT=chunk,
        BK=BK,
        BV=BV,
        USE_H0=h0 is not None,
        STORE_HT=store_ht,
        SAVE_CKPT=save_ckpt,
        VARLEN=cu_seqlens is not None,
        L2NORM=l2norm,
        DOT_PREC=prec,
        PREPARED=save_ckpt,
        **_LAUNCH,
    )
    return o, ht, ckpt


def chunk_delta_rule_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    ckpt: torch.Tensor,
    do: torch.Tensor,
    dht: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    n_seq: int,
    scale: float,
    eps: float,
    l2norm: bool,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three launches: T and W per chunk (parallel), dL/dS at chunk ends (sequential over chunks), then every
    chunk's gradients (parallel). -> dq, dk [1, B, T, Hv, K] fp32 (already through the L2 norm, per value head),
    dv [B, T, Hv, V] (v's dtype), dg, dbeta [1, B, T, Hv] fp32 (the leading 1: the caller's V-block sum)."""
    B, T, HK, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    BK, BV = _block_sizes(K, V)
    NV = triton.cdiv(V, BV)
    n_ckpt = ckpt.shape[2]
    dev = q.device
    prec = _dot_precision(q.dtype)
    meta = dict(
        HK=HK, HV=HV, K=K, BT=chunk, BK=BK, VARLEN=cu_seqlens is not None, L2NORM=l2norm, DOT_PREC=prec, **_LAUNCH
    )
    Tb, Wb = _prepare(k, g, beta, cu_seqlens, n_seq, n_ckpt, eps, l2norm, chunk, prec)
    dh = utils.empty(n_seq, HV, n_ckpt, K, V, dtype=torch.float32, device=dev)
    _chunk_bwd_dh_kernel[(NV, n_seq * HV)](
        q,
        k,
        g,
        do,
        dht,
        Wb,
        dh,
        cu_seqlens,
        T,
        scale,
        eps,
        n_ckpt,
        V=V,
        BV=BV,
        USE_DHT=dht is not None,
        **meta,
    )
    dq_part = utils.empty(1, B, T, HV, K, dtype=torch.float32, device=dev)
    dk_part = utils.empty(1, B, T, HV, K, dtype=torch.float32, device=dev)
    dv = utils.empty(*v.shape, dtype=v.dtype, device=v.device)
    dg_part = utils.empty(1, B, T, HV, dtype=torch.float32, device=dev)
    dbeta_part = utils.empty(1, B, T, HV, dtype=torch.float32, device=dev)
    _chunk_bwd_kernel[(n_ckpt, n_seq * HV)](
        q,
        k,
        v,
        g,
        beta,
        ckpt,
        dh,
        Tb,
        Wb,
        do,
        dq_part,
        dk_part,
        dv,
        dg_part,
        dbeta_part,
        cu_seqlens,
        T,
        scale,
        eps,
        n_ckpt,
        V=V,
        BV=BWD_BLOCK_V,
        **meta,
    )
    return dq_part, dk_part, dv, dg_part, dbeta_part
