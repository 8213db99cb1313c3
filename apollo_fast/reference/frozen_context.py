"""Reference for frozen-context training: one full-sequence forward of context + segment, no cache.

The spec (docs/gdn.md): the segment's loss is differentiated through everything the segment computes, with
the context's activations held constant. Information reaches a segment position from context positions only
through the token-mixing operations (attention keys/values, the GDN causal conv, the GDN recurrence); every
other operation is position-wise. So this reference runs the whole sequence and stops the gradient of the
context positions of every input of every mixing op (K, V after norm and RoPE; the conv input; q, k, v, g,
beta of the recurrence). Context K/V and the GDN state at the segment start are then constants: no parameter
gets gradient through a context position. It shares no code with apollo_fast.frozen: explicit softmax
attention with a materialised causal mask, an explicit shifted-sum conv, a per-token fp32 delta rule, and
transformers' own helpers (apply_rotary_pos_emb, fix_query_key_value_ordering) where they exist. Slow; tests
and tiny models only. Never imports triton.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["attend_after_context_ref", "frozen_context_logits_ref", "frozen_context_loss_ref"]


def attend_after_context_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ctx_k: torch.Tensor | None,
    ctx_v: torch.Tensor | None,
    scaling: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """apollo_fast.frozen.attend_after_context by concatenation: q [B, H, T, D] over [ctx_k | k], [ctx_v | v].

    The context [B|1, Hkv, Lc, D] is expanded and copied in front of the segment's k, v [B, Hkv, T, D] and SDPA
    runs with a boolean mask (query t sees the Lc context keys and segment keys 0..t). Memory grows with
    B x Lc; kept as the plain specification of the frozen-context attention.
    """
    bsz, heads, t, d = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    if ctx_k is None:
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scaling, dropout_p=dropout_p, enable_gqa=groups > 1
        )
    lc = ctx_k.shape[2]
    k_all = torch.cat((ctx_k.expand(bsz, -1, -1, -1), k), dim=2)
    v_all = torch.cat((ctx_v.expand(bsz, -1, -1, -1), v), dim=2)
    # Fold the query heads of one KV group into the query rows so K/V are never repeated per head.
    q_rows = q.reshape(bsz, kv_heads, groups * t, d)
    row_pos = torch.arange(t, device=q.device).repeat(groups) + lc
    mask = torch.arange(lc + t, device=q.device)[None, :] <= row_pos[:, None]
    o = F.scaled_dot_product_attention(q_rows, k_all, v_all, attn_mask=mask, scale=scaling, dropout_p=dropout_p)
    return o.reshape(bsz, heads, t, d)


def _stop_context(x: torch.Tensor, lc: int, dim: int, enabled: bool) -> torch.Tensor:
    """x with its first lc positions along dim detached (constants) when enabled."""
    if not enabled or lc == 0:
        return x
    return torch.cat((x.narrow(dim, 0, lc).detach(), x.narrow(dim, lc, x.shape[dim] - lc)), dim=dim)


def _attention_ref(m: nn.Module, x: torch.Tensor, cos, sin, lc: int, stop: bool) -> torch.Tensor:
    bsz, length, _ = x.shape
    d, heads, kv_heads = m.head_dim, m.config.num_attention_heads, m.config.num_key_value_heads
    q = m.q_proj(x)
    gate = None
    if q.shape[-1] == 2 * heads * d:  # Qwen3.5 / Qwen3-Next output gate
        q, gate = torch.chunk(q.view(bsz, length, heads, 2 * d), 2, dim=-1)
        gate = gate.reshape(bsz, length, heads * d)
    q = q.reshape(bsz, length, heads, d)
    k = m.k_proj(x).view(bsz, length, kv_heads, d)
    v = m.v_proj(x).view(bsz, length, kv_heads, d)
    if hasattr(m, "q_norm"):
        q, k = m.q_norm(q), m.k_norm(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    q, k = sys.modules[type(m).__module__].apply_rotary_pos_emb(q, k, cos, sin)
    k, v = _stop_context(k, lc, 2, stop), _stop_context(v, lc, 2, stop)
    k, v = k.repeat_interleave(heads // kv_heads, dim=1), v.repeat_interleave(heads // kv_heads, dim=1)
    scores = (q @ k.transpose(-1, -2)).float() * m.scaling
    causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1).to(v.dtype)
    o = (probs @ v).transpose(1, 2).reshape(bsz, length, heads * d)
    if gate is not None:
        o = o * torch.sigmoid(gate)
    return m.o_proj(o)


def _delta_rule_per_token(q, k, v, g, beta) -> torch.Tensor:
    """q, k [B, L, Hk, dk], v [B, L, Hv, dv], g, beta [B, L, Hv] -> o [B, L, Hv, dv], fp32, from a zero state."""
    bsz, length, hk, dk = k.shape
    hv, dv = v.shape[2:]
    q = q.float() * torch.rsqrt((q.float() ** 2).sum(-1, True) + 1e-6)
    k = k.float() * torch.rsqrt((k.float() ** 2).sum(-1, True) + 1e-6)
    q = q.repeat_interleave(hv // hk, dim=2) * dk**-0.5
    k = k.repeat_interleave(hv // hk, dim=2)
    v, g, beta = v.float(), g.float(), beta.float()
    state = q.new_zeros(bsz, hv, dk, dv)
    outs = []
    for t in range(length):
        state = state * g[:, t].exp()[:, :, None, None]
        recalled = torch.einsum("bhkv,bhk->bhv", state, k[:, t])
        update = beta[:, t, :, None] * (v[:, t] - recalled)
        state = state + k[:, t, :, :, None] * update[:, :, None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", state, q[:, t]))
    return torch.stack(outs, dim=1)


def _gdn_ref(m: nn.Module, x: torch.Tensor, lc: int, stop: bool) -> torch.Tensor:
    bsz, length, _ = x.shape
    dk, dv = m.head_k_dim, m.head_v_dim
    if hasattr(m, "in_proj_qkvz"):  # Qwen3-Next: transformers' own un-grouping of the fused projections
        q, k, v, z, b, a = m.fix_query_key_value_ordering(m.in_proj_qkvz(x), m.in_proj_ba(x))
        qkv = torch.cat([t.reshape(bsz, length, -1) for t in (q, k, v)], dim=-1)
    else:
        qkv, b, a = m.in_proj_qkv(x), m.in_proj_b(x), m.in_proj_a(x)
        z = m.in_proj_z(x).view(bsz, length, -1, dv)
    qkv = _stop_context(qkv, lc, 1, stop)
    w = m.conv1d.weight[:, 0]  # [C, K]; out[t] = sum_j w[:, K-1-j] * in[t-j]
    ksize = w.shape[1]
    conv = sum(w[:, ksize - 1 - j] * F.pad(qkv, (0, 0, j, 0))[:, :length] for j in range(ksize))
    conv = F.silu(conv)
    q, k, v = torch.split(conv, [m.key_dim, m.key_dim, m.value_dim], dim=-1)
    q, k = q.reshape(bsz, length, -1, dk), k.reshape(bsz, length, -1, dk)
    v = v.reshape(bsz, length, -1, dv)
    beta = b.sigmoid()
    g = -m.A_log.float().exp() * F.softplus(a.float() + m.dt_bias.float())
    q, k, v, g, beta = (_stop_context(t, lc, 1, stop) for t in (q, k, v, g, beta))
    o = _delta_rule_per_token(q, k, v, g, beta).to(v.dtype)
    o = m.norm(o.reshape(-1, dv), z.reshape(-1, dv)).reshape(bsz, length, -1)
    return m.out_proj(o)


def frozen_context_logits_ref(
    model: nn.Module, context_ids: torch.Tensor, segment_ids: torch.Tensor, *, stop_context_gradient: bool = True
) -> torch.Tensor:
    """Logits [B, T, V] of segment_ids [B, T] after context_ids [1|B, Lc], from one full-sequence forward.

    With stop_context_gradient=False it is a plain full-sequence forward (the context gets gradient too).
    """
    base, lc = model.model, context_ids.shape[1]
    ids = torch.cat((context_ids.expand(segment_ids.shape[0], -1), segment_ids), dim=1)
    h = base.embed_tokens(ids)
    pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
    if hasattr(base.rotary_emb, "mrope_section"):  # Qwen3.5: per-section ids [3, B, T] (required by transformers 5.17)
        pos = pos.unsqueeze(0).expand(3, -1, -1)
    cos, sin = base.rotary_emb(h, pos)
    for layer in base.layers:
        x = layer.input_layernorm(h)
        if hasattr(layer, "linear_attn"):
            h = h + _gdn_ref(layer.linear_attn, x, lc, stop_context_gradient)
        else:
            h = h + _attention_ref(layer.self_attn, x, cos, sin, lc, stop_context_gradient)
        y = layer.mlp(layer.post_attention_layernorm(h))
        h = h + (y[0] if isinstance(y, tuple) else y)
    return model.lm_head(base.norm(h[:, lc:]))


def frozen_context_loss_ref(
    model: nn.Module,
    context_ids: torch.Tensor,
    segment_ids: torch.Tensor,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    stop_context_gradient: bool = True,
) -> torch.Tensor:
    """Mean next-token CE over all target tokens of a right-padded segment batch, each row run unpadded alone."""
    labels = segment_ids if labels is None else labels
    total, count = 0.0, 0
    for i in range(segment_ids.shape[0]):
        n = segment_ids.shape[1] if attention_mask is None else int(attention_mask[i].sum())
        ctx = context_ids[i : i + 1] if context_ids.shape[0] > 1 else context_ids
        logits = frozen_context_logits_ref(
            model, ctx, segment_ids[i : i + 1, :n], stop_context_gradient=stop_context_gradient
        )
        target = labels[i, 1:n]
        total = total + F.cross_entropy(logits[0, :-1].float(), target, ignore_index=-100, reduction="sum")
        count += int((target != -100).sum())
    return total / count
