"""GPU checks (run with `pytest -m gpu`): task vectors and steering on CUDA models, bf16."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close

from apollo_fast.steering import bake_steering, extract_steering_vector, steer, verify_steering
from apollo_fast.toy import tiny_causal_lm
from apollo_fast.vectors import extract_task_vector, ties_merge

pytestmark = pytest.mark.gpu


def _pairs():
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randint(0, 64, (4,), generator=g).tolist(), torch.randint(0, 64, (3,), generator=g).tolist())
        for _ in range(6)
    ]


def test_apply_task_vector_to_cuda_bf16_model():
    base, ft = tiny_causal_lm(seed=0), tiny_causal_lm(seed=1)
    v = extract_task_vector(base, ft)
    model = copy.deepcopy(base).cuda().bfloat16()
    ties_merge([v], density=1.0).apply_to(model, check_base="ignore")
    for (k, p), q in zip(model.state_dict().items(), ft.state_dict().values(), strict=True):
        assert p.device.type == "cuda" and p.dtype == torch.bfloat16
        assert_close(k, q, p.float().cpu(), 1e-2)  # bf16 storage


def test_steering_on_cuda_matches_cpu():
    cpu = tiny_causal_lm(seed=0).eval()
    gpu = copy.deepcopy(cpu).cuda()
    sv_cpu = extract_steering_vector(cpu, _pairs())
    sv_gpu = extract_steering_vector(gpu, _pairs())
    for layer in sv_cpu.layers:
        assert_close(f"layer {layer}", sv_cpu.directions[layer], sv_gpu.directions[layer], 1e-3)
    x = torch.randint(0, 64, (1, 5))
    with torch.no_grad(), steer(gpu, sv_gpu, 3.0):
        cached = gpu.generate(x.cuda(), max_new_tokens=5, do_sample=False, pad_token_id=0)
        uncached = gpu.generate(x.cuda(), max_new_tokens=5, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)
    held = [([1, 2, 3], [4], [5]), ([6, 7], [8], [9])]
    r = verify_steering(gpu, sv_gpu, held, 2.0)
    assert r.n_pairs == 2
    b = bake_steering(gpu, sv_gpu, [[1, 2, 3, 4], [5, 6, 7]], 2.0, steps=5, lr=1e-3)
    assert b.kl_after < b.kl_before
