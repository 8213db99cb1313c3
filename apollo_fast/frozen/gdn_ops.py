"""Gated-DeltaNet token mixing for frozen-context segments: causal conv with a frozen prefix, gates, delta rule.

On CUDA the gate and the delta rule go to `apollo_fast.gdn` (the GDN kernels) when it is importable;
otherwise (and always for CPU tensors, which must never reach Triton) to the plain-PyTorch chunked form
below. APOLLO_FAST_FROZEN_GDN=torch forces the plain-PyTorch path (for benchmarks and debugging).
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch
import torch.nn.functional as F

__all__ = ["causal_conv_with_prefix", "gdn_gate", "delta_rule", "delta_rule_chunked", "fast_gdn_module"]

_ENV = "APOLLO_FAST_FROZEN_GDN"


@functools.lru_cache(maxsize=1)
def _import_gdn() -> ModuleType | None:
    try:
        from apollo_fast import gdn  # the GDN-kernel feature; absent on branches without it
    except ImportError:
        return None
    if not (hasattr(gdn, "segment_delta_rule") and hasattr(gdn, "gate")):
        return None
    return gdn


def fast_gdn_module(device: torch.device) -> ModuleType | None:
    """apollo_fast.gdn when it should serve tensors on `device` (CUDA only, not disabled by env), else None."""
    mode = os.environ.get(_ENV, "auto")
    if mode not in ("auto", "torch"):
        raise ValueError(f"{_ENV}={mode!r}: use 'auto' or 'torch'")
    if device.type != "cuda" or mode == "torch":
        return None
    return _import_gdn()


def causal_conv_with_prefix(
    x: torch.Tensor, prefix: torch.Tensor | None, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv + SiLU of x [B, T, C] after a frozen prefix [B|1, K-1, C] of earlier inputs.

    weight [C, K]. Returns (out [B, T, C], new prefix [B, K-1, C] = the last K-1 inputs). A None prefix is zeros
    (the start of a sequence). The prefix is only read.
    """
    bsz, t, c = x.shape
    k = weight.shape[1]
    x = x.to(weight.dtype)
    if prefix is None:
        prefix = x.new_zeros(1, k - 1, c)
    full = torch.cat((prefix.to(x.dtype).expand(bsz, -1, -1), x), dim=1)  # [B, K-1+T, C]
    out = F.conv1d(full.transpose(1, 2), weight.unsqueeze(1), groups=c).transpose(1, 2)
    return F.silu(out), full[:, full.shape[1] - (k - 1) :]


def gdn_gate(
    a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """g = -exp(A_log) * softplus(a + dt_bias) (fp32) and beta = sigmoid(b); a, b [B, T, Hv]; A_log, dt_bias [Hv]."""
    gdn = fast_gdn_module(a.device)
    if gdn is not None:
        return gdn.gate(a, b, A_log, dt_bias)
    g = -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())
    return g, b.sigmoid()


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule (L2-normalised q, k; scale dk^-1/2) from a constant initial state; see delta_rule_chunked."""
    gdn = fast_gdn_module(q.device)
    if gdn is not None:
        # q, k, v arrive as strided views of the conv output; the kernels get dense tensors.
        q, k, v, g, beta = (t.contiguous() for t in (q, k, v, g, beta))
        return gdn.segment_delta_rule(
            q, k, v, g, beta, initial_state, use_qk_l2norm=True, output_final_state=output_final_state
        )
    return delta_rule_chunked(q, k, v, g, beta, initial_state, output_final_state=output_final_state)


def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def delta_rule_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    *,
    output_final_state: bool = True,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Plain-PyTorch chunked gated delta rule, differentiable w.r.t. q, k, v, g, beta (never the initial state).

    q, k [B, T, Hk, dk]; v [B, T, Hv, dv]; g (log decay), beta [B, T, Hv]; initial_state [B|1, Hv, dk, dv] fp32.
    Per token: S <- exp(g) S; u = beta (v - S^T k); S <- S + k u^T; o = S^T q (q, k L2-normalised, q * dk^-1/2).
    Within a chunk of C tokens (cumulative log decay G, strictly lower A[i,j] = beta_i e^{G_i-G_j} k_i.k_j):
    (I + A) U = beta V - beta e^G K S0;  O = e^G Q S0 + (e^{G_i-G_j} q_i.k_j)_{j<=i} U;
    S_C = e^{G_C} S0 + (e^{G_C-G} K)^T U. Returns o [B, T, Hv, dv] in v's dtype and S [B, Hv, dk, dv] fp32.
    """
    bsz, t, hk, dk = k.shape
    hv, dv = v.shape[2], v.shape[3]
    out_dtype = v.dtype
    acc = torch.float64 if v.dtype == torch.float64 else torch.float32  # fp32 math unless the model is fp64
    rep = hv // hk
    qf = _l2norm(q.to(acc)) * dk**-0.5
    kf = _l2norm(k.to(acc))
    if rep > 1:  # value head j reads key head j // rep
        qf, kf = qf.repeat_interleave(rep, dim=2), kf.repeat_interleave(rep, dim=2)
    # -> [B, H, T, .]
    qf, kf, vf = qf.transpose(1, 2), kf.transpose(1, 2), v.to(acc).transpose(1, 2)
    gf, bf = g.to(acc).transpose(1, 2), beta.to(acc).transpose(1, 2)
    c = min(chunk_size, t)
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
    incl = idx[:, None] >= idx[None, :]
    strict = idx[:, None] > idx[None, :]
    decay_incl = diff.masked_fill(~incl, float("-inf")).exp()
    decay_strict = diff.masked_fill(~strict, float("-inf")).exp()
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

    state = None if initial_state is None else initial_state.to(acc)
    outs = []
    for i in range(n):
        if state is None:
            u = w_v[:, :, i]
            o = qk[:, :, i] @ u
            state = k_dec[:, :, i].transpose(-1, -2) @ u
        else:
            u = w_v[:, :, i] - w_k[:, :, i] @ state
            o = q_dec[:, :, i] @ state + qk[:, :, i] @ u
            state = last[:, :, i].exp().unsqueeze(-1) * state + k_dec[:, :, i].transpose(-1, -2) @ u
        outs.append(o)
    o = torch.stack(outs, dim=2).reshape(bsz, hv, n * c, dv)[:, :, :t]
    o = o.transpose(1, 2).to(out_dtype)
    if state is not None and state.shape[0] != bsz:
        state = state.expand(bsz, -1, -1, -1)
    return o, (state if output_final_state else None)
