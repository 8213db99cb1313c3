"""Causal softmax attention of a segment after a frozen context, without copying the context.

q [B, H, T, D] at absolute positions Lc..Lc+T-1 attends to every key of the frozen ctx_k/ctx_v [B|1, Hkv, Lc, D]
(constants: never receive gradient, never written) and causally to the segment's own k, v [B, Hkv, T, D].
GQA: query head h uses kv head h // (H / Hkv); K/V are never repeated per head.

Backends (the `backend` keyword of `attend_after_context`; the rule is apollo_fast.backend's):
  triton     the flash-attention kernels of `apollo_fast.kernels.frozen_attention`: the context is read in place
             (one copy serves every batch row), nothing is saved for backward but q, k, v, o and an fp32
             logsumexp per query row, and the context gets no gradient buffer. No dropout, head dim <= 256,
             fp16/bf16/fp32.
  reference  plain PyTorch, exact in fp32: scores against the context by a matmul that broadcasts the shared
             context over the batch (no expanded copy), scores against the segment apart, merged with a shared
             row max and denominator; autograd does the backward. Saves the context's softmax numerators
             [B, H, T, Lc] (fp32) for backward. Without a context (None or Lc = 0): PyTorch's causal SDPA.
The specification both are tested against: apollo_fast.reference.frozen_context.attend_after_context_ref.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backend import resolve_backend

__all__ = ["attend_after_context"]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_MAX_HEAD_DIM = 256


class _FrozenAttentionFunction(torch.autograd.Function):
    """Triton forward/backward; the context tensors are inputs that never get a gradient."""

    @staticmethod
    def forward(ctx, q, k, v, ctx_k, ctx_v, scaling):
        from apollo_fast.kernels.frozen_attention import frozen_attention_fwd

        q, k, v = (_last_dim_dense(t) for t in (q, k, v))
        if ctx_k is not None:  # a shared context becomes a batch-stride-0 view, never a copy
            ctx_k = _last_dim_dense(ctx_k).expand(q.shape[0], -1, -1, -1)
            ctx_v = _last_dim_dense(ctx_v).expand(q.shape[0], -1, -1, -1)
        o, lse = frozen_attention_fwd(q, k, v, ctx_k, ctx_v, scaling)
        ctx.save_for_backward(q, k, v, ctx_k, ctx_v, o, lse)
        ctx.scaling = scaling
        return o

    @staticmethod
    def backward(ctx, do):
        from apollo_fast.kernels.frozen_attention import frozen_attention_bwd

        q, k, v, ctx_k, ctx_v, o, lse = ctx.saved_tensors
        dq, dk, dv = frozen_attention_bwd(q, k, v, ctx_k, ctx_v, o, lse, do.contiguous(), ctx.scaling)
        return dq, dk, dv, None, None, None


def _last_dim_dense(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _triton_gap(q: torch.Tensor, dropout_p: float) -> str | None:
    """Why the Triton kernels cannot serve this call, or None."""
    if dropout_p > 0:
        return "dropout (the kernels have no dropout; pass dropout_p=0)"
    if q.dtype not in _TRITON_DTYPES:
        return f"dtype {q.dtype}"
    if q.shape[-1] > _TRITON_MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {_TRITON_MAX_HEAD_DIM}"
    return None


def _check_shapes(q, k, v, ctx_k, ctx_v) -> None:
    bsz, heads, t, d = q.shape
    kv_heads = k.shape[1]
    if k.shape != (bsz, kv_heads, t, d) or v.shape != k.shape or kv_heads == 0 or heads % kv_heads:
        raise ValueError(
            f"attend_after_context: q {tuple(q.shape)} needs k, v [B, Hkv, T, D] with H % Hkv == 0, "
            f"got k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if ctx_k is None:
        return
    lc = ctx_k.shape[2]
    if ctx_k.shape[0] not in (1, bsz) or ctx_k.shape[1:] != (kv_heads, lc, d) or ctx_v.shape != ctx_k.shape:
        raise ValueError(
            f"attend_after_context: ctx_k, ctx_v must be [1 or {bsz}, {kv_heads}, Lc, {d}], "
            f"got {tuple(ctx_k.shape)}, {tuple(ctx_v.shape)}"
        )


def _to_ctx_rows(x: torch.Tensor, shared: bool) -> torch.Tensor:
    """[B, Hkv, R, ...] per-row values -> the context matmul's row layout: [1, Hkv, B*R, ...] if shared."""
    if not shared:
        return x
    return x.transpose(0, 1).reshape(1, x.shape[1], x.shape[0] * x.shape[2], *x.shape[3:])


def _from_ctx_rows(x: torch.Tensor, bsz: int, shared: bool) -> torch.Tensor:
    """Inverse of _to_ctx_rows."""
    if not shared:
        return x
    return x.reshape(x.shape[1], bsz, x.shape[2] // bsz, *x.shape[3:]).transpose(0, 1)


def _attend_reference(q, k, v, ctx_k, ctx_v, scaling: float, dropout_p: float) -> torch.Tensor:
    """Exact plain-PyTorch attention after the context (fp32 math, fp64 for fp64 inputs); see the module doc."""
    bsz, heads, t, d = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    shared = ctx_k.shape[0] == 1 and bsz > 1
    ctx_k, ctx_v = ctx_k.detach().to(acc), ctx_v.detach().to(acc)  # no copy when already fp32
    # Fold the query heads of one KV group into rows r = g * T + t; K/V are never repeated per head.
    q_rows = q.to(acc).reshape(bsz, kv_heads, groups * t, d)
    s_seg = torch.matmul(q_rows, k.to(acc).transpose(-1, -2)) * scaling  # [B, Hkv, G*T, T]
    row_t = torch.arange(t, device=q.device).repeat(groups)
    s_seg = s_seg.masked_fill(torch.arange(t, device=q.device)[None, :] > row_t[:, None], float("-inf"))
    # One buffer of context scores [Bc', Hkv, R', Lc]: shifted and exponentiated in place (autograd keeps it once).
    e_ctx = torch.matmul(_to_ctx_rows(q_rows, shared), ctx_k.transpose(-1, -2)).mul_(scaling)
    # Softmax over [context | segment] keys with one row max: a constant (the softmax does not depend on it).
    m = torch.maximum(_from_ctx_rows(e_ctx.detach().amax(-1), bsz, shared), s_seg.detach().amax(-1))
    e_ctx = e_ctx.sub_(_to_ctx_rows(m, shared)[..., None]).exp_()
    e_seg = torch.exp(s_seg - m[..., None])
    denom = _from_ctx_rows(e_ctx.sum(-1), bsz, shared) + e_seg.sum(-1)
    if dropout_p > 0:  # dropout of the normalised weights = dropout of the numerators
        e_ctx, e_seg = F.dropout(e_ctx, dropout_p), F.dropout(e_seg, dropout_p)
    o = _from_ctx_rows(torch.matmul(e_ctx, ctx_v), bsz, shared) + torch.matmul(e_seg, v.to(acc))
    return (o / denom[..., None]).to(q.dtype).reshape(bsz, heads, t, d)


def attend_after_context(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ctx_k: torch.Tensor | None,
    ctx_v: torch.Tensor | None,
    scaling: float,
    dropout_p: float = 0.0,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal softmax attention of q [B, H, T, D] over frozen ctx_k/v [B|1, Hkv, Lc, D] then k, v [B, Hkv, T, D].

    Returns o [B, H, T, D] in q's dtype. ctx_k/ctx_v may be None (no context); they are only read and never get a
    gradient. backend: 'auto' | 'reference' | 'triton' (see the module doc; 'triton' raises where it cannot run).
    """
    _check_shapes(q, k, v, ctx_k, ctx_v)
    if ctx_k is not None and ctx_k.shape[2] == 0:
        ctx_k = ctx_v = None
    devices = {t.device for t in (q, k, v, ctx_k, ctx_v) if t is not None}
    chosen = resolve_backend(backend, devices, op="attend_after_context", unsupported=_triton_gap(q, dropout_p))
    if chosen == "triton":
        ctx_k = None if ctx_k is None else ctx_k.detach()
        ctx_v = None if ctx_v is None else ctx_v.detach()
        return _FrozenAttentionFunction.apply(q, k, v, ctx_k, ctx_v, float(scaling))
    if ctx_k is None:
        groups = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scaling, dropout_p=dropout_p, enable_gqa=groups > 1
        )
    return _attend_reference(q, k, v, ctx_k, ctx_v, scaling, dropout_p)
