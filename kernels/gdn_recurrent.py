"""Gated delta rule over segments from a constant initial state: recurrent forward and backward.

One program per (segment, value head, V-block) holds the fp32 state tile S[K, BV] in registers and
walks the tokens. Per token (q, k L2-normalised in the kernel, q scaled):
    S <- exp(g) S;  u = beta (v - S^T k);  S <- S + k u^T;  o = S^T q.
The forward saves S every `ckpt_every` tokens; the backward walks checkpoint chunks in reverse,
recomputes the chunk's states into a per-program scratch buffer, then runs the adjoint per token:
    dS += q do^T; dq = S do; du = dS^T k; dk = dS u; dv = beta du; dbeta = du.(v - S_a^T k);
    dS += k (-beta du)^T; dk += S_a (-beta du); dg = <dS, S_a>; dS <- exp(g) dS
where S_a = exp(g) S_prev. dq, dk (already through the L2 norm), dg and dbeta are partial sums over
this V-block; the caller adds them over V-blocks and grouped heads in a fixed order (deterministic).
Tensors are contiguous: q, k [B*T, Hk, K]; v, o [B*T, Hv, V]; g, beta [B*T, Hv].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import utils
from .gdn_tiles import _segment, _state_tile


@triton.jit
def _load_token(
    q, k, v, g, beta, t, i_hk, i_h, ok, ov, mk, mv, HK: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr
):
    """Token t's raw q, k, the v block, g and beta (all fp32)."""
    b_q = tl.load(q + (t * HK + i_hk) * K + ok, mask=mk, other=0.0).to(tl.float32)
    b_k = tl.load(k + (t * HK + i_hk) * K + ok, mask=mk, other=0.0).to(tl.float32)
    b_v = tl.load(v + (t * HV + i_h) * V + ov, mask=mv, other=0.0).to(tl.float32)
    b_g = tl.load(g + t * HV + i_h).to(tl.float32)
    b_beta = tl.load(beta + t * HV + i_h).to(tl.float32)
    return b_q, b_k, b_v, b_g, b_beta


@triton.jit
def _rsqrt_norm(x, eps):
    """1 / sqrt(sum(x^2) + eps) over the K axis."""
    return 1.0 / tl.sqrt(tl.sum(x * x, 0) + eps)


@triton.jit
def _segment_delta_rule_fwd_kernel(
    q,
    k,
    v,
    g,
    beta,
    h0,
    o,
    ht,
    ckpt,
    cu_seqlens,
    T,
    scale,
    eps,
    ckpt_every,
    n_ckpt,
    h0_stride,
    HK: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_H0: tl.constexpr,
    STORE_HT: tl.constexpr,
    SAVE_CKPT: tl.constexpr,
    VARLEN: tl.constexpr,
    L2NORM: tl.constexpr,
):
    i_v = tl.program_id(0)
    i_nh = tl.program_id(1).to(tl.int64)
    i_n, i_h, i_hk, bos, eos = _segment(i_nh, cu_seqlens, T, HV, HK, VARLEN)
    ok, ov, mk, mv, mkv, kv_off = _state_tile(i_v, K, V, BK, BV)
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        S += tl.load(h0 + i_n * h0_stride + i_h * K * V + kv_off, mask=mkv, other=0.0).to(tl.float32)
    for t in range(bos, eos):
        if SAVE_CKPT:
            if (t - bos) % ckpt_every == 0:
                tl.store(ckpt + (i_nh * n_ckpt + (t - bos) // ckpt_every) * K * V + kv_off, S, mask=mkv)
        b_q, b_k, b_v, b_g, b_beta = _load_token(q, k, v, g, beta, t, i_hk, i_h, ok, ov, mk, mv, HK, HV, K, V)
        if L2NORM:
            b_q = b_q * _rsqrt_norm(b_q, eps)
            b_k = b_k * _rsqrt_norm(b_k, eps)
        S = S * tl.exp(b_g)
        b_u = b_beta * (b_v - tl.sum(S * b_k[:, None], 0))
        S = S + b_k[:, None] * b_u[None, :]
        b_o = tl.sum(S * (b_q * scale)[:, None], 0)
        tl.store(o + (t * HV + i_h) * V + ov, b_o.to(o.dtype.element_ty), mask=mv)
    if STORE_HT:
        tl.store(ht + i_nh * K * V + kv_off, S, mask=mkv)


@triton.jit
def _segment_delta_rule_bwd_kernel(
    q,
    k,
    v,
    g,
    beta,
    ckpt,
    do,
    dht,
    scratch,
    dq_part,
    dk_part,
    dv,
    dg_part,
    dbeta_part,
    cu_seqlens,
    T,
    NT,
    scale,
    eps,
    ckpt_every,
    n_ckpt,
    HK: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_DHT: tl.constexpr,
    VARLEN: tl.constexpr,
    L2NORM: tl.constexpr,
):
    i_v = tl.program_id(0)
    i_nh = tl.program_id(1).to(tl.int64)
    NV = tl.num_programs(0)
    i_n, i_h, i_hk, bos, eos = _segment(i_nh, cu_seqlens, T, HV, HK, VARLEN)
    ok, ov, mk, mv, mkv, kv_off = _state_tile(i_v, K, V, BK, BV)
    p_ckpt = ckpt + i_nh * n_ckpt * K * V + kv_off
    # scratch: this program's states before each token of one chunk, [ckpt_every, BK, BV]
    p_scr = scratch + (i_nh * NV + i_v) * ckpt_every * BK * BV + ok[:, None] * BV + tl.arange(0, BV)[None, :]
    # partial outputs: [NV, B*T, HV, ...]
    part_kv = i_v.to(tl.int64) * NT * HV
    dS = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        dS += tl.load(dht + i_nh * K * V + kv_off, mask=mkv, other=0.0)
    n_chunks = tl.cdiv(eos - bos, ckpt_every)
    for c_rev in range(0, n_chunks):
        c = n_chunks - 1 - c_rev
        start = bos + c * ckpt_every
        end = tl.minimum(start + ckpt_every, eos)
        S = tl.load(p_ckpt + c * K * V, mask=mkv, other=0.0)
        for t in range(start, end):  # recompute the chunk's states
            tl.store(p_scr + (t - start) * BK * BV, S)
            b_q, b_k, b_v, b_g, b_beta = _load_token(q, k, v, g, beta, t, i_hk, i_h, ok, ov, mk, mv, HK, HV, K, V)
            if L2NORM:
                b_k = b_k * _rsqrt_norm(b_k, eps)
            S = S * tl.exp(b_g)
            b_u = b_beta * (b_v - tl.sum(S * b_k[:, None], 0))
            S = S + b_k[:, None] * b_u[None, :]
        tl.debug_barrier()
        for t_rev in range(0, end - start):  # adjoint, last token first
            t = end - 1 - t_rev
            S_prev = tl.load(p_scr + (t - start) * BK * BV)
            b_q, b_k, b_v, b_g, b_beta = _load_token(q, k, v, g, beta, t, i_hk, i_h, ok, ov, mk, mv, HK, HV, K, V)
            if L2NORM:
                rq = _rsqrt_norm(b_q, eps)
                rk = _rsqrt_norm(b_k, eps)
                b_q = b_q * rq
                b_k = b_k * rk
            b_do = tl.load(do + (t * HV + i_h) * V + ov, mask=mv, other=0.0).to(tl.float32)
            eg = tl.exp(b_g)
            S_a = S_prev * eg
            b_r = b_v - tl.sum(S_a * b_k[:, None], 0)  # v - S_a^T k
            b_u = b_beta * b_r
            S_t = S_a + b_k[:, None] * b_u[None, :]
            dS += (b_q * scale)[:, None] * b_do[None, :]
            b_dq = tl.sum(S_t * b_do[None, :], 1) * scale
            b_du = tl.sum(dS * b_k[:, None], 0)
            b_dk = tl.sum(dS * b_u[None, :], 1)
            b_dv = b_beta * b_du
            b_dbeta = tl.sum(b_du * b_r, 0)
            b_dp = -b_beta * b_du
            dS += b_k[:, None] * b_dp[None, :]
            b_dk += tl.sum(S_a * b_dp[None, :], 1)
            b_dg = tl.sum(tl.sum(dS * S_a, 1), 0)
            dS = dS * eg
            if L2NORM:  # through x * rsqrt(|x|^2 + eps): dx = r (dy - y (y . dy))
                b_dq = rq * (b_dq - b_q * tl.sum(b_q * b_dq, 0))
                b_dk = rk * (b_dk - b_k * tl.sum(b_k * b_dk, 0))
            tok = part_kv + t * HV + i_h
            tl.store(dq_part + tok * K + ok, b_dq, mask=mk)
            tl.store(dk_part + tok * K + ok, b_dk, mask=mk)
            tl.store(dv + (t * HV + i_h) * V + ov, b_dv.to(dv.dtype.element_ty), mask=mv)
            tl.store(dg_part + tok, b_dg)
            tl.store(dbeta_part + tok, b_dbeta)
        tl.debug_barrier()


def _block_sizes(K: int, V: int) -> tuple[int, int]:
    BK = triton.next_power_of_2(K)
    BV = min(triton.next_power_of_2(V), max(16, 4096 // BK))  # state tile <= 4096 fp32 per program
    return BK, BV


def default_ckpt_every(max_len: int) -> int:
    """Checkpoint interval ~ sqrt(segment length): balances checkpoint memory against scratch memory."""
    return max(1, int(round(max_len**0.5)))


def segment_delta_rule_fwd(
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
    ckpt_every: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """q, k [B, T, Hk, K]; v [B, T, Hv, V]; g fp32, beta [B, T, Hv]; h0 [N|1, Hv, K, V] fp32 or None
    -> o [B, T, Hv, V] (v's dtype), final state [N, Hv, K, V] fp32, checkpoints [N, Hv, C, K, V] fp32."""
    B, T, HK, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    BK, BV = _block_sizes(K, V)
    n_ckpt = triton.cdiv(max_len, ckpt_every) if save_ckpt else 0
    o = utils.empty(*v.shape, dtype=v.dtype, device=v.device)
    ht = utils.empty(n_seq, HV, K, V, dtype=torch.float32, device=q.device) if store_ht else None
    ckpt = utils.empty(n_seq, HV, n_ckpt, K, V, dtype=torch.float32, device=q.device) if save_ckpt else None
    h0_stride = 0 if h0 is None or h0.shape[0] == 1 else HV * K * V
    grid = (triton.cdiv(V, BV), n_seq * HV)
    _segment_delta_rule_fwd_kernel[grid](
        q,
        k,
        v,
        g,
        beta,
        h0,
        o,
        ht,
        ckpt,
        cu_seqlens,
        T,
        scale,
        eps,
        ckpt_every,
        n_ckpt,
        h0_stride,
        HK=HK,
        HV=HV,
        K=K,
        V=V,
        BK=BK,
        BV=BV,
        USE_H0=h0 is not None,
        STORE_HT=store_ht,
        SAVE_CKPT=save_ckpt,
        VARLEN=cu_seqlens is not None,
        L2NORM=l2norm,
    )
    return o, ht, ckpt


def segment_delta_rule_bwd(
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
    ckpt_every: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> partial dq, dk [NV, B, T, Hv, K] fp32 (already through the L2 norm, per value head), dv [B, T, Hv, V]
    (v's dtype), partial dg, dbeta [NV, B, T, Hv] fp32."""
    B, T, HK, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    BK, BV = _block_sizes(K, V)
    NV = triton.cdiv(V, BV)
    dev = q.device
    scratch = utils.empty(n_seq * HV * NV * ckpt_every * BK * BV, dtype=torch.float32, device=dev)
    dq_part = utils.empty(NV, B, T, HV, K, dtype=torch.float32, device=dev)
    dk_part = utils.empty(NV, B, T, HV, K, dtype=torch.float32, device=dev)
    dv = utils.empty(*v.shape, dtype=v.dtype, device=v.device)
    dg_part = utils.empty(NV, B, T, HV, dtype=torch.float32, device=dev)
    dbeta_part = utils.empty(NV, B, T, HV, dtype=torch.float32, device=dev)
    _segment_delta_rule_bwd_kernel[(NV, n_seq * HV)](
        q,
        k,
        v,
        g,
        beta,
        ckpt,
        do,
        dht,
        scratch,
        dq_part,
        dk_part,
        dv,
        dg_part,
        dbeta_part,
        cu_seqlens,
        T,
        B * T,
        scale,
        eps,
        ckpt_every,
        ckpt.shape[2],
        HK=HK,
        HV=HV,
        K=K,
        V=V,
        BK=BK,
        BV=BV,
        USE_DHT=dht is not None,
        VARLEN=cu_seqlens is not None,
        L2NORM=l2norm,
    )
    return dq_part, dk_part, dv, dg_part, dbeta_part
