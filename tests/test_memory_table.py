"""benches/memory_table.py's formulas against the real objects on tiny models: the optimizer's state, the Triton
scratch, a FrozenContext, and the largest unit's gradient that step in backward holds."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from frozen_models import VOCAB, build

from apollo_fast import APOLLO, apollo_param_groups, encode_context
from apollo_fast.optim.in_backward import step_in_backward

_spec = importlib.util.spec_from_file_location(
    "memory_table", Path(__file__).parents[1] / "benches" / "memory_table.py"
)
mt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mt)


def _device_state_bytes(opt: APOLLO, apollo: bool) -> int:
    total = 0
    for group in opt.param_groups:
        for p in group["params"]:
            if opt._uses_apollo(group, p) == apollo:
                total += sum(v.nbytes for k, v in opt.state[p].items() if isinstance(v, torch.Tensor) and k != "step")
    return total


@pytest.mark.parametrize("rank", [4, 64])  # 64 is above min(m, n) of most matrices: clamped
def test_state_formulas_match_the_optimizer(rank):
    model = build("qwen3_5").train()
    groups = apollo_param_groups(model, rank=rank)
    opt = APOLLO(groups, lr=1e-3, rank=rank)
    ids = torch.randint(0, VOCAB, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert mt.apollo_state_bytes(groups, rank) == _device_state_bytes(opt, apollo=True)
    assert mt.adamw_state_bytes(groups) == _device_state_bytes(opt, apollo=False)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors through Triton: the interpreter")
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
def test_scratch_formula_matches_the_triton_backend():
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Linear(40, 9), torch.nn.Linear(9, 9))
    groups = apollo_param_groups(model, rank=16)
    opt = APOLLO(groups, lr=1e-3, rank=16, backend="triton")
    model(torch.randn(3, 24)).square().mean().backward()
    opt.step()
    held = sum(t.nbytes for fl in opt._launches.values() for la in fl.apollo for t in (la.ws, la.r_buf, la.p_buf))
    assert mt.triton_scratch_bytes(groups, 16) == held


def test_context_formula_matches_encode_context():
    model = build("qwen3_5")
    for tokens in (5, 37):
        ctx = encode_context(model, torch.randint(0, VOCAB, (1, tokens)))
        parts = mt.context_bytes(model.config, tokens, dtype_bytes=4)
        assert parts["kv"] + parts["gdn"] == ctx.nbytes


def test_largest_unit_is_what_step_in_backward_holds():
    model = build("qwen3_5").train()
    items = mt.memory_items(model, ranks=(4,), contexts=(8,), weight_bytes=4)
    opt = APOLLO(apollo_param_groups(model, rank=4), lr=1e-3)
    handle = step_in_backward(model, opt)
    ids = torch.randint(0, VOCAB, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    handle.finish_step()
    assert handle.stats.peak_grad_bytes == items["grads_largest_unit"]
    assert items["grads_all"] == sum(p.nbytes for p in model.parameters())


def test_27b_shapes():
    """The 27B built on the meta device: 48 GDN + 16 attention layers, and the parameter count it implies."""
    model = mt.qwen35_on_meta(**mt.QWEN35_27B)
    kinds = model.config.layer_types
    assert (kinds.count("linear_attention"), kinds.count("full_attention")) == (48, 16)
    assert sum(p.numel() for p in model.parameters()) == 26_895_998_464
