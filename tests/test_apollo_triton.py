"""backend='triton' against the reference backend (CPU under TRITON_INTERPRET=1; the full matrix on a GPU).

Tolerances (relative error of the whole tensor, tests/helpers.rel_err):
  CPU interpreter, fp32 params: weights 1e-6, moments 1e-5, limiter norm 1e-5 (same math, fp32 rounding
      order differs; the interpreter's dot is plain fp32).
  CPU interpreter, fp16 params: weights compared as the update W_t - W_0, 2e-2 (a few fp16 ulps of the
      weights, rounding differences compound over steps); moments 1e-4 (the fp16 gradient is exact in fp32).
  GPU: the projection GEMM runs in TF32 (APOLLO_FAST_DOT_PRECISION=tf32, the default), so R carries ~1e-3
      relative error: updates W_t - W_0 within 1e-2, moments 1e-2 (fp32 and bf16/fp16 params alike, where
      the update is measured against the reference's own bf16/fp16 rounding); with 'ieee' 1e-5.
  bf16 moments (state_dtype): moments within 1e-2 (bf16 has 8 mantissa bits), updates within 2e-2.
Scratch buffers (P~, R, per-channel workspaces) are NaN-filled before every launch (poison_scratch).
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import assert_close

from apollo_fast import APOLLO, NonFiniteGradientError
from apollo_fast.reference.philox import philox4x32, philox_projection, projection_key

GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if GPU else "cpu")
pytestmark = [
    pytest.mark.skipif(
        not GPU and os.environ.get("TRITON_INTERPRET") != "1", reason="needs a GPU or TRITON_INTERPRET=1"
    ),
    # the interpreter's numpy warns when the found-flag check multiplies inf by 0 (on purpose)
    pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning"),
]

SMALL = [(13, 7), (5, 17), (1, 9), (16, 16)]  # tall prime, wide prime, a single row, square


def _apollo_launches(opt):
    """The Triton backend's APOLLO launch classes, over all param groups."""
    return [la for launches in opt._launches.values() for la in launches.apollo]


def _params(shapes, dtype, device=DEV, seed=1):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(*s, generator=g).to(device=device, dtype=dtype)) for s in shapes]
    ps.append(torch.nn.Parameter(torch.randn(5, generator=g).to(device=device, dtype=dtype)))  # AdamW
    return ps


def _grads(ps, step, seed=7, fresh=False):
    """New gradients whose norm grows with the step, so that the norm-growth limiter engages.

    Written into the existing .grad buffers (the fused backend then reuses its cached launch tables),
    or into new tensors with fresh=True (the tables are rebuilt).
    """
    g = torch.Generator().manual_seed(seed + step)
    for p in ps:
        new = (torch.randn(p.shape, generator=g) * (1.0 + 0.5 * step)).to(device=p.device, dtype=p.dtype)
        if p.grad is None or fresh:
            p.grad = new
        else:
            p.grad.copy_(new)


def _run(backend, shapes, dtype, steps, opt_kw, poison=True, device=DEV, fresh=False):
    ps = _params(shapes, dtype, device)
    opt = APOLLO(ps, backend=backend, **opt_kw)
    if backend == "triton":
        opt._poison_scratch = poison
    w0 = [p.detach().clone() for p in ps]
    for t in range(steps):
        _grads(ps, t, fresh=fresh)
        opt.step()
    return ps, w0, opt


def _compare(ref, out, w_tol, m_tol, as_update=False):
    (pr, w0, optr), (po, _, opto) = ref, out
    for i, (a, b) in enumerate(zip(pr, po, strict=True)):
        if as_update:
            assert_close(f"param[{i}] update", (a.float() - w0[i].float()), (b.float() - w0[i].float()), w_tol)
        else:
            assert_close(f"param[{i}]", a.float(), b.float(), w_tol)
        sa, sb = optr.state[a], opto.state[b]
        assert float(sa["step"]) == float(sb["step"]), f"param[{i}] step"
        for k in ("exp_avg", "exp_avg_sq"):
            assert_close(f"param[{i}] {k}", sa[k].float(), sb[k].float(), m_tol)
        if "limiter_norm" in sa:
            assert_close(f"param[{i}] limiter_norm", sa["limiter_norm"], sb["limiter_norm"], m_tol)


CASES = {
    "channel": dict(lr=1e-2, rank=4, update_proj_gap=2, weight_decay=0.1, betas=(0.8, 0.95), alpha=1.7),
    "tensor-maximize": dict(
        lr=2e-2, rank=3, scale_type="tensor", update_proj_gap=2, weight_decay=0.05, maximize=True, eps=1e-5
    ),
    "mini": dict(lr=1e-2, rank=1, scale_type="tensor", scale=128.0, update_proj_gap=3, norm_growth_limit=1.05),
    "no-limiter": dict(lr=1e-2, rank=5, norm_growth_limit=None, update_proj_gap=2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_reference_fp32(case):
    """Multi-step fp32 runs with refreshes, decay, both scale types, the limiter engaged, maximize."""
    kw = CASES[case]
    ref = _run("reference", SMALL, torch.float32, 5, kw)
    out = _run("triton", SMALL, torch.float32, 5, kw)
    tol = 1e-2 if GPU else 1e-5
    _compare(ref, out, 1e-2 if GPU else 1e-6, tol, as_update=GPU)
    limiter = [float(out[2].state[p]["limiter_norm"]) for p in out[0][:-1]] if kw.get("norm_growth_limit", 1) else []
    assert all(v > 0 for v in limiter), "limiter norm never written"


def test_triton_matches_reference_fp16():
    """fp16 params and grads: fp32 math, the weights stored back in fp16."""
    kw = CASES["channel"]
    ref = _run("reference", SMALL[:3], torch.float16, 3, kw)
    out = _run("triton", SMALL[:3], torch.float16, 3, kw)
    _compare(ref, out, 2e-2, 1e-2 if GPU else 1e-4, as_update=True)


def test_rank_chunks_and_official_projection():
    """projection='official' (P stored, rank not clamped): rank 300 > 256 takes two rank chunks (atomics)."""
    kw = dict(lr=1e-2, rank=300, projection="official", update_proj_gap=2, weight_decay=0.01)
    ref = _run("reference", [(20, 9), (6, 11)], torch.float32, 3, kw)
    out = _run("triton", [(20, 9), (6, 11)], torch.float32, 3, kw)
    _compare(ref, out, 1e-2 if GPU else 1e-6, 1e-2 if GPU else 1e-5, as_update=GPU)


def test_multi_tile_projection():
    """P~ larger than one Philox program (r x d > 1024) for several matrices: tiles, tags, refreshes."""
    kw = dict(lr=1e-2, rank=32, update_proj_gap=2, weight_decay=0.1)
    shapes = [(70, 40), (40, 70), (45, 41)]
    ref = _run("reference", shapes, torch.float32, 3, kw)
    out = _run("triton", shapes, torch.float32, 3, kw)
    _compare(ref, out, 1e-2 if GPU else 1e-6, 1e-2 if GPU else 1e-5, as_update=GPU)
    for la in _apollo_launches(out[2]):
        assert la.p_refresh.numel() == la.maps[0].numel(), "one refresh tag per Philox program"


def test_uneven_steps_and_new_grad_buffers():
    """A matrix without a gradient on one step lags in step count (per-row eta, refresh, first step);
    every step gets new .grad tensors (zero_grad(set_to_none=True)): only the G addresses are patched."""
    kw = dict(lr=1e-2, rank=3, update_proj_gap=2, weight_decay=0.1)
    shapes = [(9, 5), (11, 5), (7, 5)]
    results = []
    for backend in ("reference", "triton"):
        ps = _params(shapes, torch.float32)
        w0 = [p.detach().clone() for p in ps]
        opt = APOLLO(ps, backend=backend, **kw)
        if backend == "triton":
            opt._poison_scratch = True
        for t in range(4):
            _grads(ps, t, fresh=True)
            if t == 1:
                ps[1].grad = None
            opt.step()
        results.append((ps, w0, opt))
    _compare(*results, 1e-2 if GPU else 1e-6, 1e-2 if GPU else 1e-5, as_update=GPU)
    ps, _, opt = results[1]
    assert [int(opt.state[p]["step"]) for p in ps[:3]] == [4, 3, 4]
    assert len(_apollo_launches(opt)) == 1, "the three tall matrices share one launch"


def test_official_projection_untouched_by_a_refused_step():
    """projection='official' redraws P on the host: a non-finite step must put proj/proj_seed back."""
    ps = _params([(9, 5)], torch.float32)
    opt = APOLLO(ps, lr=1e-2, rank=3, update_proj_gap=1, projection="official", backend="triton")
    _grads(ps, 0)
    opt.step()
    proj, seed = opt.state[ps[0]]["proj"].clone(), opt.state[ps[0]]["proj_seed"]
    _grads(ps, 1)
    ps[0].grad[0, 0] = float("nan")
    with pytest.raises(NonFiniteGradientError):
        opt.step()
    assert opt.state[ps[0]]["proj_seed"] == seed, "proj_seed advanced on a refused step"
    assert torch.equal(opt.state[ps[0]]["proj"], proj), "proj changed on a refused step"


def test_many_tensors_one_launch():
    """40 matrices of one class go through one launch per kernel; every one matches the reference."""
    shapes = [(7, 3)] * 30 + [(3, 8)] * 10
    kw = dict(lr=1e-2, rank=2, update_proj_gap=2, weight_decay=0.1)
    ref = _run("reference", shapes, torch.float32, 2, kw)
    out = _run("triton", shapes, torch.float32, 2, kw, fresh=True)
    _compare(ref, out, 1e-2 if GPU else 1e-6, 1e-2 if GPU else 1e-5, as_update=GPU)
    launches = _apollo_launches(out[2])
    assert len(launches) == 2, f"expected one tall and one wide launch class, got {[la.key for la in launches]}"
    assert sorted(len(la.idx) for la in launches) == [10, 30]


def test_bf16_moments():
    """state_dtype=torch.bfloat16: moments stored in bf16, math in fp32."""
    kw = CASES["channel"]
    ref = _run("reference", SMALL[:2], torch.float32, 3, kw)
    out = _run("triton", SMALL[:2], torch.float32, 3, dict(kw, state_dtype=torch.bfloat16))
    assert out[2].state[out[0][0]]["exp_avg"].dtype == torch.bfloat16
    _compare(ref, out, 2e-2, 1e-2, as_update=True)


def test_state_dict_round_trip_across_backends():
    """triton 2 steps -> state_dict -> reference 2 more steps (and back) equals 4 reference steps."""
    kw = CASES["channel"]
    ref = _run("reference", SMALL[:2], torch.float32, 4, kw)
    for first, second in (("triton", "reference"), ("reference", "triton")):
        ps = _params(SMALL[:2], torch.float32)
        w0 = [p.detach().clone() for p in ps]
        opt = APOLLO(ps, backend=first, **kw)
        for t in range(2):
            _grads(ps, t)
            opt.step()
        sd = opt.state_dict()
        opt2 = APOLLO(ps, backend=second, **kw)
        opt2.load_state_dict(sd)
        for t in range(2, 4):
            _grads(ps, t)
            opt2.step()
        _compare(ref, (ps, w0, opt2), 1e-2 if GPU else 1e-6, 1e-2 if GPU else 1e-5, as_update=GPU)


def test_nonfinite_raise_and_skip():
    """A NaN gradient: 'raise' names the parameter and changes nothing; 'skip' skips the step."""
    for policy in ("raise", "skip"):
        ps = _params(SMALL[:2], torch.float32)
        opt = APOLLO(ps, lr=1e-2, rank=2, backend="triton", nonfinite=policy)
        _grads(ps, 0)
        opt.step()
        before = [p.detach().clone() for p in ps]
        state = {k: v.clone() for k, v in opt.state[ps[1]].items()}
        _grads(ps, 1)
        ps[1].grad[0, 3] = float("nan")
        if policy == "raise":
            with pytest.raises(NonFiniteGradientError, match=r"shape \(5, 17\)"):
                opt.step()
        else:
            opt.step()
            assert opt.skipped_steps == 1
        for i, (a, b) in enumerate(zip(before, ps, strict=True)):
            assert torch.equal(a, b), f"param[{i}] changed on a non-finite step ({policy})"
        for k, v in state.items():
            assert torch.equal(v, opt.state[ps[1]][k]), f"{k} changed on a non-finite step ({policy})"


def test_capturable_skip_on_device():
    """capturable=True: device step counters, lr as a tensor, eta in-kernel; 'skip' decided on the device."""
    kw = dict(CASES["channel"])
    ref = _run("reference", SMALL[:3], torch.float32, 3, kw)
    kw_c = dict(kw, lr=torch.tensor(kw["lr"], device=DEV), capturable=True, nonfinite="skip")
    out = _run("triton", SMALL[:3], torch.float32, 3, kw_c)
    _compare(ref, out, 1e-2 if GPU else 1e-6, 1e-2 if GPU else 1e-5, as_update=GPU)
    ps, _, opt = out
    assert opt.state[ps[0]]["step"].device == ps[0].device
    before = [p.detach().clone() for p in ps]
    _grads(ps, 3)
    ps[-1].grad[2] = float("inf")  # in an AdamW parameter: the whole step is skipped
    opt.step()
    for i, (a, b) in enumerate(zip(before, ps, strict=True)):
        assert torch.equal(a, b), f"param[{i}] changed on a skipped step"
    assert float(opt.state[ps[0]]["step"]) == 3.0
    assert int(opt.skipped_steps_device[ps[0].device]) == 1


def test_tiny_model_trains_like_the_reference():
    """End to end: a tiny llama on the permutation task, param groups from apollo_param_groups,
    8 steps with each backend: the losses fall and the trajectories agree."""
    from apollo_fast import apollo_param_groups
    from apollo_fast.toy import PermutationTask, tiny_causal_lm

    losses = {}
    for backend in ("reference", "triton"):
        model = tiny_causal_lm(vocab=32, hidden=32, layers=1, heads=2, seed=0).to(DEV)
        task = PermutationTask(vocab=32, seq_len=16, seed=0)
        opt = APOLLO(apollo_param_groups(model), lr=1e-2, rank=8, update_proj_gap=4, backend=backend)
        torch.manual_seed(0)
        losses[backend] = []
        for _ in range(8):
            x = task.batch(4, DEV)
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[backend].append(loss.item())
    ref, out = torch.tensor(losses["reference"]), torch.tensor(losses["triton"])
    assert out[-1] < out[0], f"triton loss did not fall: {out.tolist()}"
    assert_close("loss trajectory", ref, out, 1e-3 if GPU else 1e-5)


def test_invalid_combinations():
    ps = _params(SMALL[:1], torch.float32)
    with pytest.raises(ValueError, match="nonfinite='skip'"):
        APOLLO(ps, backend="triton", capturable=True)
    with pytest.raises(ValueError, match="projection='official'"):
        APOLLO(ps, backend="triton", capturable=True, nonfinite="skip", projection="official")
    with pytest.raises(ValueError, match="need backend='triton'"):
        APOLLO(ps, backend="reference", state_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="state_dtype"):
        APOLLO(ps, backend="triton", state_dtype=torch.float16)
    if not GPU:
        assert APOLLO(ps)._backend_impl == "reference", "backend='auto' must pick the reference for CPU tensors"
        with pytest.MonkeyPatch.context() as mp:
            mp.delenv("TRITON_INTERPRET")
            with pytest.raises(ValueError, match="needs CUDA tensors"):
                APOLLO(ps, backend="triton")


def test_philox_words_bit_exact():
    """Kernel Philox4x32-10 words == apollo_fast.reference.philox, bit for bit."""
    from apollo_fast.kernels.apollo_philox import philox_words

    for key, hi in ((projection_key(0, 0), 0), (projection_key(2**32 - 1, 123456789), 2**32 - 1)):
        out = philox_words(3000, key, hi, DEV).cpu()
        ref = torch.stack(philox4x32(torch.arange(3000), hi, 0, 0, key))
        for w in range(4):
            mism = int((out[w] != ref[w]).sum())
            assert mism == 0, f"Philox word x{w}: {mism} of 3000 differ (key {key:#x}, counter_hi {hi})"


def test_philox_projection_kernel():
    """The in-kernel P~ (NaN-poisoned buffer) matches the reference projection to fp32 rounding."""
    from apollo_fast.kernels import apollo_tables as T
    from apollo_fast.kernels.apollo_philox import philox_projection_group

    from apollo_fast.optim.fused import _starts, _tile_map

    mats = [(3, 700, 4, 11, 0), (5, 33, 9, 2**32 - 1, 7)]  # rank, dim, param index, seed, refresh
    bufs = [torch.full((r * d,), float("nan"), device=DEV) for r, d, *_ in mats]
    tiles = [-(-r * d // 1024) for r, d, *_ in mats]
    rows, dyn = [], []
    for (r, d, idx, seed, refresh), buf, start in zip(mats, bufs, _starts(tiles), strict=True):
        row = [0] * T.AP_WIDTH.value
        row[T.AP_P], row[T.AP_RANK], row[T.AP_D] = buf.data_ptr(), r, d
        row[T.AP_KEY_LO], row[T.AP_KEY_HI], row[T.AP_TILE_PX] = idx, seed, start
        rows.append(row)
        dyn.append([0.0] * T.APD_WIDTH.value)
        dyn[-1][T.APD_REFRESH] = float(refresh)
    meta = torch.tensor(rows, dtype=torch.int64, device=DEV)
    dyn_t = torch.tensor(dyn, dtype=torch.float64, device=DEV)
    held = torch.zeros(sum(tiles), dtype=torch.int64, device=DEV)
    philox_projection_group(meta, dyn_t, _tile_map(tiles, DEV), held, 1, capturable=False)
    for (r, d, idx, seed, refresh), buf in zip(mats, bufs, strict=True):
        ref = philox_projection(r, d, idx, seed, refresh)
        assert_close(f"P~ {r}x{d}", ref, buf.view(r, d).cpu(), 1e-6, atol=2e-6)
    assert held.tolist() == [m[4] + 1 for m, t in zip(mats, tiles, strict=True) for _ in range(t)]
    for buf in bufs:  # same refresh index again: every tile is current, nothing is rewritten
        buf.fill_(float("nan"))
    philox_projection_group(meta, dyn_t, _tile_map(tiles, DEV), held, 1, capturable=False)
    assert all(torch.isnan(buf).all() for buf in bufs), "a current tile was regenerated"


# -- GPU only -------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_gpu_full_matrix(dtype, case, monkeypatch):
    """Odd and large shapes (4097 wide, primes, 1 x k), every case, every dtype, 6 steps.

    16-bit weights: the GEMM runs in ieee fp32 so that TF32 noise does not flip the 16-bit rounding of
    many weights (that would measure rounding luck, not the kernels); fp32 runs the default TF32.
    """
    if dtype != torch.float32:
        monkeypatch.setenv("APOLLO_FAST_DOT_PRECISION", "ieee")
    shapes = [(4097, 257), (129, 4097), (1, 1031), (1031, 1), (997, 389), (2048, 512)]
    kw = dict(CASES[case], rank=min(CASES[case]["rank"] * 16, 256) if case != "mini" else 1)
    ref = _run("reference", shapes, dtype, 6, kw)
    out = _run("triton", shapes, dtype, 6, kw)
    _compare(ref, out, 2e-2 if dtype != torch.float32 else 1e-2, 1e-2, as_update=True)


@pytest.mark.gpu
def test_gpu_ieee_precision_tight(monkeypatch):
    """With APOLLO_FAST_DOT_PRECISION=ieee the fp32 GEMM is exact fp32: tight tolerances."""
    monkeypatch.setenv("APOLLO_FAST_DOT_PRECISION", "ieee")
    kw = dict(CASES["channel"], rank=64)
    shapes = [(4097, 257), (129, 4097), (997, 389)]
    ref = _run("reference", shapes, torch.float32, 4, kw)
    out = _run("triton", shapes, torch.float32, 4, kw)
    _compare(ref, out, 1e-5, 1e-5, as_update=True)


@pytest.mark.gpu
def test_gpu_more_than_2_31_elements(monkeypatch):
    """A bf16 matrix with more than 2**31 elements (int64 offsets); rank 4, one step.

    Weights of scale 1e-2 and lr 0.1 make the update many bf16 ulps wide; the GEMM runs in ieee fp32
    so that both backends round nearly identical fp32 values (the first and last rows are compared).
    """
    monkeypatch.setenv("APOLLO_FAST_DOT_PRECISION", "ieee")
    shape = (65539, 32769)  # 2_147_647_491 elements
    kw = dict(lr=0.1, rank=4, weight_decay=0.1)

    def weights():
        g = torch.Generator(device="cuda").manual_seed(0)
        return torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g) * 1e-2

    grad = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=torch.Generator("cuda").manual_seed(1))
    p_ref = torch.nn.Parameter(weights())
    p_ref.grad = grad
    APOLLO([p_ref], backend="reference", **kw).step()
    ends_ref = torch.cat([p_ref.detach()[:3], p_ref.detach()[-3:]]).float()
    del p_ref
    torch.cuda.empty_cache()
    p = torch.nn.Parameter(weights())
    p.grad = grad
    APOLLO([p], backend="triton", **kw).step()
    ends = torch.cat([p.detach()[:3], p.detach()[-3:]]).float()
    del p
    w0 = weights()
    ends0 = torch.cat([w0[:3], w0[-3:]]).float()
    assert (ends_ref - ends0).abs().max() > 0, "the reference did not move the weights: the test would be vacuous"
    assert_close("first and last rows' update", ends_ref - ends0, ends - ends0, 1e-2)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_and_sync_debug():
    """capturable=True: step() passes sync-debug 'error' and replays from a CUDA graph like eager steps."""
    shapes = [(256, 128), (96, 320)]
    kw = dict(CASES["channel"], rank=16, capturable=True, nonfinite="skip")
    kw["lr"] = torch.tensor(kw["lr"], device="cuda")
    eager = _run("triton", shapes, torch.float32, 6, kw, poison=False)

    ps = _params(shapes, torch.float32)
    w0 = [p.detach().clone() for p in ps]
    opt = APOLLO(ps, backend="triton", **kw)
    static_grads = [torch.zeros_like(p) for p in ps]
    for p, g in zip(ps, static_grads, strict=True):
        p.grad = g

    def load_grads(t):
        _grads(ps, t)
        fresh = [p.grad for p in ps]
        for p, g, f in zip(ps, static_grads, fresh, strict=True):
            g.copy_(f)
            p.grad = g

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for t in range(2):  # eager warm-up steps build the launch tables and compile the kernels
            load_grads(t)
            torch.cuda.set_sync_debug_mode("error")
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    load_grads(2)
    with torch.cuda.graph(graph):
        opt.step()
    graph.replay()  # step 3
    for t in range(3, 6):
        load_grads(t)
        graph.replay()
    torch.cuda.synchronize()
    _compare(eager, (ps, w0, opt), 1e-5, 1e-5, as_update=True)


def test_changing_group_options_between_steps_and_adding_a_group():
    """A scheduler changing lr, a group's weight decay / alpha edited mid-run, a parameter without grad on
    some steps, and add_param_group after the first step: triton must follow every change like the reference."""
    runs = {}
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        ps = _params(SMALL[:2], torch.float32)
        extra = _params([(6, 4)], torch.float32, seed=9)
        opt = APOLLO(ps, backend=backend, lr=1e-2, rank=3, update_proj_gap=2, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        for t in range(5):
            _grads(ps, t)
            if t == 2:
                opt.param_groups[0]["weight_decay"] = 0.2
                opt.param_groups[0]["alpha"] = 2.0
                ps[1].grad = None  # not updated this step
                opt.add_param_group({"params": extra, "rank": 2, "scale_type": "tensor"})
            if t >= 2:
                _grads(extra, t, seed=11)
            opt.step()
            sched.step()
        runs[backend] = (ps + extra, opt)
    (pr, optr), (po, opto) = runs["reference"], runs["triton"]
    for i, (a, b) in enumerate(zip(pr, po, strict=True)):
        assert_close(f"param[{i}] after option changes", a.detach(), b.detach(), 1e-5)
        assert float(optr.state[a]["step"]) == float(opto.state[b]["step"]), f"param[{i}] step count"
