"""pytest-benchmark timings of one APOLLO step (GPU only): `pytest -m gpu benches/bench_apollo.py`.

The side-by-side table with the baselines (torch AdamW, apollo-torch) is benches/apollo_table.py;
these are the same steps as individual benchmarks, for regression tracking.
"""

from __future__ import annotations

import pytest
import torch

from apollo_fast import APOLLO

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SHAPES_1B = [s for _ in range(24) for s in [(2048, 2048)] * 4 + [(5632, 2048), (5632, 2048), (2048, 5632)]]


def _params(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    ps = []
    for m, n in SHAPES_1B:
        p = torch.nn.Parameter(torch.randn(m, n, device="cuda", dtype=dtype, generator=g) * 0.02)
        p.grad = torch.randn(m, n, device="cuda", dtype=dtype, generator=g) * 1e-3
        ps.append(p)
    return ps


def _bench(benchmark, opt):
    def step():
        opt.step()
        torch.cuda.synchronize()

    for _ in range(3):
        step()
    benchmark.pedantic(step, rounds=10, iterations=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("gap", [200, 1], ids=["step", "refresh"])
def test_apollo_triton_1b(benchmark, dtype, gap):
    """Our triton backend, rank 256, channel scaling, on the 1B set (gap 1: every step redraws P)."""
    ps = _params(dtype)
    _bench(benchmark, APOLLO(ps, lr=1e-4, rank=256, update_proj_gap=gap, backend="triton"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_apollo_triton_1b_bf16_moments(benchmark, dtype):
    ps = _params(dtype)
    _bench(benchmark, APOLLO(ps, lr=1e-4, rank=256, backend="triton", state_dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_apollo_triton_1b_capturable(benchmark, dtype):
    """capturable=True, nonfinite='skip': the no-sync path (eager, not graph-replayed)."""
    ps = _params(dtype)
    lr = torch.tensor(1e-4, device="cuda")
    _bench(benchmark, APOLLO(ps, lr=lr, rank=256, backend="triton", capturable=True, nonfinite="skip"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_adamw_fused_1b(benchmark, dtype):
    ps = _params(dtype)
    _bench(benchmark, torch.optim.AdamW(ps, lr=1e-4, fused=True))
