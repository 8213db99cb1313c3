"""The GDN specification: plain PyTorch, per token, independent of fla and transformers. Public.

Both functions compute in the inputs' dtype promoted to at least fp32, so fp64 inputs give the fp64
reference the tests compare against. They are differentiable by torch.autograd (slowly: the
recurrence is a Python loop over tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["gate_ref", "segment_delta_rule_ref", "l2norm_ref", "SOFTPLUS_THRESHOLD", "L2NORM_EPS"]

SOFTPLUS_THRESHOLD = 20.0  # softplus(x) = x above this, as in the models
L2NORM_EPS = 1e-6  # q and k are scaled by rsqrt(sum(x^2) + eps)


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def gate_ref(
    a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """a, b [B, T, Hv]; A_log, dt_bias [Hv] -> g = -exp(A_log) softplus(a + dt_bias) (fp32 or fp64) and
    beta = sigmoid(b) in b's dtype, both [B, T, Hv]."""
    dt = _compute_dtype(a, A_log, dt_bias)
    x = a.to(dt) + dt_bias.to(dt)
    g = -torch.exp(A_log.to(dt)) * F.softplus(x, threshold=SOFTPLUS_THRESHOLD)
    beta = torch.sigmoid(b.to(_compute_dtype(b))).to(b.dtype)
    return g, beta


def l2norm_ref(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    """x [..., K] -> x * rsqrt(sum(x^2) + eps) over the last dim."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def _recurrence(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of equal-length segments. q, k [B, T, Hv, K] (normalised, q scaled); v [B, T, Hv, V];
    g, beta [B, T, Hv]; state [B, Hv, K, V] -> o [B, T, Hv, V], final state [B, Hv, K, V]."""
    outs = [v.new_zeros(v.shape[0], 0, *v.shape[2:])]  # so an empty segment stacks to [B, 0, Hv, V]
    for t in range(q.shape[1]):
        state = state * torch.exp(g[:, t])[..., None, None]  # decay
        pred = torch.einsum("bhkv,bhk->bhv", state, k[:, t])  # S^T k
        delta = beta[:, t, :, None] * (v[:, t] - pred)  # beta (v - S^T k)
        state = state + k[:, t, :, :, None] * delta[:, :, None, :]  # S += k delta^T
        outs.append(torch.einsum("bhkv,bhk->bhv", state, q[:, t]))  # o = S^T q
    return torch.cat([outs[0]] + [o[:, None] for o in outs[1:]], 1), state


def segment_delta_rule_ref(
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
    backend: str = "reference",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule over segments from a constant initial state, token by token.

    q, k [B, T, Hk, K]; v [B, T, Hv, V]; g (log-decay), beta [B, T, Hv]; initial_state [B|N|1, Hv, K, V]
    (detached: never receives gradient) or None (zeros). cu_seqlens [N+1] packs N segments along T when
    B == 1. Returns o [B, T, Hv, V] in v's dtype and the final state [B|N, Hv, K, V] in the compute dtype
    (fp32, or fp64 for fp64 inputs), or None when output_final_state is False. `backend` is accepted for
    signature parity with `apollo_fast.gdn.segment_delta_rule` and ignored.
    """
    del backend
    dt = _compute_dtype(q, k, v, g, beta)
    B, T, Hk, K = q.shape
    Hv, V = v.shape[2], v.shape[3]
    group = Hv // Hk
    scale = K**-0.5 if scale is None else scale
    qf, kf = q.to(dt), k.to(dt)
    if use_qk_l2norm:
        qf, kf = l2norm_ref(qf), l2norm_ref(kf)
    qf = (qf * scale).repeat_interleave(group, dim=2)  # value head j uses key head j // group
    kf = kf.repeat_interleave(group, dim=2)
    vf, gf, bf = v.to(dt), g.to(dt), beta.to(dt)
    if cu_seqlens is None:
        bounds, n_state = [(slice(None), 0, T)], B
    else:
        cu = [int(x) for x in cu_seqlens.tolist()]
        bounds, n_state = [(i, cu[i], cu[i + 1]) for i in range(len(cu) - 1)], len(cu) - 1
    if initial_state is None:
        h0 = torch.zeros(n_state, Hv, K, V, dtype=dt, device=q.device)
    else:
        h0 = initial_state.detach().to(dt).expand(n_state, Hv, K, V)
    if cu_seqlens is None:
        o, final = _recurrence(qf, kf, vf, gf, bf, h0)
    else:
        o_parts, finals = [], []
        for i, s, e in bounds:
            sl = slice(s, e)
            o_i, f_i = _recurrence(qf[:, sl], kf[:, sl], vf[:, sl], gf[:, sl], bf[:, sl], h0[i : i + 1])
            o_parts.append(o_i)
            finals.append(f_i)
        o = torch.cat(o_parts, 1) if o_parts else vf.new_zeros(B, 0, Hv, V)
        final = torch.cat(finals, 0)
    return o.to(v.dtype), (final if output_final_state else None)
