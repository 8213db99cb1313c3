"""Shared GDN test set-up: random inputs, the named outputs/gradients of gate + delta rule, NaN poisoning."""

from __future__ import annotations

import math
import os

import torch

from apollo_fast.gdn.naive import gate_ref, segment_delta_rule_ref

NAMES = ("o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "da", "db", "dA_log", "ddt_bias")


def make_inputs(B, T, Hk, Hv, K, V, *, A_range=(0.01, 16.0), h0_batch=None, seed=0, device="cpu"):
    """Fresh random fp32 inputs; A = exp(A_log) spread log-uniformly over A_range across heads."""
    # APOLLO_FAST_TEST_SEED shifts every seed (as in conftest), so a sweep draws fresh inputs here too
    gen = torch.Generator().manual_seed(seed + 1_000_003 * int(os.environ.get("APOLLO_FAST_TEST_SEED", "0")))
    r = lambda *s: torch.randn(*s, generator=gen)
    A = torch.exp(torch.linspace(math.log(A_range[0]), math.log(A_range[1]), Hv))
    x = dict(
        q=r(B, T, Hk, K),
        k=r(B, T, Hk, K),
        v=r(B, T, Hv, V),
        a=r(B, T, Hv),
        b=r(B, T, Hv),
        A_log=torch.log(A),
        dt_bias=0.5 * r(Hv),
        h0=None if h0_batch == 0 else 0.5 * r(B if h0_batch is None else h0_batch, Hv, K, V),
        w_o=r(B, T, Hv, V),
        w_s=None,
    )
    n_state = B if h0_batch in (None, 0) else max(B, h0_batch)
    x["w_s"] = r(n_state, Hv, K, V)
    return {k: (v.to(device) if v is not None else None) for k, v in x.items()}


def run_pipeline(x, gate_fn, delta_fn, dtype=torch.float32, param_dtype=None, cu_seqlens=None, **kw):
    """gate -> segment delta rule -> loss = <w_o, o> + <w_s, final_state>; returns every named output and grad."""
    param_dtype = dtype if param_dtype is None else param_dtype
    # fresh leaves every call (a same-dtype .to() would alias x and accumulate .grad across runs)
    leaves = {n: x[n].detach().clone().to(dtype).requires_grad_() for n in ("q", "k", "v", "a", "b")}
    leaves.update({n: x[n].detach().clone().to(param_dtype).requires_grad_() for n in ("A_log", "dt_bias")})
    h0 = x["h0"]
    if h0 is not None:
        h0 = h0.to(torch.float64 if dtype == torch.float64 else torch.float32)
    g, beta = gate_fn(leaves["a"], leaves["b"], leaves["A_log"], leaves["dt_bias"])
    g.retain_grad()
    beta.retain_grad()
    o, fs = delta_fn(leaves["q"], leaves["k"], leaves["v"], g, beta, h0, cu_seqlens=cu_seqlens, **kw)
    loss = (o.double() * x["w_o"].double()).sum()
    if fs is not None:
        loss = loss + (fs.double() * x["w_s"][: fs.shape[0]].double()).sum()
    loss.backward()
    out = {"o": o.detach(), "final_state": None if fs is None else fs.detach(), "dg": g.grad, "dbeta": beta.grad}
    out.update({"d" + n: t.grad for n, t in leaves.items()})
    return out


def reference_fp64(x, cu_seqlens=None, **kw):
    """The fp64 per-token reference (torch.autograd through gate_ref and segment_delta_rule_ref)."""
    return run_pipeline(x, gate_ref, segment_delta_rule_ref, torch.float64, cu_seqlens=cu_seqlens, **kw)


def per_head_rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    """max over heads of |out - ref| / |ref| for a per-head vector (inf on NaN)."""
    ref64, out64 = ref.double().cpu(), out.double().cpu()
    if not torch.isfinite(out64).all():
        return float("inf")
    return ((out64 - ref64).abs() / ref64.abs().clamp_min(1e-30)).max().item()


def per_head_sum_err(ref: torch.Tensor, out: torch.Tensor, abs_terms: torch.Tensor) -> float:
    """max over heads of |out - ref| / sum_i |term_i| for a per-head sum ref = sum_i term_i (inf on NaN).

    The condition-aware metric for a reduction: a sum that cancels to near zero has no small relative
    error even when every term is exact to fp32, but its error stays a few eps times sum |terms|.
    """
    ref64, out64, scale = ref.double().cpu(), out.double().cpu(), abs_terms.double().cpu()
    if not torch.isfinite(out64).all():
        return float("inf")
    return ((out64 - ref64).abs() / scale.clamp_min(1e-30)).max().item()


def poison_outputs(monkeypatch) -> None:
    """Every buffer the GDN launchers allocate starts as NaN, so an element a kernel does not write fails."""
    from apollo_fast.kernels import utils

    def nan_empty(*shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(utils, "empty", nan_empty)
