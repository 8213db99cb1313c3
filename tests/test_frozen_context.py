"""Frozen-context training on CPU (fp32, tiny random models): forward, gradients, reuse, read-only context."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from frozen_models import VOCAB, build
from helpers import assert_close, rel_err

import apollo_fast
from apollo_fast.frozen import FrozenContext, encode_context, segment_logits, segment_loss
from apollo_fast.frozen.conv import causal_conv_with_prefix
from apollo_fast.gdn.naive import chunk_delta_rule_ref
from apollo_fast.reference.frozen_context import frozen_context_logits_ref, frozen_context_loss_ref

ARCHS = ["qwen3_5", "qwen3_next", "qwen3_next_moe", "llama", "qwen3"]
CTX_LEN = 21
RTOL = 1e-5  # fp32 gradients vs the fp32 reference (measured <= 3e-6)


def _grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _assert_grads_close(ref: dict, out: dict, rtol: float) -> None:
    assert ref.keys() == out.keys(), f"parameters with gradient differ: {sorted(ref.keys() ^ out.keys())}"
    for name in ref:
        assert_close(f"grad {name}", ref[name], out[name], rtol=rtol, atol=1e-9)


def _ids(*shape, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_segment_logits_equal_full_sequence_logits(arch):
    model = build(arch)
    ctx_ids, seg = _ids(1, CTX_LEN, seed=1), _ids(3, 9, seed=2)
    with torch.no_grad():
        full = model(torch.cat((ctx_ids.expand(3, -1), seg), dim=1)).logits[:, CTX_LEN:]
        ref = frozen_context_logits_ref(model, ctx_ids, seg)
        ours = segment_logits(model, encode_context(model, ctx_ids), seg)
    assert_close("reference logits vs transformers", full, ref, rtol=1e-5)
    assert_close("segment logits vs transformers", full, ours, rtol=1e-5)


@pytest.mark.parametrize("seg_len", [2, 7, 64])
@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_next", "qwen3_next_moe", "llama"])
def test_gradients_equal_detached_context_reference(arch, seg_len):
    model = build(arch)
    ctx_ids, seg = _ids(1, CTX_LEN, seed=3), _ids(2, seg_len, seed=4)
    frozen_context_loss_ref(model, ctx_ids, seg).backward()
    ref = _grads(model)
    ctx = encode_context(model, ctx_ids)
    loss = segment_loss(model, ctx, seg)
    loss.backward()
    _assert_grads_close(ref, _grads(model), RTOL)
    assert all(not t.requires_grad for t in ctx.tensors())


@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_next", "llama"])
def test_padded_batch_equals_unpadded_rows(arch):
    """Right-padded segments of lengths 7, 2, 5 with partial labels vs each row run alone and unpadded."""
    model = build(arch)
    lengths = [7, 2, 5]
    ctx_ids, seg = _ids(1, CTX_LEN, seed=5), _ids(3, 7, seed=6)
    mask = torch.tensor([[1] * n + [0] * (7 - n) for n in lengths])
    labels = seg.clone()
    labels[0, 1:3] = -100  # a prompt part with no loss
    frozen_context_loss_ref(model, ctx_ids, seg, labels, mask).backward()
    ref = _grads(model)
    segment_loss(model, encode_context(model, ctx_ids), seg, labels, mask).backward()
    _assert_grads_close(ref, _grads(model), RTOL)


def test_context_batch_per_segment():
    """A context batch of 2 serves 2 segments row by row (no broadcast)."""
    model = build("qwen3_5")
    ctx_ids, seg = _ids(2, CTX_LEN, seed=7), _ids(2, 6, seed=8)
    frozen_context_loss_ref(model, ctx_ids, seg).backward()
    ref = _grads(model)
    segment_loss(model, encode_context(model, ctx_ids), seg).backward()
    _assert_grads_close(ref, _grads(model), RTOL)


@pytest.mark.parametrize("arch", ["qwen3_5", "llama"])
def test_reference_is_not_plain_full_sequence_training(arch):
    """The detached-context gradient really differs from full-sequence training (so the check above has teeth),
    and W_k gets no gradient through context positions."""
    model = build(arch)
    ctx_ids, seg = _ids(1, CTX_LEN, seed=9), _ids(1, 7, seed=10)
    frozen_context_loss_ref(model, ctx_ids, seg).backward()
    frozen = _grads(model)
    frozen_context_loss_ref(model, ctx_ids, seg, stop_context_gradient=False).backward()
    plain = _grads(model)
    k_name = "model.layers.1.self_attn.k_proj.weight" if arch == "qwen3_5" else "model.layers.0.self_attn.k_proj.weight"
    assert rel_err(plain[k_name], frozen[k_name]) > 1e-3, "detaching the context did not change W_k's gradient"


def test_wq_and_gate_parameters_get_gradient_through_frozen_state():
    model = build("qwen3_5")
    ctx_ids, seg = _ids(1, CTX_LEN, seed=11), _ids(1, 7, seed=12)
    ctx = encode_context(model, ctx_ids)
    segment_loss(model, ctx, seg).backward()
    grads = _grads(model)
    assert grads["model.layers.1.self_attn.q_proj.weight"].abs().sum() > 0
    # Same segment with the GDN recurrent states of the context zeroed: A_log and dt_bias lose the gradient
    # that flows through the decay of the frozen state, so their gradients must change.
    zeroed_states = tuple(
        (a, torch.zeros_like(b)) if kind == "gdn" else (a, b)
        for kind, (a, b) in zip(ctx.layer_kinds, ctx.states, strict=True)
    )
    versions = tuple(t._version for pair in zeroed_states for t in pair)
    zeroed = dataclasses.replace(ctx, states=zeroed_states, _versions=versions)
    segment_loss(model, zeroed, seg).backward()
    no_state = _grads(model)
    for name in ("A_log", "dt_bias"):
        full_name = f"model.layers.0.linear_attn.{name}"
        assert grads[full_name].abs().sum() > 0
        assert rel_err(grads[full_name], no_state[full_name]) > 1e-3, f"{name}: no gradient through the frozen state"


def test_reusing_a_context_equals_reencoding():
    model = build("qwen3_next")
    ctx_ids = _ids(1, CTX_LEN, seed=13)
    segments = [_ids(1, n, seed=20 + n) for n in (3, 8, 5)]
    ctx = encode_context(model, ctx_ids)
    for seg in segments:
        segment_loss(model, ctx, seg).backward()
    reused = _grads(model)
    for seg in segments:
        segment_loss(model, encode_context(model, ctx_ids), seg).backward()
    fresh = _grads(model)
    for name in fresh:
        assert torch.equal(fresh[name], reused[name]), f"grad {name}: reuse differs from re-encoding"


def test_context_is_bit_identical_after_training_steps():
    model = build("qwen3_5")
    ctx = encode_context(model, _ids(1, CTX_LEN, seed=14))
    before = [t.clone() for t in ctx.tensors()]
    opt = apollo_fast.APOLLO(apollo_fast.apollo_param_groups(model), lr=1e-2)
    trainer = apollo_fast.FrozenContextTrainer(model, opt, max_grad_norm=1.0, gradient_checkpointing=True)
    for step in range(3):
        trainer.step(ctx, [{"input_ids": _ids(6, seed=30 + step)}, {"input_ids": _ids(4, seed=40 + step)}])
    assert trainer.optimizer_steps == 3
    for i, (a, b) in enumerate(zip(before, ctx.tensors(), strict=True)):
        assert torch.equal(a, b), f"context tensor {i} changed"
    ctx.check_unmodified()


def test_in_place_write_into_context_is_detected():
    model = build("llama")
    ctx = encode_context(model, _ids(1, 5, seed=15))
    next(ctx.tensors()).mul_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        segment_loss(model, ctx, _ids(1, 4, seed=16))


@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_next"])
def test_one_token_segment(arch):
    """A 1-token segment runs forward and backward (fla's 1-token path has no backward); its gradient matches."""
    model = build(arch)
    ctx_ids, seg, nxt = _ids(1, CTX_LEN, seed=17), _ids(2, 1, seed=18), _ids(2, seed=19)
    ctx = encode_context(model, ctx_ids)
    F.cross_entropy(frozen_context_logits_ref(model, ctx_ids, seg)[:, 0], nxt).backward()
    ref = _grads(model)
    F.cross_entropy(segment_logits(model, ctx, seg)[:, 0], nxt).backward()
    _assert_grads_close(ref, _grads(model), RTOL)
    with pytest.raises(ValueError, match="no target tokens"):
        segment_loss(model, ctx, seg)


@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_next_moe"])
def test_gradient_checkpointing_gives_the_same_gradients(arch):
    model = build(arch)
    ctx = encode_context(model, _ids(1, CTX_LEN, seed=21))
    seg = _ids(2, 9, seed=22)
    segment_loss(model, ctx, seg).backward()
    plain = _grads(model)
    segment_loss(model, ctx, seg, gradient_checkpointing=True).backward()
    _assert_grads_close(plain, _grads(model), 1e-6)


def test_trainer_micro_batches_and_accumulation_equal_one_batch():
    """Micro-batches of 1 over segments of different lengths, accumulated over 2 calls = the token-mean gradient."""
    model = build("qwen3_5")
    ctx = encode_context(model, _ids(1, CTX_LEN, seed=23))
    rows = [_ids(n, seed=50 + n) for n in (7, 3, 5)]
    labels = [r.clone() for r in rows]
    labels[0][:4] = -100
    mask = torch.tensor([[1] * len(r) + [0] * (7 - len(r)) for r in rows])
    ids = torch.stack([F.pad(r, (0, 7 - len(r))) for r in rows])
    lab = torch.stack([F.pad(r, (0, 7 - len(r)), value=-100) for r in labels])
    expected = {}
    for _call in range(2):  # two calls, each the token mean, averaged
        segment_loss(model, ctx, ids, lab, mask).backward()
        for n, g in _grads(model).items():
            expected[n] = expected.get(n, 0) + g / 2
    seen: list[dict] = []

    class Capture(torch.optim.SGD):  # records the gradients it is stepped with
        def step(self, closure=None):
            seen.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    trainer = apollo_fast.FrozenContextTrainer(
        model, Capture(model.parameters(), lr=1.0), grad_accum_steps=2, micro_batch_size=1
    )
    segs = [{"input_ids": r, "labels": lb} for r, lb in zip(rows, labels, strict=True)]
    loss0 = trainer.step(ctx, segs)
    assert trainer.optimizer_steps == 0 and not seen
    loss1 = trainer.step(ctx, {"input_ids": ids, "labels": lab, "attention_mask": mask})
    assert trainer.optimizer_steps == 1 and abs(loss0 - loss1) < 1e-6
    _assert_grads_close(expected, seen[0], 1e-5)
    assert all(p.grad is None for p in model.parameters()), "gradients not cleared after the optimizer step"
    assert not trainer.flush()


def test_chunked_delta_rule_matches_per_token_recurrence():
    """Several chunks (T = 150, chunk 64, padded), Hv = 2 Hk, large decays, a batch-1 initial state broadcast."""
    gen = torch.Generator().manual_seed(24)
    b, t, hk, hv, dk, dv = 2, 150, 2, 4, 8, 6
    q, k = torch.randn(b, t, hk, dk, generator=gen), torch.randn(b, t, hk, dk, generator=gen)
    v = torch.randn(b, t, hv, dv, generator=gen)
    g = -torch.rand(b, t, hv, generator=gen) * torch.tensor([0.01, 0.5, 4.0, 16.0])
    beta = torch.rand(b, t, hv, generator=gen)
    s0 = torch.randn(1, hv, dk, dv, generator=gen)
    inputs = [x.clone().requires_grad_() for x in (q, k, v, g, beta)]
    o, s = chunk_delta_rule_ref(*inputs, s0)
    (o.square().sum() + s.square().sum()).backward()
    ours = [x.grad for x in inputs]

    ref_in = [x.clone().double().requires_grad_() for x in (q, k, v, g, beta)]
    qq, kk, vv, gg, bb = ref_in
    qn = (qq / qq.norm(dim=-1, keepdim=True)).repeat_interleave(2, dim=2) * dk**-0.5
    kn = (kk / kk.norm(dim=-1, keepdim=True)).repeat_interleave(2, dim=2)
    state, outs = s0.double().expand(b, -1, -1, -1), []
    for i in range(t):
        state = state * gg[:, i].exp()[..., None, None]
        u = bb[:, i, :, None] * (vv[:, i] - torch.einsum("bhkv,bhk->bhv", state, kn[:, i]))
        state = state + kn[:, i, :, :, None] * u[:, :, None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", state, qn[:, i]))
    o_ref = torch.stack(outs, dim=1)
    (o_ref.square().sum() + state.square().sum()).backward()
    assert_close("o", o_ref, o, rtol=1e-5)
    assert_close("final state", state, s, rtol=1e-5)
    for name, x, y in zip("q k v g beta".split(), ref_in, ours, strict=True):
        assert_close(f"d{name}", x.grad, y, rtol=1e-5)


def test_conv_prefix_equals_full_causal_conv():
    gen = torch.Generator().manual_seed(25)
    x, w = torch.randn(2, 11, 5, generator=gen), torch.randn(5, 4, generator=gen)
    full, _ = causal_conv_with_prefix(x, None, w)
    head, prefix = causal_conv_with_prefix(x[:, :8], None, w)
    tail, _ = causal_conv_with_prefix(x[:, 8:], prefix, w)
    assert_close("conv after a prefix", full, torch.cat((head, tail), dim=1), rtol=1e-6)
    short, prefix2 = causal_conv_with_prefix(x[:, :1], None, w)  # a context shorter than the kernel
    rest, _ = causal_conv_with_prefix(x[:, 1:], prefix2, w)
    assert_close("conv after a 1-token prefix", full, torch.cat((short, rest), dim=1), rtol=1e-6)


def test_unsupported_models_get_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen3Config, Qwen3ForCausalLM

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    with pytest.raises(ValueError, match="GPT2LMHeadModel is not supported"):
        encode_context(gpt2, torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        apollo_fast.FrozenContextTrainer(gpt2, torch.optim.SGD(gpt2.parameters(), lr=0.1))
    sliding = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            use_sliding_window=True,
            sliding_window=4,
            max_window_layers=0,
        )
    )
    with pytest.raises(ValueError, match="sliding-window"):
        encode_context(sliding, torch.zeros(1, 3, dtype=torch.long))


def test_bad_inputs_get_clear_errors():
    model = build("qwen3_5")
    ctx = encode_context(model, _ids(1, 6, seed=26))
    seg = _ids(2, 5, seed=27)
    with pytest.raises(ValueError, match="right-padded"):
        segment_loss(model, ctx, seg, attention_mask=torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="labels shape"):
        segment_loss(model, ctx, seg, labels=seg[:, :3])
    with pytest.raises(ValueError, match="outside"):
        segment_loss(model, ctx, seg + VOCAB)
    with pytest.raises(TypeError, match="integer"):
        segment_loss(model, ctx, seg.float())
    with pytest.raises(ValueError, match="context batch 2"):
        segment_loss(model, encode_context(model, _ids(2, 6, seed=28)), _ids(3, 4, seed=29))
    with pytest.raises(ValueError, match="padded contexts"):
        encode_context(model, _ids(1, 6, seed=30), attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="encoded by a Qwen3_5ForCausalLM"):
        segment_loss(build("llama"), ctx, seg)
    with pytest.raises(TypeError, match="FrozenContext"):
        segment_loss(model, {"not": "a context"}, seg)
    assert isinstance(ctx, FrozenContext) and ctx.length == 6 and ctx.nbytes > 0


def _checked_gdn(monkeypatch) -> list[str]:
    """Route the GDN layers' calls of apollo_fast.gdn through checks of the interface they rely on; returns the
    list of calls made. The checked calls still compute with apollo_fast.gdn, on the backend they were given."""
    from apollo_fast import gdn
    from apollo_fast.frozen import forward

    calls = []

    def checked_gate(a, b, A_log, dt_bias, *, backend):
        assert a.shape == b.shape and a.shape[-1] == A_log.shape[0] == dt_bias.shape[0]
        calls.append(f"gate:{backend}")
        return gdn.gate(a, b, A_log, dt_bias, backend=backend)

    def checked_rule(q, k, v, g, beta, initial_state=None, *, output_final_state, backend):
        bsz, t, hv, dv = v.shape
        assert q.shape == k.shape and q.shape[:2] == (bsz, t) and hv % q.shape[2] == 0
        assert g.dtype == torch.float32 and g.shape == beta.shape == (bsz, t, hv)
        if initial_state is not None:
            assert initial_state.dtype == torch.float32 and not initial_state.requires_grad
            assert initial_state.shape[0] in (1, bsz) and initial_state.shape[1:] == (hv, k.shape[-1], dv)
        calls.append(f"rule:{backend}")
        return gdn.segment_delta_rule(
            q, k, v, g, beta, initial_state, output_final_state=output_final_state, backend=backend
        )

    monkeypatch.setattr(forward, "gate", checked_gate)
    monkeypatch.setattr(forward, "segment_delta_rule", checked_rule)
    return calls


def test_gdn_layers_call_the_gdn_api_with_the_callers_backend(monkeypatch):
    """GDN layers call apollo_fast.gdn's gate() and segment_delta_rule() with the frozen state and the backend the
    caller chose, and the result is the reference's gradients."""
    model = build("qwen3_next")
    ctx_ids, seg = _ids(1, CTX_LEN, seed=60), _ids(2, 7, seed=61)
    frozen_context_loss_ref(model, ctx_ids, seg).backward()
    ref = _grads(model)
    calls = _checked_gdn(monkeypatch)
    ctx = encode_context(model, ctx_ids, backend="reference")
    segment_loss(model, ctx, seg, backend="reference").backward()
    _assert_grads_close(ref, _grads(model), RTOL)
    assert calls.count("rule:reference") == 4 and calls.count("gate:reference") == 4  # 2 GDN layers x 2 calls


def test_cpu_tensors_never_reach_the_gdn_kernels(monkeypatch):
    """backend='auto' keeps CPU tensors on the reference, also under TRITON_INTERPRET=1; a bad backend is named."""
    import importlib

    delta_rule = importlib.import_module("apollo_fast.gdn.delta_rule")
    gate = importlib.import_module("apollo_fast.gdn.gate")  # the module (the package exports the function)

    def refuse(*args, **kwargs):
        raise AssertionError("CPU tensors were sent to the GDN Triton kernels")

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(delta_rule._SegmentDeltaRuleFunction, "apply", refuse)
    monkeypatch.setattr(gate._GateFunction, "apply", refuse)
    model = build("qwen3_5")
    segment_loss(model, encode_context(model, _ids(1, 9, seed=62)), _ids(1, 5, seed=63)).backward()
    with pytest.raises(ValueError, match="backend must be one of"):
        encode_context(model, _ids(1, 9, seed=62), backend="fast")


@pytest.mark.skipif(
    __import__("os").environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="the GDN Triton kernels need a GPU or TRITON_INTERPRET=1",
)
@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_next"])
def test_frozen_context_through_the_real_gdn_kernels(monkeypatch, arch):
    """Integration: the GDN Triton kernels (interpreted on CPU) inside the frozen-context step give the
    reference's gradients, for both GDN layer layouts (fused and split projections)."""
    model = build(arch)
    ctx_ids, seg = _ids(1, CTX_LEN, seed=70), _ids(2, 5, seed=71)
    frozen_context_loss_ref(model, ctx_ids, seg).backward()
    ref = _grads(model)
    used = _checked_gdn(monkeypatch)
    segment_loss(model, encode_context(model, ctx_ids, backend="triton"), seg, backend="triton").backward()
    _assert_grads_close(ref, _grads(model), 1e-4)
    assert used.count("rule:triton") >= 2 and used.count("gate:triton") >= 2
