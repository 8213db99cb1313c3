"""The frozen-context step end to end through the Triton kernels (GDN chunk/recurrent, attention), on the CPU.

On CUDA, backend='auto' sends the GDN gate and delta rule and attention after the context to the Triton kernels;
on the CPU it keeps them in PyTorch. Here backend='triton' sends CPU tensors to the kernels (which run under
TRITON_INTERPRET=1), so the wiring the GPU uses (strided views, broadcast states, GQA folding, segment lengths on
both sides of the chunk threshold) is checked against the detached-context reference on every parameter's
gradient, as in test_frozen_context.py.
"""

from __future__ import annotations

import os

import pytest
import torch
from frozen_models import VOCAB, build
from helpers import assert_close

from apollo_fast import gdn
from apollo_fast.frozen import attention, encode_context, forward, segment_logits, segment_loss
from apollo_fast.reference.frozen_context import frozen_context_logits_ref, frozen_context_loss_ref

# CPU tensors through Triton: only the interpreter runs them (on a GPU machine, the GPU tests cover this path)
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
RTOL = 2e-5  # fp32 gradients through the interpreted kernels vs the fp32 reference (measured 1.3e-6)
CTX_LEN = 21


class _CountingGDN:
    """apollo_fast.gdn as the GDN layers call it, recording the calls and the backend each asked for."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def gate(self, *args, **kwargs):
        self.calls.append(f"gate:{kwargs['backend']}")
        return gdn.gate(*args, **kwargs)

    def segment_delta_rule(self, *args, **kwargs):
        self.calls.append(f"delta_rule:{kwargs['backend']}")
        return gdn.segment_delta_rule(*args, **kwargs)


@pytest.fixture(autouse=True)
def counting_gdn(monkeypatch) -> _CountingGDN:
    counting = _CountingGDN()
    monkeypatch.setattr(forward, "gate", counting.gate)
    monkeypatch.setattr(forward, "segment_delta_rule", counting.segment_delta_rule)
    return counting


def _ids(*shape, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("seg_len", [7, 40])  # the recurrent GDN kernel below 16 tokens, the chunked one above
@pytest.mark.parametrize("arch", ["qwen3_5", "llama"])
def test_gradients_through_kernels_equal_reference(arch, seg_len, monkeypatch, counting_gdn):
    model = build(arch)
    ctx_ids, seg = _ids(1, CTX_LEN, seed=31), _ids(2, seg_len, seed=32)
    frozen_context_loss_ref(model, ctx_ids, seg).backward()
    ref = _grads(model)
    calls = []
    real_apply = attention._FrozenAttentionFunction.apply
    monkeypatch.setattr(attention._FrozenAttentionFunction, "apply", lambda *a: calls.append(1) or real_apply(*a))
    ctx = encode_context(model, ctx_ids, backend="triton")
    segment_loss(model, ctx, seg, backend="triton").backward()
    assert calls, "the Triton attention kernel was not used"
    assert arch == "llama" or {"gate:triton", "delta_rule:triton"} <= set(counting_gdn.calls), counting_gdn.calls
    out = _grads(model)
    assert ref.keys() == out.keys(), f"parameters with gradient differ: {sorted(ref.keys() ^ out.keys())}"
    for name in ref:
        assert_close(f"grad {name}", ref[name], out[name], rtol=RTOL, atol=1e-9)
    ctx.check_unmodified()


def test_logits_through_kernels_equal_reference():
    model = build("qwen3_5")
    ctx_ids, seg = _ids(1, CTX_LEN, seed=33), _ids(3, 18, seed=34)
    with torch.no_grad():
        ref = frozen_context_logits_ref(model, ctx_ids, seg)
        ours = segment_logits(model, encode_context(model, ctx_ids, backend="triton"), seg, backend="triton")
    assert_close("segment logits", ref, ours, rtol=RTOL)
