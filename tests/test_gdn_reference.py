"""The GDN references (CPU, always): the math of the spec checked from independent angles."""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch
from gdn_common import make_inputs
from helpers import assert_close

from apollo_fast.gdn import gate, segment_delta_rule
from apollo_fast.gdn.naive import gate_ref, segment_delta_rule_ref


def test_gate_ref_gradients_match_the_closed_forms():
    """da = dg (-A sigmoid(x)), d dt_bias = sum da, d A_log = sum dg g, db = dbeta beta (1 - beta) (docs/gdn.md)."""
    x = make_inputs(2, 9, 1, 3, 4, 4, seed=1)
    a, b = x["a"].double().requires_grad_(), x["b"].double().requires_grad_()
    A_log, dt_bias = x["A_log"].double().requires_grad_(), x["dt_bias"].double().requires_grad_()
    g, beta = gate_ref(a, b, A_log, dt_bias)
    dg, dbeta = torch.randn_like(g), torch.randn_like(beta)
    torch.autograd.backward((g, beta), (dg, dbeta))
    xs = a.detach() + dt_bias.detach()
    A = A_log.detach().exp()
    assert_close("g", -A * torch.log1p(torch.exp(xs)), g.detach(), 1e-12)
    da = dg * (-A * torch.sigmoid(xs))
    assert_close("da", da, a.grad, 1e-12)
    assert_close("ddt_bias", da.sum((0, 1)), dt_bias.grad, 1e-12)
    assert_close("dA_log", (dg * g.detach()).sum((0, 1)), A_log.grad, 1e-12)
    s = torch.sigmoid(b.detach())
    assert_close("db", dbeta * s * (1 - s), b.grad, 1e-12)
    assert g.dtype == torch.float64 and beta.dtype == torch.float64


def test_gate_ref_dtypes():
    """g is fp32 for bf16 inputs and parameters; beta keeps b's dtype; softplus is linear above 20."""
    a = torch.tensor([[[30.0, -30.0]]], dtype=torch.bfloat16)
    g, beta = gate_ref(a, a, torch.zeros(2, dtype=torch.bfloat16), torch.zeros(2, dtype=torch.bfloat16))
    assert g.dtype == torch.float32 and beta.dtype == torch.bfloat16
    assert g[0, 0, 0].item() == -30.0 and g[0, 0, 1].item() < 0


def _naive(q, k, v, g, beta, h0, scale):
    """Independent spelling: explicit per (batch, head, token) loops on [K, V] matrices, fp64."""
    B, T, Hk, K = q.shape
    Hv = v.shape[2]
    o = torch.zeros(B, T, Hv, v.shape[3], dtype=torch.float64)
    S_all = h0.clone().double().expand(B, -1, -1, -1).clone()
    for bi in range(B):
        for h in range(Hv):
            S = S_all[bi, h]
            for t in range(T):
                kk, qq = k[bi, t, h // (Hv // Hk)].double(), q[bi, t, h // (Hv // Hk)].double()
                kk = kk / torch.sqrt(kk.dot(kk) + 1e-6)
                qq = qq / torch.sqrt(qq.dot(qq) + 1e-6) * scale
                S = S * torch.exp(g[bi, t, h].double())
                S = S + beta[bi, t, h].double() * torch.outer(kk, v[bi, t, h].double() - S.T @ kk)
                o[bi, t, h] = S.T @ qq
            S_all[bi, h] = S
    return o, S_all


def test_segment_ref_matches_naive_loops_grouped_heads_broadcast_state():
    x = make_inputs(2, 7, 2, 4, 5, 3, h0_batch=1, seed=2)
    g, beta = gate_ref(x["a"], x["b"], x["A_log"], x["dt_bias"])
    args = [t.double() for t in (x["q"], x["k"], x["v"], g, beta)]
    o, fs = segment_delta_rule_ref(*args, x["h0"], scale=0.7)
    o_n, fs_n = _naive(x["q"], x["k"], x["v"], g, beta, x["h0"], 0.7)
    assert_close("o", o_n, o, 1e-12)
    assert_close("final_state", fs_n, fs, 1e-12)
    assert o.dtype == torch.float64 and fs.dtype == torch.float64


def test_segment_ref_chains_and_packs():
    """Running T1 then T2 from the final state equals running T1+T2; cu_seqlens packing equals batching."""
    x = make_inputs(2, 9, 1, 2, 4, 4, seed=3)
    g, beta = gate_ref(x["a"], x["b"], x["A_log"], x["dt_bias"])
    args = [t.double() for t in (x["q"], x["k"], x["v"], g, beta)]
    o, fs = segment_delta_rule_ref(*args, x["h0"].double())
    o1, fs1 = segment_delta_rule_ref(*[t[:, :4] for t in args], x["h0"].double())
    o2, fs2 = segment_delta_rule_ref(*[t[:, 4:] for t in args], fs1)
    assert_close("o (chained)", o, torch.cat([o1, o2], 1), 1e-12)
    assert_close("final_state (chained)", fs, fs2, 1e-12)
    packed = [t.reshape(1, 18, *t.shape[2:]) for t in args]
    cu = torch.tensor([0, 9, 18], dtype=torch.int32)
    o_p, fs_p = segment_delta_rule_ref(*packed, x["h0"].double(), cu_seqlens=cu)
    assert_close("o (packed)", o.reshape(1, 18, *o.shape[2:]), o_p, 1e-12)
    assert_close("final_state (packed)", fs, fs_p, 1e-12)


def test_segment_ref_initial_state_is_a_constant():
    x = make_inputs(1, 5, 1, 2, 4, 4, seed=4)
    h0 = x["h0"].clone().requires_grad_()
    q = x["q"].clone().requires_grad_()
    g, beta = gate_ref(x["a"], x["b"], x["A_log"], x["dt_bias"])
    o, fs = segment_delta_rule_ref(q, x["k"], x["v"], g, beta, h0)
    (o.sum() + fs.sum()).backward()
    assert h0.grad is None and q.grad is not None


def _transformers_chunk_fallback():
    """The PyTorch code itself: newer transformers wrap it in a dispatcher that calls fla when importable."""
    for mod in ("transformers.models.qwen3_5.modeling_qwen3_5", "transformers.models.qwen3_next.modeling_qwen3_next"):
        try:
            return inspect.unwrap(importlib.import_module(mod).torch_chunk_gated_delta_rule)
        except (ImportError, AttributeError):
            continue
    return None


def test_segment_ref_agrees_with_transformers_fallback():
    """Cross-check of the facts: transformers' chunked PyTorch fallback computes the same function."""
    fn = _transformers_chunk_fallback()
    if fn is None:
        pytest.skip("transformers has no torch_chunk_gated_delta_rule in this version")
    x = make_inputs(2, 70, 2, 4, 8, 8, seed=5)
    g, beta = gate_ref(x["a"], x["b"], x["A_log"], x["dt_bias"])
    o, fs = segment_delta_rule_ref(x["q"], x["k"], x["v"], g, beta, x["h0"])
    rep = lambda t: t.repeat_interleave(2, dim=2)  # older versions need the grouped heads expanded
    o_t, fs_t = fn(
        rep(x["q"]),
        rep(x["k"]),
        x["v"],
        g=g,
        beta=beta,
        initial_state=x["h0"].clone(),
        output_final_state=True,
        use_qk_l2norm_in_kernel=True,
    )
    assert_close("o vs transformers", o, o_t, 1e-4)
    assert_close("final_state vs transformers", fs, fs_t, 1e-4)


def test_api_reference_backend_and_validation(monkeypatch):
    x = make_inputs(1, 3, 1, 2, 4, 4, seed=6)
    g, beta = gate(x["a"], x["b"], x["A_log"], x["dt_bias"], backend="reference")
    o, fs = segment_delta_rule(x["q"], x["k"], x["v"], g, beta, x["h0"], backend="reference")
    o_r, fs_r = segment_delta_rule_ref(x["q"], x["k"], x["v"], g, beta, x["h0"])
    assert torch.equal(o, o_r) and torch.equal(fs, fs_r)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton'"):
        gate(x["a"], x["b"], x["A_log"], x["dt_bias"], backend="triton")
    o_auto, _ = segment_delta_rule(x["q"], x["k"], x["v"], g, beta, x["h0"])  # CPU, no interpreter: reference
    assert torch.equal(o_auto, o_r)
    with pytest.raises(ValueError, match="backend must be"):
        segment_delta_rule(x["q"], x["k"], x["v"], g, beta, backend="cuda")
    with pytest.raises(ValueError, match="multiple of Hk"):
        segment_delta_rule(x["q"].expand(1, 3, 3, 4), x["k"].expand(1, 3, 3, 4), x["v"], g, beta)
    with pytest.raises(ValueError, match="g must be"):
        segment_delta_rule(x["q"], x["k"], x["v"], g[:, :2], beta)
    with pytest.raises(ValueError, match="initial_state must be"):
        segment_delta_rule(x["q"], x["k"], x["v"], g, beta, x["h0"][:, :1])
    with pytest.raises(TypeError, match="initial_state must be fp32"):
        segment_delta_rule(x["q"], x["k"], x["v"], g, beta, x["h0"].bfloat16())
    with pytest.raises(ValueError, match="cu_seqlens must rise"):
        segment_delta_rule(x["q"], x["k"], x["v"], g, beta, cu_seqlens=torch.tensor([0, 2, 1, 3]))
    with pytest.raises(TypeError, match="cu_seqlens"):
        segment_delta_rule(x["q"], x["k"], x["v"], g, beta, cu_seqlens=torch.tensor([0.0, 3.0]))
    with pytest.raises(ValueError, match="A_log must be"):
        gate(x["a"], x["b"], x["A_log"][:1], x["dt_bias"])
    with pytest.raises(TypeError, match="b must be floating"):
        gate(x["a"], x["b"].long(), x["A_log"], x["dt_bias"])


def test_chunk_form_equals_the_token_form_on_packed_segments():
    """chunk_delta_rule_ref (the reference backend's 'chunk' algorithm) is segment_delta_rule_ref chunk by chunk,
    also on packed segments of lengths 1, 0, 70 and 9 (several chunks of 64, a padded one) and grouped heads."""
    from apollo_fast.gdn.naive import chunk_delta_rule_ref

    x = make_inputs(1, 80, 2, 4, 8, 6, h0_batch=4, seed=9)
    g, beta = gate_ref(x["a"], x["b"], x["A_log"], x["dt_bias"])
    cu = torch.tensor([0, 1, 1, 71, 80])
    q, k, v = x["q"].double(), x["k"].double(), x["v"].double()
    o_ref, s_ref = segment_delta_rule_ref(q, k, v, g.double(), beta.double(), x["h0"].double(), cu_seqlens=cu)
    o, s = chunk_delta_rule_ref(q, k, v, g.double(), beta.double(), x["h0"].double(), cu_seqlens=cu)
    assert_close("o", o_ref, o, 1e-10)
    assert_close("final_state", s_ref, s, 1e-10)
    o_b, s_b = segment_delta_rule(q, k, v, g.double(), beta.double(), x["h0"].double(), cu_seqlens=cu,
                                  backend="reference", algorithm="chunk")  # fmt: skip
    assert torch.equal(o_b, o) and torch.equal(s_b, s)
