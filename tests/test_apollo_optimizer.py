"""APOLLO's behaviour as a torch.optim optimizer (reference backend, CPU, fp32 unless stated)."""

import copy
import math

import pytest
import torch
from helpers import assert_close

from apollo_fast import APOLLO, NonFiniteGradientError, apollo_param_groups
from apollo_fast.reference import apollo_update, philox_projection


def _params(shapes, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def _set_grads(params, gen, scale=1.0):
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * scale).to(p.dtype)


# -- the functional reference through the optimizer -------------------------------------------


def test_philox_step_equals_functional_reference():
    """The optimizer's 'philox' path is apollo_update with P~ = philox_projection(r, d, index - 1, seed, refresh)."""
    shapes = [(7, 5), (4, 9)]
    params = _params(shapes)
    manual = [p.detach().clone() for p in params]
    opt = APOLLO(
        params, lr=3e-2, rank=3, update_proj_gap=2, seed=17, alpha=1.5, weight_decay=0.05, betas=(0.85, 0.99), eps=1e-5
    )
    states = [(torch.zeros(max(s), 3), torch.zeros(max(s), 3), torch.zeros(())) for s in shapes]
    gen = torch.Generator().manual_seed(1)
    for step in range(1, 6):
        _set_grads(params, gen, scale=step)
        for i, (w, p, (m, v, lim)) in enumerate(zip(manual, params, states, strict=True)):
            proj = philox_projection(3, min(w.shape), i, 17, (step - 1) // 2)
            apollo_update(
                w,
                p.grad,
                m,
                v,
                lim,
                proj,
                step=step,
                lr=3e-2,
                beta1=0.85,
                beta2=0.99,
                eps=1e-5,
                alpha=1.5,
                scale_type="channel",
                norm_growth_limit=1.01,
                weight_decay=0.05,
            )
        opt.step()
        for i, (w, p) in enumerate(zip(manual, params, strict=True)):
            assert torch.equal(w, p.data), f"weight {i} differs from the functional reference at step {step}"


def test_same_shaped_matrices_get_different_projections():
    a, b = _params([(6, 4), (6, 4)])
    b.data.copy_(a.data)
    opt = APOLLO([a, b], lr=1e-2, rank=2)
    a.grad = torch.ones(6, 4)
    b.grad = torch.ones(6, 4)
    opt.step()
    assert not torch.equal(opt.state[a]["exp_avg"], opt.state[b]["exp_avg"])


def test_limiter_caps_norm_growth():
    """||S_t|| <= gamma * ||S_{t-1}||: with Adam moments the unlimited step grows, the limited one by <= 1.01."""
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(16, 8, generator=gen)
    grads = [torch.randn(16, 8, generator=gen) * (1 + 10 * t) for t in range(4)]
    norms = {}
    for limit in (1.01, None):
        q = torch.nn.Parameter(w0.clone())
        opt = APOLLO([q], lr=1.0, rank=4, norm_growth_limit=limit, betas=(0.9, 0.999))
        steps = []
        for t, g in enumerate(grads, start=1):
            before = q.detach().clone()
            q.grad = g.clone()
            opt.step()
            eta = math.sqrt(1 - 0.999**t) / (1 - 0.9**t)
            steps.append(((q.detach() - before).norm() / eta).item())  # = ||S_t|| (alpha 1, lr 1)
        norms[limit] = steps
    for t in range(1, 4):
        assert norms[1.01][t] <= 1.01 * norms[1.01][t - 1] * (1 + 1e-5), f"limited ||S|| grew too fast at {t}"
    assert any(norms[None][t] > 1.05 * norms[None][t - 1] for t in range(1, 4)), "test does not engage the limiter"


def test_maximize_equals_negated_gradient():
    p1, p2 = _params([(9, 5), (9, 5)])
    p2.data.copy_(p1.data)
    o1 = APOLLO([p1], lr=1e-2, rank=2, maximize=True, seed=1)
    o2 = APOLLO([p2], lr=1e-2, rank=2, seed=1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        g = torch.randn(9, 5, generator=gen)
        p1.grad, p2.grad = g.clone(), -g
        o1.step()
        o2.step()
    assert torch.equal(p1.data, p2.data)


# -- AdamW for everything else -------------------------------------------------------------------


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("maximize", [False, True])
def test_non_matrix_params_match_torch_adamw(weight_decay, maximize):
    shapes = [(7,), (3, 4, 5), (1,), (2, 3, 1, 2)]
    ours, theirs = _params(shapes, seed=2), _params(shapes, seed=2)
    opt = APOLLO(ours, lr=1e-2, weight_decay=weight_decay, betas=(0.8, 0.95), eps=1e-7, maximize=maximize)
    ref = torch.optim.AdamW(
        theirs, lr=1e-2, weight_decay=weight_decay, betas=(0.8, 0.95), eps=1e-7, maximize=maximize, foreach=False
    )
    gen = torch.Generator().manual_seed(0)
    for step in range(6):
        for a, b in zip(ours, theirs, strict=True):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert_close(f"param {i} {tuple(a.shape)} step {step}", b.data, a.data, rtol=1e-6)
            assert_close(f"exp_avg {i}", ref.state[b]["exp_avg"], opt.state[a]["exp_avg"], rtol=1e-6)
            assert_close(f"exp_avg_sq {i}", ref.state[b]["exp_avg_sq"], opt.state[a]["exp_avg_sq"], rtol=1e-6)


def test_group_with_apollo_false_is_adamw_for_matrices():
    ours, theirs = _params([(6, 3)]), _params([(6, 3)])
    opt = APOLLO([{"params": ours, "apollo": False}], lr=1e-2)
    ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.0, eps=1e-6)
    for _ in range(3):
        ours[0].grad = torch.randn(6, 3)
        theirs[0].grad = ours[0].grad.clone()
        opt.step()
        ref.step()
    assert_close("matrix in an apollo=False group", theirs[0].data, ours[0].data, rtol=1e-6)


# -- groups, closures, schedulers ----------------------------------------------------------------


def test_param_group_overrides():
    a, b, c = _params([(10, 4), (10, 4), (5, 3)])
    frozen = c.detach().clone()
    opt = APOLLO(
        [{"params": [a]}, {"params": [b], "rank": 2, "scale": 4.0, "scale_type": "tensor"}, {"params": [c], "lr": 0.0}],
        lr=1e-2,
        rank=3,
    )
    assert opt.param_groups[1]["alpha"] == 2.0 and "scale" not in opt.param_groups[1]
    gen = torch.Generator().manual_seed(0)
    _set_grads([a, b, c], gen)
    opt.step()
    assert opt.state[a]["exp_avg"].shape == (10, 3)
    assert opt.state[b]["exp_avg"].shape == (10, 2)
    assert torch.equal(c.data, frozen), "lr=0 group must not move (no weight decay either)"
    opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(4, 4))], "rank": 1})
    assert opt.param_groups[-1]["rank"] == 1


def test_closure_is_evaluated_with_grad():
    model = torch.nn.Linear(4, 3)
    opt = APOLLO(model.parameters(), lr=1e-2, rank=2)
    x = torch.randn(5, 4)

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    before = model.weight.detach().clone()
    loss = opt.step(closure)
    assert loss.grad_fn is not None, "closure must run with grad enabled inside step()"
    assert not torch.equal(before, model.weight.detach())


def test_lr_scheduler_changes_apply_each_step():
    """A scheduler's lr is read at every step: same result as the functional reference with those lrs."""
    (p,) = _params([(6, 4)])
    w = p.detach().clone()
    opt = APOLLO([p], lr=1e-2, rank=2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    m, v, lim = torch.zeros(6, 2), torch.zeros(6, 2), torch.zeros(())
    gen = torch.Generator().manual_seed(0)
    for step in range(1, 5):
        lr = opt.param_groups[0]["lr"]
        assert lr == pytest.approx(1e-2 / step)
        p.grad = torch.randn(6, 4, generator=gen)
        apollo_update(
            w,
            p.grad,
            m,
            v,
            lim,
            philox_projection(2, 4, 0, 0, 0),
            step=step,
            lr=lr,
            beta1=0.9,
            beta2=0.999,
            eps=1e-6,
            alpha=1.0,
            scale_type="channel",
            norm_growth_limit=1.01,
            weight_decay=0.1,
        )
        opt.step()
        sched.step()
        assert torch.equal(w, p.data), f"step {step}"


def test_tensor_lr_accepted():
    (p,) = _params([(5, 3)])
    opt = APOLLO([p], lr=torch.tensor(1e-2), rank=2)
    p.grad = torch.randn(5, 3)
    opt.step()
    assert torch.isfinite(p).all()


# -- save / load ---------------------------------------------------------------------------------


@pytest.mark.parametrize("projection", ["philox", "official"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_mid_run_is_bit_identical(tmp_path, projection, dtype):
    shapes = [(9, 4), (3, 11), (5,), (2, 2, 3)]
    gen = torch.Generator().manual_seed(0)
    grads = [[torch.randn(s, generator=gen).to(dtype) for s in shapes] for _ in range(9)]
    kw = dict(lr=1e-2, rank=3, update_proj_gap=3, weight_decay=0.01, projection=projection)

    def run(params, opt, steps):
        for gs in steps:
            for p, g in zip(params, gs, strict=True):
                p.grad = g.clone()
            opt.step()

    straight = _params(shapes, dtype=dtype)
    run(straight, APOLLO(straight, **kw), grads)

    resumed = _params(shapes, dtype=dtype)
    opt = APOLLO(resumed, **kw)
    run(resumed, opt, grads[:4])
    torch.save({"model": [p.detach() for p in resumed], "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    fresh = [torch.nn.Parameter(t.clone()) for t in ckpt["model"]]
    opt2 = APOLLO(fresh, **kw)
    opt2.load_state_dict(ckpt["opt"])
    for p in fresh:
        st = opt2.state[p]
        assert st["exp_avg"].dtype == torch.float32, "moments must stay fp32 across a load"
        assert st["step"].device.type == "cpu"
    run(fresh, opt2, grads[4:])
    for i, (a, b) in enumerate(zip(straight, fresh, strict=True)):
        assert torch.equal(a.data, b.data), f"param {i} differs after resume ({projection}, {dtype})"


def test_state_dict_holds_only_tensors_and_plain_values():
    params = _params([(6, 3)])
    opt = APOLLO(params, lr=1e-2, rank=2, projection="official")
    params[0].grad = torch.randn(6, 3)
    opt.step()
    allowed = (torch.Tensor, int, float, bool, str, type(None), tuple, list)
    for st in opt.state_dict()["state"].values():
        for key, value in st.items():
            assert isinstance(value, allowed), f"state[{key!r}] is {type(value)}"


# -- rank and shape handling ---------------------------------------------------------------------


def test_rank_above_compressed_side():
    a, b = _params([(12, 3), (3, 12)])
    opt = APOLLO([a, b], lr=1e-2, rank=256)
    _set_grads([a, b], torch.Generator().manual_seed(0))
    opt.step()
    assert opt.state[a]["exp_avg"].shape == (12, 3)  # clamped to d = 3
    assert opt.state[b]["exp_avg"].shape == (12, 3)
    a2 = _params([(12, 3)])[0]
    opt2 = APOLLO([a2], lr=1e-2, rank=5, projection="official")
    a2.grad = torch.randn(12, 3)
    opt2.step()
    assert opt2.state[a2]["exp_avg"].shape == (12, 5)  # as apollo-torch: not clamped


def test_mini_preset():
    (p,) = _params([(8, 6)])
    opt = APOLLO.mini([p], lr=1e-3)
    g = opt.param_groups[0]
    assert (g["rank"], g["scale_type"], g["alpha"]) == (1, "tensor", math.sqrt(128.0))
    with pytest.raises(ValueError, match="rank"):
        APOLLO.mini([p], rank=4)


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rank=0), "rank"),
        (dict(rank=2.5), "rank"),
        (dict(lr=-1.0), "learning rate"),
        (dict(lr=float("nan")), "learning rate"),
        (dict(betas=(1.0, 0.999)), "beta1"),
        (dict(betas=(0.9, -0.1)), "beta2"),
        (dict(betas=(0.9,)), "betas"),
        (dict(eps=-1e-8), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(alpha=0.0), "alpha"),
        (dict(scale=-4.0), "scale"),
        (dict(alpha=2.0, scale=9.0), "disagree"),
        (dict(scale_type="row"), "scale_type"),
        (dict(update_proj_gap=0), "update_proj_gap"),
        (dict(norm_growth_limit=0.5), "norm_growth_limit"),
        (dict(projection="svd"), "projection"),
        (dict(seed=-1), "seed"),
        (dict(nonfinite="ignore"), "nonfinite"),
        (dict(backend="jax"), "backend"),
    ],
)
def test_bad_hyper_parameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        APOLLO(_params([(4, 3)]), **kwargs)


def test_bad_group_option_raises():
    with pytest.raises(ValueError, match="unknown param group option"):
        APOLLO([{"params": _params([(4, 3)]), "rnak": 4}])
    with pytest.raises(ValueError, match="rank"):
        APOLLO([{"params": _params([(4, 3)]), "rank": 0}])


def test_unavailable_backend_raises_clearly():
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'reference', 'triton'\), got 'cuda'"):
        APOLLO(_params([(4, 3)]), backend="cuda")


def test_sparse_gradient_raises():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = APOLLO(emb.parameters(), lr=1e-2)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_shape_change_raises():
    (p,) = _params([(6, 4)])
    opt = APOLLO([p], lr=1e-2, rank=2)
    p.grad = torch.randn(6, 4)
    opt.step()
    p.data = torch.randn(6, 5)
    p.grad = torch.randn(6, 5)
    with pytest.raises(ValueError, match="changed shape"):
        opt.step()


def test_wrong_gradient_shape_raises():
    (p,) = _params([(6, 4)])
    opt = APOLLO([p], lr=1e-2)
    p.grad = torch.randn(6, 4)
    p.data = torch.randn(4, 6)  # torch refuses a wrong-shaped .grad, but not a reshaped .data
    with pytest.raises(ValueError, match="gradient shape"):
        opt.step()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_raises_with_name_and_changes_nothing(bad):
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 2))
    opt = APOLLO(apollo_param_groups(model), lr=1e-2, rank=2)
    model(torch.randn(3, 4)).sum().backward()
    model[1].weight.grad[0, 0] = bad
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(NonFiniteGradientError, match=r"1\.weight"):
        opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed although the step raised"
    assert len(opt.state) == 0


def test_nonfinite_gradient_skip_policy():
    params = _params([(5, 3), (3,)])
    opt = APOLLO(params, lr=1e-2, rank=2, nonfinite="skip")
    _set_grads(params, torch.Generator().manual_seed(0))
    opt.step()
    snapshot = [p.detach().clone() for p in params]
    state = copy.deepcopy(opt.state_dict())
    _set_grads(params, torch.Generator().manual_seed(1))
    params[1].grad[0] = float("nan")
    opt.step()
    assert opt.skipped_steps == 1
    for p, s in zip(params, snapshot, strict=True):
        assert torch.equal(p.data, s)
    after = opt.state_dict()["state"]
    for k, st in state["state"].items():
        for key, val in st.items():
            assert torch.equal(torch.as_tensor(val), torch.as_tensor(after[k][key])), f"state {k}.{key} changed"


def test_non_float_parameter_raises():
    p = torch.zeros(3, 3, dtype=torch.int64)
    opt = APOLLO([p], lr=1e-2)
    p.grad = torch.zeros(3, 3, dtype=torch.int64)
    with pytest.raises(TypeError, match="floating-point"):
        opt.step()


# -- param groups from a model ---------------------------------------------------------------------


def _tiny_llama():
    from apollo_fast.toy import tiny_causal_lm

    return tiny_causal_lm(vocab=32, hidden=16, layers=2, heads=2)


def test_param_groups_default_selection():
    model = _tiny_llama()
    groups = apollo_param_groups(model, rank=4)
    apollo_names = [n for n, _ in groups[0]["params"]]
    rest = [n for n, _ in groups[1]["params"]]
    assert groups[0]["rank"] == 4 and groups[1]["apollo"] is False
    assert all(n.endswith(("proj.weight",)) for n in apollo_names), apollo_names
    assert "lm_head.weight" in rest and "model.embed_tokens.weight" in rest
    assert any("norm" in n for n in rest)
    total = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(apollo_names) + len(rest) == total


def test_param_groups_patterns_and_flags():
    model = _tiny_llama()
    g = apollo_param_groups(model, exclude=r"\.mlp\.", embeddings=True, lm_head=True)
    names = [n for n, _ in g[0]["params"]]
    assert not any(".mlp." in n for n in names)
    assert "model.embed_tokens.weight" in names and "lm_head.weight" in names
    g = apollo_param_groups(model, include=r"embed_tokens")
    assert "model.embed_tokens.weight" in [n for n, _ in g[0]["params"]]
    model.lm_head.weight.requires_grad_(False)
    names = [n for grp in apollo_param_groups(model) for n, _ in grp["params"]]
    assert "lm_head.weight" not in names
