"""segment_delta_rule (Triton; on CPU under TRITON_INTERPRET=1) + gate against the fp64 per-token reference.

Both algorithms (the chunked WY form and the token-by-token recurrence) are checked; every output and
gradient by name. CPU: tiny fp32 shapes under the interpreter. GPU
(`pytest -m gpu`): the full matrix, T=1000, bf16, Qwen3.5 head sizes.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from gdn_common import NAMES, make_inputs, per_head_rel_err, poison_outputs, reference_fp64, run_pipeline
from helpers import assert_close, rel_err

from apollo_fast import gdn
from apollo_fast.gdn.naive import gate_ref, segment_delta_rule_ref

# The kernels under test: backend='auto' keeps CPU tensors on the reference, so ask for Triton explicitly
# (interpreted on the CPU, native on a GPU).
gate = partial(gdn.gate, backend="triton")
segment_delta_rule = partial(gdn.segment_delta_rule, backend="triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_RTOL = 1e-4  # every tensor, fp32 inputs (measured ~1e-6 on CPU, both algorithms)
PARAM_RTOL = 1e-3  # dA_log, ddt_bias per head, fp32 inputs: the target, A up to 16 (measured <= 1e-5)
ALGOS = ["chunk", "recurrent"]


def _delta(algorithm):
    return partial(segment_delta_rule, algorithm=algorithm)


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    poison_outputs(monkeypatch)


def _check_fp32(ref, out, skip=()):
    for name in NAMES:
        if name in skip:
            continue
        if name in ("dA_log", "ddt_bias"):
            err = per_head_rel_err(ref[name], out[name])
            assert err <= PARAM_RTOL, f"{name}: per-head relative error {err:.2e} > {PARAM_RTOL:.0e} vs fp64"
        else:
            assert_close(name, ref[name], out[name], FP32_RTOL)


# (B, T, Hk, Hv, K, V, h0 batch, extra kwargs): few cases, the interpreter is slow
CPU_CASES = {
    "T65_state_per_batch": (2, 65, 1, 2, 16, 16, None, {}),
    "T63_grouped_oddKV_broadcast_state_scale": (1, 63, 2, 4, 12, 40, 1, {"scale": 0.3}),
    "T1_no_state": (3, 1, 1, 1, 16, 16, 0, {}),
    "T7_no_l2norm": (2, 7, 2, 2, 16, 16, None, {"use_qk_l2norm": False}),
    "T130_three_chunks_V80_two_vblocks": (1, 130, 1, 2, 16, 80, None, {}),
}


@pytest.mark.parametrize("algorithm", ALGOS)
@pytest.mark.parametrize("case", list(CPU_CASES))
def test_segment_fp32_matches_fp64(case, algorithm):
    B, T, Hk, Hv, K, V, h0_batch, kw = CPU_CASES[case]
    x = make_inputs(B, T, Hk, Hv, K, V, h0_batch=h0_batch, seed=T, device=DEVICE)
    if not kw.get("use_qk_l2norm", True):  # unnormalised keys: keep the recurrence contractive
        x["k"] = x["k"] / K**0.5
    ref = reference_fp64(x, **kw)
    out = run_pipeline(x, gate, _delta(algorithm), torch.float32, **kw)
    _check_fp32(ref, out)


@pytest.mark.parametrize("algorithm", ALGOS)
def test_segment_varlen_with_length_one_and_empty_segments(algorithm):
    """cu_seqlens packs lengths 1, 7, 0, 57 into one row; each segment starts from its own state."""
    cu = torch.tensor([0, 1, 8, 8, 65], dtype=torch.int32, device=DEVICE)
    x = make_inputs(1, 65, 1, 2, 16, 16, h0_batch=4, seed=11, device=DEVICE)
    ref = reference_fp64(x, cu_seqlens=cu)
    out = run_pipeline(x, gate, _delta(algorithm), torch.float32, cu_seqlens=cu)
    assert out["final_state"].shape == (4, 2, 16, 16)
    _check_fp32(ref, out)


def test_segment_output_final_state_false_and_frozen_state_untouched():
    x = make_inputs(2, 5, 1, 2, 16, 16, seed=12, device=DEVICE)
    h0 = x["h0"].clone().requires_grad_()
    before = h0.detach().clone()
    q = x["q"].clone().requires_grad_()
    g, beta = gate(x["a"], x["b"], x["A_log"], x["dt_bias"])
    o, fs = segment_delta_rule(q, x["k"], x["v"], g, beta, h0, output_final_state=False)
    o.sum().backward()
    assert fs is None and h0.grad is None and q.grad is not None
    assert torch.equal(h0.detach(), before), "initial_state was written"
    o_ref, _ = segment_delta_rule_ref(q.detach().double(), x["k"], x["v"], g.double(), beta, h0.double())
    assert_close("o", o_ref, o, FP32_RTOL)


@pytest.mark.parametrize("algorithm", ALGOS)
def test_segment_deterministic(algorithm):
    x = make_inputs(1, 20, 1, 2, 16, 16, seed=13, device=DEVICE)
    first = run_pipeline(x, gate, _delta(algorithm), torch.float32)
    second = run_pipeline(x, gate, _delta(algorithm), torch.float32)
    for name in NAMES:
        assert torch.equal(first[name], second[name]), f"{name}: two runs differ"


# ---------------------------------------------------------------------------------------------- GPU
GPU_SHAPES = {  # (B, Hk, Hv, K, V)
    "tiny": (2, 1, 2, 16, 16),
    "qwen3.5-27b": (1, 16, 48, 128, 128),
    "qwen3.5-9b": (2, 16, 32, 128, 128),
}


@pytest.mark.gpu
@pytest.mark.parametrize("algorithm", ALGOS)
@pytest.mark.parametrize("T", [1, 7, 63, 65, 1000])
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
def test_gpu_fp32_matches_fp64(shape, T, algorithm):
    B, Hk, Hv, K, V = GPU_SHAPES[shape]
    if shape != "tiny" and T == 1000 and B > 1:
        B = 1
    x = make_inputs(B, T, Hk, Hv, K, V, seed=T, device="cuda")
    _check_fp32(reference_fp64(x), run_pipeline(x, gate, _delta(algorithm), torch.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("algorithm", ALGOS)
def test_gpu_varlen_fp32(algorithm):
    cu = torch.tensor([0, 1, 64, 65, 1000], dtype=torch.int64, device="cuda")
    x = make_inputs(1, 1000, 16, 48, 128, 128, h0_batch=1, seed=3, device="cuda")
    _check_fp32(
        reference_fp64(x, cu_seqlens=cu), run_pipeline(x, gate, _delta(algorithm), torch.float32, cu_seqlens=cu)
    )


def _bf16_inputs(x):
    """bf16-rounded copies (fp32 storage) so the fp64 reference sees exactly what the bf16 run sees."""
    y = dict(x)
    for n in ("q", "k", "v", "a", "b", "A_log", "dt_bias"):
        y[n] = x[n].bfloat16().float()
    return y


@pytest.mark.gpu
@pytest.mark.parametrize("algorithm", ALGOS)
@pytest.mark.parametrize("T", [7, 65, 1000])
@pytest.mark.parametrize("shape", ["tiny", "qwen3.5-27b"])
def test_gpu_bf16_no_worse_than_pytorch(shape, T, algorithm):
    """Bound: rel error <= 1.5 x PyTorch's own (the reference on the same bf16 inputs, fp32 math) + 1e-4."""
    B, Hk, Hv, K, V = GPU_SHAPES[shape]
    x = _bf16_inputs(make_inputs(B, T, Hk, Hv, K, V, seed=T, device="cuda"))
    ref = reference_fp64(x)
    torch_bf16 = run_pipeline(x, gate_ref, segment_delta_rule_ref, torch.bfloat16)
    ours = run_pipeline(x, gate, _delta(algorithm), torch.bfloat16)
    for name in NAMES:
        bound = 1.5 * rel_err(ref[name], torch_bf16[name]) + 1e-4
        err = rel_err(ref[name], ours[name])
        assert err <= bound, f"{name}: bf16 relative error {err:.3e} > bound {bound:.3e} (1.5 x PyTorch's + 1e-4)"


@pytest.mark.gpu
@pytest.mark.parametrize("algorithm", ALGOS)
def test_gpu_deterministic_qwen_size(algorithm):
    x = make_inputs(2, 300, 16, 48, 128, 128, seed=5, device="cuda")
    first = run_pipeline(x, gate, _delta(algorithm), torch.bfloat16)
    second = run_pipeline(x, gate, _delta(algorithm), torch.bfloat16)
    for name in NAMES:
        assert torch.equal(first[name], second[name]), f"{name}: two runs differ"


def test_segment_no_grad_saves_no_checkpoints(monkeypatch):
    """Under torch.no_grad (a context prefix) the forward keeps no checkpoints, and gives the same o."""
    from apollo_fast.kernels import gdn_recurrent

    seen = []
    real = gdn_recurrent.segment_delta_rule_fwd
    monkeypatch.setattr(gdn_recurrent, "segment_delta_rule_fwd", lambda *a: seen.append(a[-2]) or real(*a))
    x = make_inputs(1, 9, 1, 2, 16, 16, seed=14, device=DEVICE)
    q = x["q"].clone().requires_grad_()
    g, beta = gate(x["a"], x["b"], x["A_log"], x["dt_bias"])
    with torch.no_grad():
        o_ng, fs_ng = segment_delta_rule(q, x["k"], x["v"], g, beta, x["h0"])
    o, fs = segment_delta_rule(q, x["k"], x["v"], g, beta, x["h0"])
    assert seen == [False, True], f"save_ckpt flags {seen}"
    assert torch.equal(o_ng, o.detach()) and torch.equal(fs_ng, fs.detach())


@pytest.mark.parametrize("algorithm", ALGOS)
def test_segment_empty_batch_returns_the_state(algorithm):
    """T = 0: o is empty, the final state is the initial state, and every gradient is zero."""
    x = make_inputs(2, 0, 1, 2, 16, 16, seed=15, device=DEVICE)
    out = run_pipeline(x, gate, _delta(algorithm), torch.float32)
    assert torch.equal(out["final_state"], x["h0"])
    for name, like in (
        ("o", "v"),
        ("dq", "q"),
        ("dk", "k"),
        ("dv", "v"),
        ("dg", "a"),
        ("dbeta", "b"),
        ("da", "a"),
        ("db", "b"),
    ):
        assert out[name].shape == x[like].shape, name
    for name in ("dA_log", "ddt_bias"):
        assert torch.equal(out[name], torch.zeros_like(out[name])), name


def test_segment_auto_picks_chunk_for_long_segments(monkeypatch):
    """algorithm='auto': the chunked form from CHUNK_MIN_LEN tokens on, the recurrence below; bad names raise."""
    from apollo_fast.kernels import gdn_chunk, gdn_recurrent

    from apollo_fast.gdn import delta_rule

    calls = []
    for mod, name, tag in (
        (gdn_chunk, "chunk_delta_rule_fwd", "chunk"),
        (gdn_recurrent, "segment_delta_rule_fwd", "recurrent"),
    ):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _r=real, _t=tag: calls.append(_t) or _r(*a))
    for T in (delta_rule.CHUNK_MIN_LEN - 1, delta_rule.CHUNK_MIN_LEN):
        x = make_inputs(1, T, 1, 1, 16, 16, seed=16, device=DEVICE)
        g, beta = gate(x["a"], x["b"], x["A_log"], x["dt_bias"])
        segment_delta_rule(x["q"], x["k"], x["v"], g, beta, x["h0"])
    assert calls == ["recurrent", "chunk"], calls
    with pytest.raises(ValueError, match="algorithm"):
        segment_delta_rule(x["q"], x["k"], x["v"], g, beta, x["h0"], algorithm="wy")


def test_chunk_no_grad_saves_no_states_and_matches_recurrent(monkeypatch):
    """The chunked forward keeps no chunk states under no_grad, and agrees with the recurrence."""
    from apollo_fast.kernels import gdn_chunk

    seen = []
    real = gdn_chunk.chunk_delta_rule_fwd
    monkeypatch.setattr(gdn_chunk, "chunk_delta_rule_fwd", lambda *a: seen.append(a[-2]) or real(*a))
    x = make_inputs(2, 70, 1, 2, 16, 16, seed=17, device=DEVICE)
    q = x["q"].clone().requires_grad_()
    g, beta = gate(x["a"], x["b"], x["A_log"], x["dt_bias"])
    with torch.no_grad():
        o_ng, fs_ng = segment_delta_rule(q, x["k"], x["v"], g, beta, x["h0"], algorithm="chunk")
        o_rec, fs_rec = segment_delta_rule(q, x["k"], x["v"], g, beta, x["h0"], algorithm="recurrent")
    o, fs = segment_delta_rule(q, x["k"], x["v"], g, beta, x["h0"], algorithm="chunk")
    assert seen == [False, True], f"save_ckpt flags {seen}"
    assert torch.equal(o_ng, o.detach()) and torch.equal(fs_ng, fs.detach())
    assert_close("o chunk vs recurrent", o_rec, o_ng, FP32_RTOL)
    assert_close("final_state chunk vs recurrent", fs_rec, fs_ng, FP32_RTOL)


@pytest.mark.parametrize("algorithm", ALGOS)
def test_segment_near_identical_keys_full_beta_no_decay(algorithm):
    """The hard case for the chunk's (I + A)^-1: every A entry near 1, so a naive series would blow up."""
    x = make_inputs(1, 64, 1, 2, 16, 16, A_range=(0.001, 0.002), seed=18, device=DEVICE)
    x["k"] = x["k"][:, :1].expand_as(x["k"]) + 1e-3 * torch.randn_like(x["k"])
    x["b"] = x["b"].abs() + 6  # beta ~ 1
    x["a"] = x["a"] - 8  # decay ~ 0
    _check_fp32(reference_fp64(x), run_pipeline(x, gate, _delta(algorithm), torch.float32))


def test_chunk_dot_precision_env(monkeypatch):
    """APOLLO_FAST_GDN_DOT_PRECISION picks the chunk kernels' product precision; a bad value is refused."""
    from apollo_fast.kernels import gdn_chunk

    x = make_inputs(1, 20, 1, 1, 16, 16, seed=19, device=DEVICE)
    g, beta = gate(x["a"], x["b"], x["A_log"], x["dt_bias"])
    monkeypatch.setenv(gdn_chunk.DOT_PRECISION_ENV, "ieee")
    o, _ = segment_delta_rule(x["q"], x["k"], x["v"], g, beta, x["h0"], algorithm="chunk")
    o_ref, _ = segment_delta_rule_ref(x["q"], x["k"], x["v"], g, beta, x["h0"])
    assert_close("o (ieee products)", o_ref, o, FP32_RTOL)
    monkeypatch.setenv(gdn_chunk.DOT_PRECISION_ENV, "fp8")
    with pytest.raises(ValueError, match=gdn_chunk.DOT_PRECISION_ENV):
        segment_delta_rule(x["q"], x["k"], x["v"], g, beta, x["h0"], algorithm="chunk")
