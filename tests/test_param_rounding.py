"""bf16/fp16 parameters: param_rounding ('nearest', 'stochastic', 'compensated') and the exact weight decay.

Reference (always): stochastic rounding is unbiased and only ever picks a neighbour, its bits are reproducible;
compensated storage follows the fp32 trajectory; fp32 parameters ignore the mode; decay is one rounding.
Triton (CPU under TRITON_INTERPRET=1, or a GPU): the rounding helpers and both update kernels agree with the
reference bit for bit wherever the arithmetic before the rounding is exact, and multi-step runs agree bit for bit
up to rare boundary flips (the projection GEMM sums in another order, so an fp32 result can land on the other
side of a rounding boundary: bounded below).
"""

from __future__ import annotations

import os

import pytest
import torch
import triton
import triton.language as tl
from apollo_fast.kernels.apollo_rounding import ROUNDING_CODES, round_to
from apollo_fast.kernels.apollo_rounding import rounding_words as kernel_rounding_words
from helpers import assert_close

from apollo_fast import APOLLO
from apollo_fast.reference.rounding import compensated_value, rounding_words, stochastic_round, store_rounded, ulp

GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if GPU else "cpu")
triton_only = pytest.mark.skipif(
    not GPU and os.environ.get("TRITON_INTERPRET") != "1", reason="needs a GPU or TRITON_INTERPRET=1"
)
LOW = [torch.bfloat16, torch.float16]
MODES = ["nearest", "stochastic", "compensated"]


def _neighbours(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The representable values just below and above each fp32 x (equal when x is representable)."""
    near = x.to(dtype).float()
    step = torch.nextafter(x.to(dtype), torch.tensor(float("inf"), dtype=dtype)).float() - near
    back = near - torch.nextafter(x.to(dtype), torch.tensor(float("-inf"), dtype=dtype)).float()
    down = torch.where(near > x, near - back, near)
    up = torch.where(near < x, near + step, near)
    return down, up


@pytest.mark.parametrize("dtype", LOW)
def test_stochastic_rounding_is_unbiased_and_only_picks_neighbours(dtype):
    """4096 draws per value: the mean equals x within 6 standard errors (the error of one draw is at most the
    spacing s, so its std is <= s / 2), and every draw is one of x's two neighbours."""
    gen = torch.Generator().manual_seed(0)
    mags = [0.02, 3.0, 1e-3] + ([3e-6, 4e-8] if dtype == torch.float16 else [1e-30])
    x = torch.cat([m * torch.randn(64, generator=gen) for m in mags])
    draws = torch.stack(
        [stochastic_round(x, dtype, rounding_words((1, x.numel()), 5, 9, step, "cpu")[0]) for step in range(4096)]
    ).float()
    down, up = _neighbours(x, dtype)
    assert bool(((draws == down) | (draws == up)).all()), "a draw is not a neighbour of x"
    spacing = (up - down).clamp_min(torch.finfo(torch.float32).tiny)
    err = (draws.double().mean(0) - x.double()).abs()
    bound = 6 * spacing.double() / 2 / 4096**0.5
    worst = float((err / bound).max())
    assert worst <= 1.0, f"mean of 4096 draws off by {worst:.2f} x the 6-sigma bound"
    fresh = x[(down != up)]
    assert fresh.numel() > 0.9 * x.numel()


def test_rounding_bits_are_reproducible_and_keyed():
    words = rounding_words((7, 13), 3, 11, 42, "cpu")
    assert torch.equal(words, rounding_words((7, 13), 3, 11, 42, "cpu")), "same key and step, other bits"
    for other in (rounding_words((7, 13), 3, 12, 42, "cpu"), rounding_words((7, 13), 4, 11, 42, "cpu")):
        assert float((other == words).float().mean()) < 0.05, "another seed or parameter gave the same bits"
    assert float((rounding_words((7, 13), 3, 11, 43, "cpu") == words).float().mean()) < 0.05, "another step"


def test_fp32_parameters_ignore_the_mode():
    runs = []
    for mode in MODES:
        ps = _params([(9, 5), (4,)], torch.float32)
        opt = APOLLO(ps, lr=1e-2, rank=2, weight_decay=0.1, param_rounding=mode, backend="reference")
        for t in range(3):
            _grads(ps, t)
            opt.step()
        assert "compensation" not in opt.state[ps[0]]
        runs.append(ps)
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert torch.equal(a, b)


def test_bad_param_rounding_raises():
    with pytest.raises(ValueError, match="param_rounding must be one of"):
        APOLLO(_params([(3, 2)], torch.bfloat16), param_rounding="truncate")


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=triton_only)])
def test_weight_decay_is_one_rounding_for_apollo_matrices(backend):
    """lr * wd = 1e-7: the decay is w - (lr wd) w rounded once (as apollo-torch's add with alpha), not a
    multiplication by the rounded factor 1 - 1e-7, which is 19% off. Zero gradients leave only the decay."""
    lr, wd = 1e-2, 1e-5
    device = DEV if backend == "triton" else torch.device("cpu")
    w0 = (torch.randn(64, 33, generator=torch.Generator().manual_seed(1)) * 0.02).to(device)
    p = torch.nn.Parameter(w0.clone())
    opt = APOLLO([p], lr=lr, rank=4, weight_decay=wd, backend=backend)
    p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(p.detach(), w0.add(w0, alpha=-(lr * wd))), "decay is not one rounding of w - (lr wd) w"
    assert not torch.equal(p.detach(), w0 * (1.0 - lr * wd)), "the test cannot tell the two formulas apart"


def _bf16_trajectory(mode: str, steps: int, lr: float):
    """A 48 x 40 bf16 weight trained by the reference backend with fixed gradients; returns (w0, the fp32 value
    each step sees (param + residual), the stored weights), and the same run in fp32 from the same start."""
    gen = torch.Generator().manual_seed(3)
    w0 = (torch.randn(48, 40, generator=gen) * 0.02).bfloat16()
    grads = [torch.randn(48, 40, generator=gen).bfloat16() for _ in range(steps)]  # the same in both runs
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        p = torch.nn.Parameter(w0.to(dtype, copy=True))
        opt = APOLLO([p], lr=lr, rank=8, param_rounding=mode, backend="reference")
        for g in grads:
            p.grad = g.to(dtype)
            opt.step()
        out[dtype] = compensated_value(p.detach(), opt.state[p].get("compensation"))
    return w0.float(), out[torch.bfloat16], out[torch.float32]


def test_compensated_follows_the_fp32_trajectory():
    """lr 1e-5, 40 steps, the same gradients: 'nearest' loses the whole update (each step is below half an ulp);
    with the residual carried, the bf16 run's value (param + residual) stays within 0.5% of the fp32 run's weight
    change (measured 0.076%; a bf16 residual, as torch-optimi keeps it, measured 0.97%)."""
    w0, comp_run, fp32_run = _bf16_trajectory("compensated", 40, 1e-5)
    change = (fp32_run - w0).norm()
    err = float((comp_run - fp32_run).norm() / change)
    assert err <= 5e-3, f"compensated run off the fp32 trajectory by {err:.2e} of the change"
    _, nearest_run, _ = _bf16_trajectory("nearest", 40, 1e-5)
    assert float((nearest_run - fp32_run).norm() / change) > 0.5, "nearest should lose most of a 1e-5 update"


def test_store_rounded_compensation_is_exact():
    """The weight is the nearest value, and weight + residual equals the fp32 value to 2**-16 of the weight's ulp
    (the residual's unit is 2**-15 ulp), for every magnitude the dtype holds."""
    gen = torch.Generator().manual_seed(4)
    x = torch.cat([m * torch.randn(200, generator=gen) for m in (0.02, 7.0, 3e-5, 1e-3)])
    for dtype in LOW:
        param, comp = torch.empty_like(x, dtype=dtype), torch.empty_like(x, dtype=torch.int16)
        store_rounded(param, x, "compensated", comp)
        assert torch.equal(param, x.to(dtype))
        err = (compensated_value(param, comp) - x).abs()
        assert bool((err <= ulp(param) * 2**-16 + x.abs() * 2**-24).all()), f"{dtype}: residual lost precision"


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=triton_only)])
@pytest.mark.parametrize("mode", ["stochastic", "compensated"])
def test_save_load_continue_is_bit_identical(tmp_path, backend, mode):
    kw = dict(lr=1e-2, rank=3, update_proj_gap=2, weight_decay=0.1, param_rounding=mode, backend=backend)
    ps = _params([(12, 7), (5, 9), (6,)], torch.bfloat16)
    opt = APOLLO(ps, **kw)
    for t in range(6):
        _grads(ps, t)
        opt.step()
    straight = [p.detach().clone() for p in ps]
    ps = _params([(12, 7), (5, 9), (6,)], torch.bfloat16)
    opt = APOLLO(ps, **kw)
    for t in range(6):
        if t == 3:
            torch.save(opt.state_dict(), tmp_path / "opt.pt")
            opt = APOLLO(ps, **kw)
            opt.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
        _grads(ps, t)
        opt.step()
    for i, (a, b) in enumerate(zip(straight, ps, strict=True)):
        assert torch.equal(a, b.detach()), f"param[{i}] differs after save -> load -> continue ({mode})"
    if mode == "compensated":
        assert opt.state[ps[0]]["compensation"].dtype == torch.int16


# -- Triton ------------------------------------------------------------------------------------------------


def _params(shapes, dtype, seed=1, device=None):
    device = DEV if device is None else device
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(*s, generator=g) * 0.02).to(device=device, dtype=dtype)) for s in shapes]


def _grads(ps, step, seed=7):
    g = torch.Generator().manual_seed(seed + step)
    for p in ps:
        p.grad = (torch.randn(p.shape, generator=g) * (1.0 + 0.5 * step)).to(device=p.device, dtype=p.dtype)


@triton.jit
def _rounding_probe(x_ptr, out_ptr, M, N, step, key_lo, key_hi, BM: tl.constexpr, BN: tl.constexpr,
                    W_DTYPE: tl.constexpr, ROUNDING: tl.constexpr):  # fmt: skip
    """out <- x stored by the kernels' rounding, with the kernels' random words, on one BM x BN tile."""
    rows = tl.arange(0, BM)
    cols = tl.arange(0, BN)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    offs = rows[:, None] * N + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    quads = rows[:, None] * tl.cdiv(N, 4) + tl.arange(0, BN // 4)[None, :]
    word = kernel_rounding_words(quads, step, key_lo, key_hi, (BM, BN))
    tl.store(out_ptr + offs, round_to(x, word, W_DTYPE, ROUNDING).to(W_DTYPE), mask=mask)


@triton_only
@pytest.mark.parametrize("dtype", LOW)
def test_rounding_helpers_match_the_reference_bitwise(dtype):
    """The kernels' rounding and random words (kernels/apollo_rounding.py) on an m x n tile with n not a multiple
    of 4, against apollo_fast.reference.rounding, for nearest and stochastic rounding."""
    m, n = 7, 13
    x = torch.cat([torch.randn(m, 8) * 0.02, torch.randn(m, 5) * 1e-6], dim=1)
    x[0, :3] = torch.tensor([1.0, -0.0, 65504.0 if dtype == torch.float16 else 3e38])
    x = x.to(DEV)
    tl_dtype = tl.bfloat16 if dtype == torch.bfloat16 else tl.float16
    for mode in ("nearest", "stochastic"):
        out = torch.full((m, n), float("nan"), dtype=dtype, device=DEV)
        _rounding_probe[(1,)](x, out, m, n, 17, 5, 9, BM=8, BN=16, W_DTYPE=tl_dtype, ROUNDING=ROUNDING_CODES[mode])
        ref = torch.empty(m, n, dtype=dtype)
        store_rounded(ref, x.cpu(), mode, param_index=5, seed=9, step=17)
        assert torch.equal(out.cpu().view(torch.int16), ref.view(torch.int16)), f"{mode}: bits differ"


@triton_only
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")  # masked lanes: 0 / 0
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("mode", MODES)
def test_adamw_kernel_matches_reference_bitwise(dtype, mode):
    """AdamW tensors with betas 0, eps 0 and a power-of-two lr: every step is w - lr sign(g), exact in fp32, so
    the kernel and the reference see the same fp32 values and must store the same bits (and residuals)."""
    shapes = [(37,), (5, 11), (3000,)]  # the last spans two tiles of the AdamW launch
    runs = {}
    for backend in ("reference", "triton"):
        ps = _params(shapes, dtype, device=DEV if backend == "triton" else "cpu")
        for p in ps:  # dyadic starting weights with few bits: w - k lr stays exact
            p.data = (torch.round(p.data.float() * 256) / 256).to(dtype)
        opt = APOLLO(
            [{"params": ps, "apollo": False}], lr=2.0**-12, betas=(0.0, 0.0), eps=0.0, param_rounding=mode,
            backend=backend,
        )  # fmt: skip
        for t in range(6):
            g = torch.Generator().manual_seed(t)
            for p in ps:  # powers of two: g^2 and sqrt(g^2) are exact, so m / sqrt(v) = sign(g)
                p.grad = (2.0 ** torch.randint(-3, 3, p.shape, generator=g).float()).to(p.device, dtype)
                p.grad *= torch.where(torch.rand(p.shape, generator=g) < 0.5, -1, 1).to(p.device, dtype)
            opt.step()
        runs[backend] = (ps, opt)
    (ref_ps, ref_opt), (tri_ps, tri_opt) = runs["reference"], runs["triton"]
    for i, (a, b) in enumerate(zip(ref_ps, tri_ps, strict=True)):
        assert torch.equal(a.detach(), b.detach().cpu()), f"param[{i}] bits differ ({mode})"
        if mode == "compensated":
            ca, cb = ref_opt.state[a]["compensation"], tri_opt.state[b]["compensation"]
            assert torch.equal(ca, cb.cpu()), f"param[{i}] residuals differ"


@triton_only
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")  # masked lanes: 0 / 0
def test_adamw_stochastic_bits_follow_the_matrix_layout():
    """Stochastic rounding of AdamW matrices whose width is not a multiple of 4 (and one that is, and a vector),
    general values: element (i, j) takes the bits of counter i * ceil(n / 4) + j div 4 in both backends, so the
    stored bf16 weights agree (measured: all of them; with flat counters, the kernel's former rule, 35% differ).
    The fp32 results may differ by an ulp, which flips a rounding with probability 2**-16: 1% is allowed."""
    shapes = [(5, 11), (3, 6), (4, 8), (7,)]
    runs = {}
    for backend in ("reference", "triton"):
        ps = _params(shapes, torch.bfloat16, device=DEV if backend == "triton" else "cpu")
        opt = APOLLO([{"params": ps, "apollo": False}], lr=1e-3, param_rounding="stochastic", backend=backend)
        for t in range(3):
            g = torch.Generator().manual_seed(t)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g).to(p.device, torch.bfloat16)
            opt.step()
        runs[backend] = [p.detach().cpu() for p in ps]
    for shape, a, b in zip(shapes, runs["reference"], runs["triton"], strict=True):
        differ = float((a != b).float().mean())
        assert differ <= 0.01, f"{shape}: {differ:.0%} of the stored weights differ"


@triton_only
@pytest.mark.parametrize("mode", MODES)
def test_pass_c_matches_reference_bitwise(mode):
    """Pass C launched directly with coefficients and gradients whose product is exact (so the fp32 values before
    rounding are the same one-rounding results on every backend): the stored bf16 weights (and residuals) equal
    the reference's bit for bit, for a tall and a wide matrix."""
    from apollo_fast.kernels import apollo_tables as T
    from apollo_fast.kernels.apollo_update import apollo_update_group

    from apollo_fast.optim.fused import _starts, _tile_map

    gen = torch.Generator().manual_seed(5)
    mats = [(21, 10), (6, 19)]
    ws, rows, dyn, tiles, ref_w, ref_c, bufs = [], [], [], [], [], [], []
    c_off = 0
    lr_wd = 2.0**-10  # exact: the decay's product is exact too
    for k, (m, n) in enumerate(mats):
        w = (torch.randint(-64, 64, (m, n), generator=gen) / 256.0).bfloat16()
        g = torch.randint(-8, 8, (m, n), generator=gen).float().bfloat16()
        comp = torch.randint(-16384, 16385, (m, n), generator=gen).to(torch.int16)  # units of 2**-15 ulp
        C = max(m, n)
        coef = torch.randint(1, 9, (C,), generator=gen) * 2.0**-12
        x = compensated_value(w, comp if mode == "compensated" else None)
        x = x - (coef[:, None] * g.float() if m >= n else coef[None, :] * g.float())
        x = x.add(x, alpha=-lr_wd)
        rw, rc = w.clone(), comp.clone()
        store_rounded(rw, x, mode, rc if mode == "compensated" else None, param_index=k, seed=3, step=4)
        ref_w.append(rw)
        ref_c.append(rc)
        w_d, g_d, comp_d = w.to(DEV), g.to(DEV), comp.to(DEV)
        bufs.append((w_d, g_d, comp_d))
        ws.append(coef)
        row = [0] * T.AP_WIDTH.value
        row[T.AP_W], row[T.AP_G], row[T.AP_WS] = w_d.data_ptr(), g_d.data_ptr(), c_off
        row[T.AP_C], row[T.AP_D] = C, min(m, n)
        row[T.AP_KEY_LO], row[T.AP_KEY_HI] = k, 3
        row[T.AP_COMP] = comp_d.data_ptr() if mode == "compensated" else 0
        tiles.append(-(-m // 16) * -(-n // 256))
        rows.append(row)
        dyn.append([0.0, 0.0, 0.0, 4.0])
        c_off += C
    tl_bf16 = tl.bfloat16
    for tall in (True, False):  # one launch per orientation, as the optimizer's launch classes are
        pick = [i for i, (m, n) in enumerate(mats) if (m >= n) == tall]
        for i, start in zip(pick, _starts([tiles[i] for i in pick]), strict=True):
            rows[i][T.AP_TILE_C] = start
        apollo_update_group(
            torch.tensor([rows[i] for i in pick], dtype=torch.int64, device=DEV),
            torch.tensor([dyn[i] for i in pick], dtype=torch.float64, device=DEV),
            _tile_map([tiles[i] for i in pick], DEV), torch.cat(ws).to(DEV),
            torch.zeros((), dtype=torch.int32, device=DEV), torch.zeros((), device=DEV),
            lr_wd=lr_wd, weight_decay=1.0, w_dtype=tl_bf16, g_dtype=tl_bf16, tall=tall, capturable=False,
            skip_on_found=False, rounding=mode, block_m=16, block_n=256,
        )  # fmt: skip
    for k, (w_d, _, comp_d) in enumerate(bufs):
        assert torch.equal(w_d.cpu().view(torch.int16), ref_w[k].view(torch.int16)), f"matrix {k}: weights differ"
        if mode == "compensated":
            assert torch.equal(comp_d.cpu(), ref_c[k]), f"matrix {k}: residuals differ"


@triton_only
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["channel-limiter-decay", "tensor-maximize", "capturable"])
def test_triton_multistep_matches_reference(mode, case):
    """Mixed APOLLO/AdamW groups in bf16, refreshes (T = 2), 6 steps: weights bit for bit, except at most 0.5% of
    elements one ulp apart (an fp32 result from a differently ordered GEMM on the other side of a rounding
    boundary; measured: none), and weight + residual within fp32 rounding of each other (the residual resolves
    2**-16 ulp, so it shows those fp32 differences)."""
    kw = {
        "channel-limiter-decay": dict(lr=1e-3, rank=4, update_proj_gap=2, weight_decay=0.1),
        "tensor-maximize": dict(lr=1e-3, rank=3, scale_type="tensor", update_proj_gap=2, maximize=True),
        "capturable": dict(lr=1e-3, rank=4, update_proj_gap=2, weight_decay=0.1),
    }[case]
    shapes = [(33, 17), (17, 40), (64,)]
    runs = {}
    for backend in ("reference", "triton"):
        ps = _params(shapes, torch.bfloat16, device=DEV if backend == "triton" else "cpu")
        groups = [{"params": ps[:2]}, {"params": ps[2:], "weight_decay": 0.0}]
        extra = {}
        if case == "capturable" and backend == "triton":  # device step counters and lr: the bits still agree
            extra = dict(capturable=True, nonfinite="skip", lr=torch.tensor(kw["lr"], device=DEV))
        opt = APOLLO(groups, param_rounding=mode, backend=backend, **{**kw, **extra})
        for t in range(6):
            _grads(ps, t)
            opt.step()
        runs[backend] = (ps, opt)
    (ref_ps, ref_opt), (tri_ps, tri_opt) = runs["reference"], runs["triton"]
    for i, (a, b) in enumerate(zip(ref_ps, tri_ps, strict=True)):
        bits = (a.detach().view(torch.int16).int() - b.detach().cpu().view(torch.int16).int()).abs()
        assert int(bits.max()) <= 1, f"param[{i}] weights: {int(bits.max())} ulps apart ({mode}, {case})"
        share = float((bits != 0).float().mean())
        assert share <= 5e-3, f"param[{i}] weights: {share:.2%} of elements differ ({mode}, {case})"
        if mode == "compensated":  # the value each run carries (weight + residual): fp32-close, not bitwise
            va = compensated_value(a.detach(), ref_opt.state[a]["compensation"])
            vb = compensated_value(b.detach().cpu(), tri_opt.state[b]["compensation"].cpu())
            assert_close(f"param[{i}] weight + residual", va, vb, 1e-6)
        assert_close(f"param[{i}] exp_avg", ref_opt.state[a]["exp_avg"], tri_opt.state[b]["exp_avg"].cpu(), 1e-5)
