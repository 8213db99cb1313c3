"""The GDN kernels' bf16 bound on the CPU, with the GPU's roundings emulated in the Triton interpreter.

The GPU test `test_gpu_bf16_no_worse_than_pytorch` bounds every output and gradient of a bf16 run by 1.5x
PyTorch's own bf16 error (+1e-4). Two things make the plain interpreter unfit to predict it: it truncates
fp32 -> bf16 conversions (the GPU rounds to nearest even, half the error), and it multiplies tf32 operands in
full fp32 (the GPU's tensor cores drop their 13 low mantissa bits). Here both are emulated, so the margin of
each dot precision is known before a GPU sees it. Skips where the interpreter's internals differ.
"""

from __future__ import annotations

import os
from functools import partial

import numpy as np
import pytest
import torch
from gdn_common import NAMES, make_inputs, reference_fp64, run_pipeline
from helpers import rel_err

from apollo_fast import gdn
from apollo_fast.gdn.naive import gate_ref, segment_delta_rule_ref

# The kernels under test: backend='auto' keeps CPU tensors on the reference, so ask for Triton explicitly
# (interpreted on the CPU, native on a GPU).
gate = partial(gdn.gate, backend="triton")
segment_delta_rule = partial(gdn.segment_delta_rule, backend="triton")

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="emulates in the interpreter")


@pytest.fixture
def gpu_roundings(monkeypatch):
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    builder = getattr(interpreter, "InterpreterBuilder", None)
    if not hasattr(interpreter, "_convert_float") or builder is None or not hasattr(builder, "create_dot"):
        pytest.skip("this Triton's interpreter has other internals")
    real_convert, real_dot = interpreter._convert_float, builder.create_dot

    def convert(data, src, dst, rounding_mode):
        if dst.primitive_bitwidth == 16 and dst.fp_mantissa_width == 7 and data.dtype == np.float32:  # -> bf16
            return torch.from_numpy(np.ascontiguousarray(data)).bfloat16().view(torch.int16).numpy().view(np.uint16)
        return real_convert(data, src, dst, rounding_mode)

    def truncate_tf32(h):
        if h.data.dtype != np.float32:
            return h
        return interpreter.TensorHandle((h.data.view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32), h.dtype)

    def dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if str(input_precision).lower().endswith("tf32"):  # plain tf32, not tf32x3 or ieee
            a, b = truncate_tf32(a), truncate_tf32(b)
        return real_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interpreter, "_convert_float", convert)
    monkeypatch.setattr(builder, "create_dot", dot)


def _bf16_inputs(x):
    rounded = ("q", "k", "v", "a", "b", "A_log", "dt_bias")
    return {n: (t.bfloat16().float() if n in rounded else t) for n, t in x.items()}


def _worst_ratio(x, algorithm) -> tuple[float, str]:
    ref = reference_fp64(x)
    torch_bf16 = run_pipeline(x, gate_ref, segment_delta_rule_ref, torch.bfloat16)
    ours = run_pipeline(x, gate, partial(segment_delta_rule, algorithm=algorithm), torch.bfloat16)
    return max((rel_err(ref[n], ours[n]) / (1.5 * rel_err(ref[n], torch_bf16[n]) + 1e-4), n) for n in NAMES)


# (algorithm, dot precision, largest ratio allowed here): the default chunk precision keeps a margin (measured
# 0.65); plain tf32 is recorded at its measured 0.90-0.93, a warning that it sits close to the GPU test's bound.
CASES = [("chunk", "tf32x3", 0.8), ("chunk", "tf32", 1.0), ("recurrent", None, 0.8)]


@pytest.mark.parametrize("algorithm, precision, limit", CASES)
def test_bf16_within_bound_with_gpu_roundings(gpu_roundings, monkeypatch, algorithm, precision, limit):
    if precision is not None:
        monkeypatch.setenv("APOLLO_FAST_GDN_DOT_PRECISION", precision)
    for T in (65, 200):
        ratio, name = _worst_ratio(_bf16_inputs(make_inputs(1, T, 2, 4, 32, 32, seed=T)), algorithm)
        assert ratio <= limit, f"T={T}: {name} at {ratio:.2f} of the bf16 bound (limit here {limit})"


def test_emulation_rounds_like_the_gpu(gpu_roundings):
    """Sanity of the emulation itself: a bf16 store of the recurrence's output now rounds to nearest."""
    x = make_inputs(1, 5, 1, 1, 16, 16, seed=3)
    xb = {n: (t.bfloat16() if n in ("q", "k", "v") else t) for n, t in x.items()}
    g, beta = gate_ref(x["a"], x["b"], x["A_log"], x["dt_bias"])
    run = partial(segment_delta_rule, g=g, beta=beta, initial_state=x["h0"], algorithm="recurrent")
    o, _ = run(xb["q"], xb["k"], xb["v"])
    o32, _ = run(xb["q"].float(), xb["k"].float(), xb["v"].float())
    assert torch.equal(o, o32.bfloat16()), "bf16 stores do not round to nearest even"
