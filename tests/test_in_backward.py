"""Step in backward (apollo_fast.optim.in_backward): the trajectory of optimizer.step(), one layer's gradients alive
at a time, and named errors for what it cannot do.

Trajectories are compared with the normal loop (backward, optimizer.step(), zero_grad) on the same data: bitwise
with the reference backend, to fp32 rounding (1e-6 relative) with the Triton backend under the interpreter.
"""

from __future__ import annotations

import os
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from frozen_models import VOCAB, build
from helpers import assert_close
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from apollo_fast import APOLLO, NonFiniteGradientError, apollo_param_groups, encode_context, segment_loss
from apollo_fast.optim.in_backward import (
    GlobalClippingError,
    GradientAccumulationError,
    InBackwardError,
    check_one_backward,
    step_in_backward,
)

TRITON = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not TRITON, reason="needs a GPU or TRITON_INTERPRET=1")
# the interpreter's numpy warns when the found-flag check multiplies inf by 0 (on purpose)
interp_warning = pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Block(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, h), nn.Linear(h, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.tanh(self.up(self.norm(x))))


class Tiny(nn.Module):
    """Embedding, a ModuleList of residual blocks (the units), a norm and a head: tiny shapes for the interpreter."""

    def __init__(self, vocab: int = 11, d: int = 8, h: int = 12, n: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d, h) for _ in range(n))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)
        with torch.no_grad():  # norms away from 1/0, so their gradients are not special cases
            for name, p in self.named_parameters():
                if "norm" in name:
                    p.add_(0.3 * torch.randn_like(p))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def tiny_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def hf_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def mixed_groups(model: nn.Module, **apollo: object) -> list[dict]:
    """Three groups: APOLLO rank 4 (channel), APOLLO rank 3 with tensor scaling, and AdamW (apollo=False)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    up = [(n, p) for n, p in named if p.dim() == 2 and re.search(r"(up|q_proj|in_proj_qkv|gate_proj)", n)]
    down = [(n, p) for n, p in named if p.dim() == 2 and re.search(r"(down|o_proj|out_proj|v_proj)", n)]
    chosen = {id(p) for _, p in up + down}
    rest = [(n, p) for n, p in named if id(p) not in chosen]  # includes matrices: AdamW for them
    return [
        {"params": up, "rank": 4, **apollo},
        {"params": down, "rank": 3, "scale_type": "tensor", **apollo},
        {"params": rest, "apollo": False},
    ]


def batches(vocab: int, steps: int, shape=(2, 9), seed: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, shape, generator=g).to(DEV) for _ in range(steps)]


def train(model, opt, data, loss_fn, *, in_backward: bool, handle_kw=None, scheduler=None, per_step=None):
    """Normal loop or step in backward over `data`; returns the StepResults (in backward) or grad norms."""
    out = []
    handle = step_in_backward(model, opt, **(handle_kw or {})) if in_backward else None
    for ids in data:
        loss = loss_fn(model, ids)
        loss.backward()
        if handle is not None:
            out.append(handle.finish_step())
        else:
            if per_step is not None:
                per_step(model)
            out.append(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))
            opt.step()
            opt.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
    if handle is not None:
        handle.remove()
    return out, handle


def assert_same_weights(a: nn.Module, b: nn.Module, rtol: float = 0.0) -> None:
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        if rtol == 0.0:
            assert torch.equal(p, q), f"{name}: max diff {(p - q).abs().max().item():.3e}"
        else:
            assert_close(name, p, q, rtol)


def assert_same_state(oa: APOLLO, ob: APOLLO, rtol: float = 0.0) -> None:
    sa, sb = oa.state_dict()["state"], ob.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k, v in sa[i].items():
            w = sb[i][k]
            if not isinstance(v, torch.Tensor):
                assert v == w, f"state[{i}][{k}]"
            elif rtol == 0.0 or k == "step":
                assert torch.equal(v, w), f"state[{i}][{k}]"
            else:
                assert_close(f"state[{i}][{k}]", v, w, rtol, atol=1e-9)


# -- trajectories ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "projection,units",
    [("philox", "layer"), ("official", "layer"), ("philox", "param")],
    ids=["philox", "official", "per-param"],
)
def test_trajectory_equals_step_reference(projection, units):
    """Qwen3.5 (GDN + attention layers), mixed APOLLO/AdamW groups, 30 steps with a refresh every 4: bitwise equal."""
    data = batches(VOCAB, 30)
    runs = []
    for inb in (False, True):
        model = build("qwen3_5").train()
        opt = APOLLO(mixed_groups(model, update_proj_gap=4), lr=3e-3, weight_decay=0.1, projection=projection)
        results, handle = train(model, opt, data, hf_loss, in_backward=inb, handle_kw={"units": units})
        runs.append((model, opt, results, handle))
    (ma, oa, norms, _), (mb, ob, results, handle) = runs
    assert_same_weights(ma, mb)
    assert_same_state(oa, ob)
    n_units = 4 + 3 if units == "layer" else sum(1 for p in mb.parameters())  # 4 layers + embed, norm, lm_head
    assert handle.stats.unit_steps == 30 * n_units and handle.stats.partial_units == 0
    for r, n in zip(results, norms, strict=True):  # the total gradient norm, measured unit by unit
        assert r.units_updated == r.units_with_grad == n_units and not r.skipped
        assert_close("grad_norm", n, r.grad_norm, 1e-5)


@pytest.mark.parametrize("rounding", ["stochastic", "compensated"])
def test_bf16_rounding_trajectory_equals_step(rounding):
    """bf16 weights: the rounding bits are keyed by (parameter, step, element), not drawn in step order, and the
    residuals are per parameter, so stepping in backward stores the same bits as step() (10 steps, bitwise)."""
    data = batches(VOCAB, 10)
    runs = []
    for inb in (False, True):
        model = build("qwen3_5").to(torch.bfloat16).train()
        opt = APOLLO(mixed_groups(model, update_proj_gap=4), lr=3e-3, weight_decay=0.1, param_rounding=rounding)
        runs.append((model, opt, *train(model, opt, data, hf_loss, in_backward=inb)))
    (ma, oa, _, _), (mb, ob, _, _) = runs
    assert_same_weights(ma, mb)
    assert_same_state(oa, ob)


@needs_triton
@interp_warning
def test_trajectory_equals_step_triton(monkeypatch):
    """Triton backend (interpreter): 9 steps, refreshes at 1, 5, 9, mixed groups; tables built once per unit."""
    from apollo_fast.optim.fused import FusedLaunches

    data = batches(11, 9)
    runs = []
    builds = []
    real_build = FusedLaunches._build_apollo
    monkeypatch.setattr(
        FusedLaunches, "_build_apollo", lambda self, la, *a: (builds.append(la.key), real_build(self, la, *a))[1]
    )
    for inb in (False, True):
        builds.clear()
        model = Tiny().to(DEV)
        opt = APOLLO(mixed_groups(model, update_proj_gap=4), lr=1e-2, weight_decay=0.1, backend="triton")
        opt._poison_scratch = True
        runs.append((model, opt, *train(model, opt, data, tiny_loss, in_backward=inb)))
        runs[-1] += (len(builds),)
    (ma, oa, *_, n_normal), (mb, ob, results, handle, n_inb) = runs
    assert_same_weights(ma, mb, rtol=1e-6)
    assert_same_state(oa, ob, rtol=1e-6)
    assert all(r.units_updated == 7 for r in results)  # 3 layers + embed, norm weight and bias, head
    # one table build per (unit, launch class), in the first step only: later steps reuse them
    assert n_inb == 2 * 3 and n_normal == 2, (n_inb, n_normal)


def test_frozen_context_segment_backward_drives_the_updates():
    """segment_loss(...).backward() updates the layers during the backward; same trajectory as the normal step."""
    ctx_ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(1))
    segs = batches(VOCAB, 6, shape=(2, 12), seed=3)
    models = []
    for inb in (False, True):
        model = build("qwen3_5").train()
        ctx = encode_context(model, ctx_ids)
        opt = APOLLO(apollo_param_groups(model, rank=4, update_proj_gap=3), lr=3e-3)
        handle = step_in_backward(model, opt) if inb else None
        for ids in segs:
            before = model.model.layers[2].mlp.down_proj.weight.detach().clone()
            segment_loss(model, ctx, ids).backward()
            if handle is None:
                opt.step()
                opt.zero_grad(set_to_none=True)
            else:
                # already updated by the backward, and no gradient is left
                assert not torch.equal(before, model.model.layers[2].mlp.down_proj.weight)
                assert all(p.grad is None for p in model.parameters())
                handle.finish_step()
        models.append(model)
    assert_same_weights(*models)


# -- memory: one layer's gradients at a time ------------------------------------------------------


def _unit_name(name: str) -> str:
    m = re.match(r"(model\.layers\.\d+)\.", name)
    return m.group(1) if m else name


def _track_gradients(model: nn.Module):
    """Hooks that record every gradient's storage (a weak reference to the allocation) and, after each arrival,
    which units still have a live gradient storage. Registered after step_in_backward's hooks, so they see the
    state after the handle's work for that parameter."""
    live: list[tuple[str, StorageWeakRef, int]] = []
    snapshots: list[tuple[str, set[str], int]] = []
    for name, p in model.named_parameters():

        def hook(p, name=name):
            if p.grad is not None:
                live.append((_unit_name(name), StorageWeakRef(p.grad.untyped_storage()), p.grad.nbytes))
            alive = [(u, n) for u, ref, n in live if not ref.expired()]
            snapshots.append((_unit_name(name), {u for u, _ in alive}, sum(n for _, n in alive)))

        p.register_post_accumulate_grad_hook(hook)

    def alive_units() -> set[str]:
        return {u for u, ref, _ in live if not ref.expired()}

    return snapshots, alive_units


def test_at_most_one_layer_of_gradients_alive():
    """Checked on the allocations (weak references to the gradients' storages), not on the handle's bookkeeping."""
    for inb in (False, True):
        model = build("qwen3_5").train()
        unit_bytes: dict[str, int] = {}
        for name, p in model.named_parameters():
            unit_bytes[_unit_name(name)] = unit_bytes.get(_unit_name(name), 0) + p.nbytes
        opt = APOLLO(apollo_param_groups(model, rank=4), lr=1e-3)
        handle = step_in_backward(model, opt) if inb else None
        snapshots, alive_units = _track_gradients(model)
        ids = torch.randint(0, VOCAB, (2, 10))
        hf_loss(model, ids).backward()
        if not inb:  # the control: the tracker sees every unit's gradients alive after a normal backward
            assert alive_units() == set(unit_bytes), alive_units()
            continue
        assert len(snapshots) == sum(1 for _ in model.parameters())
        for arriving, units, nbytes in snapshots:
            assert units <= {arriving}, f"when {arriving}'s gradient arrived, gradients of {units} were alive"
            assert nbytes <= unit_bytes[arriving]
        assert alive_units() == set(), alive_units()  # nothing alive after the backward
        assert handle.stats.peak_grad_bytes == max(unit_bytes.values())
        handle.finish_step()


# -- what step in backward refuses ----------------------------------------------------------------


def test_refused_combinations_raise_named_errors():
    model = Tiny()
    opt = APOLLO(apollo_param_groups(model, rank=4), lr=1e-3)
    with pytest.raises(GlobalClippingError, match="clip='layer'"):
        step_in_backward(model, opt, max_grad_norm=1.0)
    with pytest.raises(GradientAccumulationError, match="grad_accum_steps gives 4"):
        step_in_backward(model, opt, grad_accum_steps=4)
    with pytest.raises(GradientAccumulationError, match="--grad-accum"):
        check_one_backward(2, "--grad-accum")
    check_one_backward(1)
    with pytest.raises(ValueError, match="clip must be one of"):
        step_in_backward(model, opt, max_grad_norm=1.0, clip="global")
    with pytest.raises(TypeError, match="APOLLO"):
        step_in_backward(model, torch.optim.AdamW(model.parameters()))
    partial = APOLLO([p for n, p in model.named_parameters() if "layers" in n], lr=1e-3)
    with pytest.raises(InBackwardError, match="not in the optimizer.*embed.weight"):
        step_in_backward(model, partial)
    tiny_loss(model, torch.randint(0, 11, (2, 5))).backward()
    with pytest.raises(InBackwardError, match="already holds a gradient"):
        step_in_backward(model, opt)
    opt.zero_grad(set_to_none=True)
    handle = step_in_backward(model, opt)
    with pytest.raises(InBackwardError, match="already steps in backward"):
        step_in_backward(model, opt)
    with pytest.raises(InBackwardError, match="create_graph"):
        tiny_loss(model, torch.randint(0, 11, (2, 5))).backward(create_graph=True)
    assert all(p.grad is None for p in model.parameters())
    handle.remove()


def test_second_backward_in_one_step_is_refused_before_it_updates():
    model = Tiny()
    opt = APOLLO(apollo_param_groups(model, rank=4), lr=1e-2)
    handle = step_in_backward(model, opt)
    ids = torch.randint(0, 11, (2, 7))
    tiny_loss(model, ids).backward()
    after_first = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(GradientAccumulationError, match="second backward pass in one optimizer step"):
        tiny_loss(model, ids).backward()
    for a, p in zip(after_first, model.parameters(), strict=True):
        assert torch.equal(a, p), "the second backward changed a weight"
    assert all(p.grad is None for p in model.parameters())
    handle.finish_step()
    tiny_loss(model, ids).backward()  # the next step works
    assert handle.finish_step().units_updated == 7


def test_reentrant_checkpointing_is_refused():
    """use_reentrant=True runs a backward per checkpointed layer: refused when registering (transformers' flag)
    and, for torch.utils.checkpoint used directly, when its inner backward delivers a gradient."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2))  # fmt: skip
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(GradientAccumulationError, match="use_reentrant=True"):
        step_in_backward(hf, APOLLO(apollo_param_groups(hf, rank=4), lr=1e-3))

    class Checkpointed(Tiny):
        def forward(self, ids):
            x = self.embed(ids)
            for layer in self.layers:
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=True)
            return self.head(self.norm(x))

    model = Checkpointed()
    handle = step_in_backward(model, APOLLO(apollo_param_groups(model, rank=4), lr=1e-3))
    with pytest.raises(GradientAccumulationError, match="second backward pass"):
        tiny_loss(model, torch.randint(0, 11, (2, 7))).backward()
    handle.remove()


def test_replaced_parameters_are_detected():
    model = Tiny()
    opt = APOLLO(apollo_param_groups(model, rank=4), lr=1e-3)
    handle = step_in_backward(model, opt)
    model.norm.weight = nn.Parameter(model.norm.weight.detach().clone())  # not hooked, not in the optimizer
    tiny_loss(model, torch.randint(0, 11, (2, 7))).backward()
    with pytest.raises(InBackwardError, match="without the step-in-backward hooks.*norm.weight"):
        handle.finish_step()


# -- non-finite gradients ---------------------------------------------------------------------------


def _poison(model: nn.Module, layer: int) -> None:
    """Make layer `layer`'s up_proj gradient NaN (a tensor hook runs before accumulation)."""
    model.layers[layer].up.weight.register_hook(lambda g: g * float("nan"))


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=[needs_triton, interp_warning])])
def test_nonfinite_skip_keeps_earlier_units_and_drops_the_rest(backend):
    """nonfinite='skip': units stepped before the NaN keep their update; that unit and every later one do not."""
    model = Tiny().to(DEV)
    opt = APOLLO(apollo_param_groups(model, rank=4), lr=1e-2, nonfinite="skip", backend=backend)
    handle = step_in_backward(model, opt)
    tiny_loss(model, torch.randint(0, 11, (2, 7), device=DEV)).backward()
    handle.finish_step()  # one clean step first
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    steps = {n: float(opt.state[p]["step"]) for n, p in model.named_parameters()}
    _poison(model, 1)
    tiny_loss(model, torch.randint(0, 11, (2, 7), device=DEV)).backward()
    result = handle.finish_step()
    # backward order: head, norm, layers.2, layers.1 (NaN), layers.0, embed
    updated = {"head.weight", "norm.weight", "norm.bias"} | {n for n in before if n.startswith("layers.2.")}
    for n, p in model.named_parameters():
        assert torch.equal(before[n], p) != (n in updated), n
        assert float(opt.state[p]["step"]) == steps[n] + (n in updated), n
    assert result.skipped and result.units_updated == 4 and result.units_with_grad == 7
    assert opt.skipped_steps == 1 and handle.stats.skipped_steps == 1 and handle.stats.partial_skips == 1
    assert all(p.grad is None for p in model.parameters())


@needs_triton
@interp_warning
def test_nonfinite_skip_capturable_skips_later_units_on_the_device():
    """capturable: no host sync; the device flag raised by layers.1 makes every later unit skip on the device."""
    model = Tiny().to(DEV)
    opt = APOLLO(apollo_param_groups(model, rank=4), lr=torch.tensor(1e-2, device=DEV), nonfinite="skip",
                 capturable=True, backend="triton")  # fmt: skip
    handle = step_in_backward(model, opt)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _poison(model, 1)
    tiny_loss(model, torch.randint(0, 11, (2, 7), device=DEV)).backward()
    handle.finish_step()
    updated = {"head.weight", "norm.weight", "norm.bias"} | {n for n in before if n.startswith("layers.2.")}
    for n, p in model.named_parameters():
        assert torch.equal(before[n], p) != (n in updated), n
        assert float(opt.state[p]["step"]) == float(n in updated), n
    assert int(opt.skipped_steps_device[DEV]) == 1


def test_nonfinite_raise_names_the_parameter_and_what_was_updated():
    model = Tiny()
    opt = APOLLO(apollo_param_groups(model, rank=4), lr=1e-2)
    handle = step_in_backward(model, opt)
    _poison(model, 1)
    with pytest.raises(NonFiniteGradientError, match=r"layers\.1\.up\.weight.*4 unit\(s\) .*keep their update"):
        tiny_loss(model, torch.randint(0, 11, (2, 7))).backward()
    assert all(p.grad is None for p in model.parameters())
    assert handle.stats.grad_bytes == 0


# -- clipping, schedules, shared weights, switching modes ---------------------------------------------


@pytest.mark.parametrize("clip", ["layer", "param"])
def test_clipping_per_layer_or_parameter(clip):
    """clip='layer' equals clip_grad_norm_ applied to each unit alone before step(); 'param' to each parameter."""

    def per_unit(model):
        units = [list(layer.parameters()) for layer in model.layers]
        units += [[p] for n, p in model.named_parameters() if not n.startswith("layers.")]
        for unit in units if clip == "layer" else [[p] for p in model.parameters()]:
            torch.nn.utils.clip_grad_norm_(unit, 0.05)

    data = batches(11, 6)
    models = []
    for inb in (False, True):
        model = Tiny()
        opt = APOLLO(mixed_groups(model), lr=1e-2)
        train(model, opt, data, tiny_loss, in_backward=inb, per_step=per_unit,
              handle_kw={"max_grad_norm": 0.05, "clip": clip})  # fmt: skip
        models.append(model)
    assert_same_weights(*models)


def test_lr_scheduler_steps_once_per_optimizer_step():
    data = batches(11, 5)
    models = []
    for inb in (False, True):
        model = Tiny()
        opt = APOLLO(mixed_groups(model), lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
            train(model, opt, data, tiny_loss, in_backward=inb, scheduler=sched)
        assert sched.last_epoch == 5
        models.append(model)
    assert_same_weights(*models)


class Shared(Tiny):
    """layers.1.up's weight is also used by layers.0: its gradient completes after layers.1 was stepped."""

    def forward(self, ids):
        x = self.embed(ids)
        x = x + 0.5 * torch.tanh(F.linear(x, self.layers[1].up.weight)).sum(-1, keepdim=True)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def test_shared_weight_is_stepped_late_and_alone():
    data = batches(11, 5)
    models = []
    for inb in (False, True):
        model = Shared()
        opt = APOLLO(mixed_groups(model), lr=1e-2)
        _, handle = train(model, opt, data, tiny_loss, in_backward=inb)
        models.append(model)
    assert_same_weights(*models)
    assert handle.stats.late_params == 5 and handle.stats.partial_units == 5


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=[needs_triton, interp_warning])])
def test_switching_modes_keeps_the_trajectory(backend, tmp_path):
    """bf16 weights: 3 normal steps, 3 in backward, 1 normal step, a checkpoint, 2 normal steps in a new optimizer =
    9 normal steps (with the Triton backend the optimizer's cached host step counts must follow the switches)."""
    data = batches(11, 9)
    kw = dict(lr=1e-2, weight_decay=0.1, backend=backend)
    ref = Tiny().to(DEV, torch.bfloat16)
    ref_opt = APOLLO(mixed_groups(ref, update_proj_gap=4), **kw)
    train(ref, ref_opt, data, tiny_loss, in_backward=False)

    model = Tiny().to(DEV, torch.bfloat16)
    opt = APOLLO(mixed_groups(model, update_proj_gap=4), **kw)
    train(model, opt, data[:3], tiny_loss, in_backward=False)
    train(model, opt, data[3:6], tiny_loss, in_backward=True)
    train(model, opt, data[6:7], tiny_loss, in_backward=False)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    opt = APOLLO(mixed_groups(model, update_proj_gap=4), **kw)
    opt.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    train(model, opt, data[7:], tiny_loss, in_backward=False)
    rtol = 0.0 if backend == "reference" else 1e-6
    assert_same_weights(ref, model, rtol)
    assert_same_state(ref_opt, opt, rtol)


@needs_triton
@interp_warning
def test_step_params_through_different_parts_keeps_one_step_count():
    """APOLLO.step_params: a parameter stepped through different parts' cached tables, or by step(), in any mix,
    follows the step() trajectory (the tables' host step counts follow steps taken elsewhere)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(13, 7), (5, 9), (6,)]
    init = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) * (1 + 0.3 * t) for s in shapes] for t in range(6)]
    schedule = ["step", ["abc"], ["a", "bc"], ["abc"], "step", ["c", "ab"]]
    runs = []
    for mixed in (False, True):
        ps = [nn.Parameter(x.clone().to(DEV)) for x in init]
        opt = APOLLO(ps, lr=1e-2, rank=3, update_proj_gap=2, backend="triton")
        by_name = dict(zip("abc", ps, strict=True))
        for t, plan in enumerate(schedule):
            for p, gr in zip(ps, grads[t], strict=True):
                p.grad = gr.clone().to(DEV)
            if not mixed or plan == "step":
                opt.step()
            else:
                for k, part in enumerate(plan):
                    assert opt.step_params([by_name[c] for c in part], new_step=k == 0, part=part)
            opt.zero_grad(set_to_none=True)
        runs.append((ps, opt))
    (pa, oa), (pb, ob) = runs
    for i, (a, b) in enumerate(zip(pa, pb, strict=True)):
        assert_close(f"param[{i}]", a, b, 1e-6)
    assert_same_state(oa, ob, 1e-6)
