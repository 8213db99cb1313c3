"""`segment_delta_rule(...)`: the gated delta rule over segments that start from a frozen state."""

from __future__ import annotations

import torch

from ..backend import resolve_backend
from .naive import L2NORM_EPS, chunk_delta_rule_ref, segment_delta_rule_ref

__all__ = ["segment_delta_rule"]

ALGORITHMS = ("auto", "chunk", "recurrent")
CHUNK_SIZE = 32  # tokens per chunk of the WY kernels: at 64 the backward needs > 227 KiB of shared memory (sm_90)
CHUNK_MIN_LEN = 16  # 'auto' runs shorter segments token by token: a chunk would be mostly padding


class _SegmentDeltaRuleFunction(torch.autograd.Function):
    """algo 'recurrent' (block = checkpoint interval in tokens) or 'chunk' (block = chunk size)."""

    @staticmethod
    def forward(
        ctx, q, k, v, g, beta, h0, cu_seqlens, n_seq, max_len, scale, l2norm, output_final_state, algo, block, save
    ):
        from apollo_fast.kernels import gdn_chunk, gdn_recurrent

        q, k, v, beta = q.contiguous(), k.contiguous(), v.contiguous(), beta.contiguous()
        g = g.float().contiguous()
        fwd = gdn_chunk.chunk_delta_rule_fwd if algo == "chunk" else gdn_recurrent.segment_delta_rule_fwd
        o, ht, ckpt = fwd(
            q,
            k,
            v,
            g,
            beta,
            h0,
            cu_seqlens,
            n_seq,
            max_len,
            scale,
            L2NORM_EPS,
            l2norm,
            output_final_state,
            save,
            block,
        )
        ctx.save_for_backward(q, k, v, g, beta, ckpt, cu_seqlens)
        ctx.meta = (n_seq, scale, l2norm, algo, block)
        if ht is None:
            return o
        return o, ht

    @staticmethod
    def backward(ctx, do, dht=None):
        from apollo_fast.kernels import gdn_chunk, gdn_recurrent

        q, k, v, g, beta, ckpt, cu_seqlens = ctx.saved_tensors
        n_seq, scale, l2norm, algo, block = ctx.meta
        B, T, HK, K = q.shape
        HV = v.shape[2]
        group = HV // HK
        if do is None:
            do = torch.zeros_like(v)
        bwd = gdn_chunk.chunk_delta_rule_bwd if algo == "chunk" else gdn_recurrent.segment_delta_rule_bwd
        dq_p, dk_p, dv, dg_p, dbeta_p = bwd(
            q,
            k,
            v,
            g,
            beta,
            ckpt,
            do.contiguous(),
            None if dht is None else dht.float().contiguous(),
            cu_seqlens,
            n_seq,
            scale,
            L2NORM_EPS,
            l2norm,
            block,
        )
        # fixed-order sums over V-blocks and the value heads that share a key head: deterministic
        NV = dq_p.shape[0]
        dq = dq_p.view(NV, B, T, HK, group, K).sum((0, 4)).to(q.dtype)
        dk = dk_p.view(NV, B, T, HK, group, K).sum((0, 4)).to(k.dtype)
        dg = dg_p.sum(0)
        dbeta = dbeta_p.sum(0).to(beta.dtype)
        return dq, dk, dv, dg, dbeta, None, None, None, None, None, None, None, None, None, None


def _check_tensor(name: str, t: object, dims: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"segment_delta_rule: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"segment_delta_rule: {name} must be floating point, got {t.dtype}")
    if t.dim() != dims:
        raise ValueError(f"segment_delta_rule: {name} must have {dims} dims, got shape {tuple(t.shape)}")
    return t


def _validate(q, k, v, g, beta, initial_state, cu_seqlens) -> tuple[int, int]:
    """Checks shapes, dtypes and devices; returns (number of segments N, longest segment length)."""
    for name, t, d in (("q", q, 4), ("k", k, 4), ("v", v, 4), ("g", g, 3), ("beta", beta, 3)):
        _check_tensor(name, t, d)
    B, T, Hk, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"segment_delta_rule: k shape {tuple(k.shape)} != q shape {tuple(q.shape)}")
    if v.shape[:2] != (B, T):
        raise ValueError(f"segment_delta_rule: v must be [B, T, Hv, V] = [{B}, {T}, ...], got {tuple(v.shape)}")
    Hv, V = v.shape[2], v.shape[3]
    if Hk == 0 or Hv % Hk != 0:
        raise ValueError(f"segment_delta_rule: Hv={Hv} value heads must be a multiple of Hk={Hk} key heads")
    if K == 0 or V == 0:
        raise ValueError(f"segment_delta_rule: K={K} and V={V} must be positive")
    for name, t in (("g", g), ("beta", beta)):
        if t.shape != (B, T, Hv):
            raise ValueError(f"segment_delta_rule: {name} must be [B, T, Hv] = [{B}, {T}, {Hv}], got {tuple(t.shape)}")
    tensors = [q, k, v, g, beta]
    if cu_seqlens is None:
        n_seq, max_len = B, T
    else:
        if (
            not isinstance(cu_seqlens, torch.Tensor)
            or cu_seqlens.dim() != 1
            or cu_seqlens.dtype
            not in (
                torch.int32,
                torch.int64,
            )
        ):
            raise TypeError("segment_delta_rule: cu_seqlens must be a 1-D int32/int64 tensor [N+1]")
        if B != 1:
            raise ValueError(f"segment_delta_rule: cu_seqlens needs B == 1 (packed segments), got B={B}")
        cu = cu_seqlens.tolist()
        lengths = [e - s for s, e in zip(cu[:-1], cu[1:], strict=True)]
        if len(cu) < 2 or cu[0] != 0 or cu[-1] != T or min(lengths) < 0:
            raise ValueError(f"segment_delta_rule: cu_seqlens must rise from 0 to T={T} in order, got {cu}")
        n_seq, max_len = len(cu) - 1, max(lengths)
        tensors.append(cu_seqlens)
    if initial_state is not None:
        _check_tensor("initial_state", initial_state, 4)
        if initial_state.dtype != torch.float32 and initial_state.dtype != torch.float64:
            raise TypeError(f"segment_delta_rule: initial_state must be fp32, got {initial_state.dtype}")
        if initial_state.shape[1:] != (Hv, K, V) or initial_state.shape[0] not in (1, n_seq):
            raise ValueError(
                f"segment_delta_rule: initial_state must be [{n_seq} or 1, {Hv}, {K}, {V}], "
                f"got {tuple(initial_state.shape)}"
            )
        tensors.append(initial_state)
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"segment_delta_rule: all inputs must be on one device, got {sorted(map(str, devices))}")
    return n_seq, max_len


def segment_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
    output_final_state: bool = True,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    algorithm: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule from a constant initial state (no gradient to it, never written).

    q, k [B, T, Hk, K]; v [B, T, Hv, V] (value head j uses key head j // (Hv // Hk)); g (log-decay), beta
    [B, T, Hv]; initial_state [B|N|1, Hv, K, V] fp32 or None (zeros). Per token: S <- exp(g) S;
    S <- S + k (beta (v - S^T k))^T; o = S^T (scale q). Returns o [B, T, Hv, V] in v's dtype and the final
    state [B|N, Hv, K, V] fp32 (None unless output_final_state); differentiable w.r.t. q, k, v, g, beta.
    backend: 'auto' | 'reference' | 'triton' (apollo_fast.backend; fp64 inputs run on the reference).
    algorithm: 'chunk' (the WY form: chunks of 32 tokens on tensor cores in Triton, 64 in the reference),
    'recurrent' (token by token) or 'auto' (chunk from CHUNK_MIN_LEN tokens on, recurrent below).
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"segment_delta_rule: algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    n_seq, max_len = _validate(q, k, v, g, beta, initial_state, cu_seqlens)
    K = q.shape[3]
    scale = K**-0.5 if scale is None else float(scale)
    if algorithm == "auto":
        algorithm = "chunk" if max_len >= CHUNK_MIN_LEN else "recurrent"
    fp64 = torch.float64 in (q.dtype, k.dtype, v.dtype, g.dtype)
    tensors = (q, k, v, g, beta)
    chosen = resolve_backend(
        backend, {t.device for t in tensors}, op="segment_delta_rule", unsupported="fp64 inputs" if fp64 else None
    )
    kwargs = dict(scale=scale, use_qk_l2norm=use_qk_l2norm, output_final_state=output_final_state)
    if chosen == "reference":
        ref = chunk_delta_rule_ref if algorithm == "chunk" else segment_delta_rule_ref
        return ref(q, k, v, g, beta, initial_state, cu_seqlens=cu_seqlens, **kwargs)
    from apollo_fast.kernels.gdn_recurrent import default_ckpt_every

    block = CHUNK_SIZE if algorithm == "chunk" else default_ckpt_every(max_len)
    h0 = None if initial_state is None else initial_state.detach().float().contiguous()
    # checkpoints for the backward only when one can happen (needs_input_grad is also set under no_grad)
    save = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    out = _SegmentDeltaRuleFunction.apply(
        q,
        k,
        v,
        g,
        beta,
        h0,
        cu_seqlens,
        n_seq,
        max_len,
        scale,
        bool(use_qk_l2norm),
        bool(output_final_state),
        algorithm,
        block,
        save,
    )
    if output_final_state:
        return out
    return out, None
