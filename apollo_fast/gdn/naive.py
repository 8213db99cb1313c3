"""The GDN specification in plain PyTorch (the backend "reference" of apollo_fast.gdn), independent of fla and
transformers. Public.

    gate_ref                 g = -exp(A_log) softplus(a + dt_bias), beta = sigmoid(b)
    segment_delta_rule_ref   the gated delta rule token by token: the definition
    chunk_delta_rule_ref     the same function in the chunked (WY) form, for long segments on the CPU

Everything computes in the inputs' dtype promoted to at least fp32, so fp64 inputs give the fp64 reference the
tests compare against, and is differentiable by torch.autograd.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = [
    "gate_ref",
    "segment_delta_rule_ref",
    "chunk_delta_rule_ref",
    "l2norm_ref",
    "SOFTPLUS_THRESHOLD",
    "L2NORM_EPS",
]

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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule over segments from a constant initial state, token by token.

    q, k [B, T, Hk, K]; v [B, T, Hv, V]; g (log-decay), beta [B, T, Hv]; initial_state [B|N|1, Hv, K, V]
    (detached: never receives gradient) or None (zeros). cu_seqlens [N+1] packs N segments along T when
    B == 1. Returns o [B, T, Hv, V] in v's dtype and the final state [B|N, Hv, K, V] in the compute dtype
    (fp32, or fp64 for fp64 inputs), or None when output_final_state is False.
    """
    return _over_segments(_recurrence, q, k, v, g, beta, initial_state, scale, use_qk_l2norm, output_final_state,
                          cu_seqlens)  # fmt: skip


def _over_segments(run, q, k, v, g, beta, initial_state, scale, use_qk_l2norm, output_final_state, cu_seqlens):
    """What both forms share: the compute dtype, q and k normalised (q scaled) and repeated to the value heads,
    then `run(q, k, v, g, beta, h0)` on the whole batch or on each packed segment of cu_seqlens."""
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
    n_state = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is None:
        h0 = torch.zeros(n_state, Hv, K, V, dtype=dt, device=q.device)
    else:
        h0 = initial_state.detach().to(dt).expand(n_state, Hv, K, V)
    if cu_seqlens is None:
        o, final = run(qf, kf, vf, gf, bf, h0)
    else:
        cu = [int(x) for x in cu_seqlens.tolist()]
        o_parts, finals = [], []
        for i in range(len(cu) - 1):
            sl = slice(cu[i], cu[i + 1])
            o_i, f_i = run(qf[:, sl], kf[:, sl], vf[:, sl], gf[:, sl], bf[:, sl], h0[i : i + 1])
            o_parts.append(o_i)
            finals.append(f_i)
        o = torch.cat(o_parts, 1) if o_parts else vf.new_zeros(B, 0, Hv, V)
        final = torch.cat(finals, 0)
    return o.to(v.dtype), (final if output_final_state else None)


def _chunk_one(q, k, v, g, beta, h0, chunk: int):
    """One batch of equal-length segments in the WY form. q, k [B, T, Hv, K] (normalised, q scaled); v [B, T, Hv, V];
    g, beta [B, T, Hv]; h0 [B, Hv, K, V] -> o [B, T, Hv, V], final state [B, Hv, K, V]."""
    bsz, t, hv, _ = k.shape
    dv = v.shape[3]
    if t == 0:  # an empty segment leaves its state as it was
        return v.new_zeros(bsz, 0, hv, dv), h0.expand(bsz, -1, -1, -1)
    acc = q.dtype
    qf, kf, vf = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, .]
    gf, bf = g.transpose(1, 2), beta.transpose(1, 2)
    c = min(chunk, t)
    pad = (-t) % c
    if pad:  # padded tokens have k = v = g = beta = 0: they leave the state unchanged
        qf, kf, vf = (F.pad(x, (0, 0, 0, pad)) for x in (qf, kf, vf))
        gf, bf = F.pad(gf, (0, pad)), F.pad(bf, (0, pad))
    n = (t + pad) // c
    qf, kf, vf = (x.reshape(bsz, hv, n, c, -1) for x in (qf, kf, vf))
    gf, bf = gf.reshape(bsz, hv, n, c), bf.reshape(bsz, hv, n, c)
    # G_i within each chunk, and differences G_i - G_j (<= 0 where j <= i), in fp64: |G| reaches hundreds (A up
    # to 16), so fp32 differences of nearby G would lose ~1e-5 absolute and spoil dA_log / d dt_bias.
    cum64 = gf.double().cumsum(-1)
    diff = (cum64.unsqueeze(-1) - cum64.unsqueeze(-2)).to(acc)
    cum = cum64.to(acc)
    idx = torch.arange(c, device=q.device)
    decay_incl = diff.masked_fill(~(idx[:, None] >= idx[None, :]), float("-inf")).exp()
    decay_strict = diff.masked_fill(~(idx[:, None] > idx[None, :]), float("-inf")).exp()
    a_mat = bf.unsqueeze(-1) * (kf @ kf.transpose(-1, -2)) * decay_strict
    rhs = torch.cat((bf.unsqueeze(-1) * vf, (bf * cum.exp()).unsqueeze(-1) * kf), dim=-1)
    sol = torch.linalg.solve_triangular(
        a_mat + torch.eye(c, device=q.device, dtype=acc), rhs, upper=False, unitriangular=True
    )
    w_v, w_k = sol[..., :dv], sol[..., dv:]  # U = w_v - w_k S0
    qk = (qf @ kf.transpose(-1, -2)) * decay_incl
    q_dec = qf * cum.exp().unsqueeze(-1)
    last = cum[..., -1:]  # G_C
    k_dec = kf * (cum64[..., -1:] - cum64).to(acc).exp().unsqueeze(-1)
    state = h0
    outs = []
    for i in range(n):
        u = w_v[:, :, i] - w_k[:, :, i] @ state
        outs.append(q_dec[:, :, i] @ state + qk[:, :, i] @ u)
        state = last[:, :, i].exp().unsqueeze(-1) * state + k_dec[:, :, i].transpose(-1, -2) @ u
    o = torch.cat(outs, dim=2)[:, :, :t].transpose(1, 2)
    return o, state.expand(bsz, -1, -1, -1)


def chunk_delta_rule_ref(
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
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """segment_delta_rule_ref's function and signature, computed chunk by chunk (a loop over chunks, not tokens).

    Within a chunk of C tokens (cumulative log decay G, strictly lower A[i,j] = beta_i e^{G_i-G_j} k_i.k_j):
    (I + A) U = beta V - beta e^G K S0;  O = e^G Q S0 + (e^{G_i-G_j} q_i.k_j)_{j<=i} U;
    S_C = e^{G_C} S0 + (e^{G_C-G} K)^T U. The initial state gets no gradient.
    """
    run = functools.partial(_chunk_one, chunk=chunk_size)
    return _over_segments(run, q, k, v, g, beta, initial_state, scale, use_qk_l2norm, output_final_state, cu_seqlens)
