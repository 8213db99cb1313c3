"""Step in backward: APOLLO updates each part of a model as soon as its gradients are complete, then frees them.

A full set of bf16 gradients of a 27B model is 54 GB, and each gradient is read once, by its own update.
`step_in_backward(model, optimizer)` registers a post-accumulate-grad hook on every parameter; the
parameters are grouped into parts ("units"): each decoder layer (each element of an outermost
`nn.ModuleList`), and every parameter outside the layers alone. When a unit's gradients are complete,
its parameters are stepped together through `APOLLO.step_params` (the same functional path, checks and
state as `APOLLO.step()`; one fused launch per class with the Triton backend) and their gradients are
dropped, so at most one unit's gradients are alive at a time.

When is a unit complete? When all of its parameters' hooks fired, or when the backward moves on to
another unit, or when the backward ends (parameters without a gradient, e.g. unused ones, are left out
exactly as step() leaves them out). A parameter whose gradient arrives after its unit was stepped
(e.g. a weight also used earlier in the forward, by another layer) is stepped alone. Each parameter is
stepped once per optimizer step with its complete gradient, so the trajectory is that of optimizer.step().

Per optimizer step the caller runs ONE backward, then `handle.finish_step()` (instead of clipping,
optimizer.step() and zero_grad()), then steps its lr scheduler. What cannot work this way:

- gradient accumulation over several backward passes: refused (GradientAccumulationError). APOLLO's
  update W <- W - c s * G applies the full-rank gradient scaled by factors s that depend on the whole
  step's gradient (through the projected moments, the per-channel norms ||G_k|| and the limiter's
  ||s * G||, which have cross terms between micro-batches): s is known only after the last backward,
  so every micro-batch's G would have to be kept, which is the memory this mode saves. Accumulating
  only R = G P^T in the projected space is exact for the moments but not for the update.
- global gradient-norm clipping: refused (GlobalClippingError); it needs every gradient before the
  first update. clip='layer' or clip='param' clips each unit (or parameter) to max_grad_norm on its
  own, as torch.nn.utils.clip_grad_norm_ would clip that unit alone.
- non-finite gradients: a unit whose gradients hold inf/NaN is not updated, and neither is any later
  unit of the same backward (their gradients are dropped as they arrive); units updated earlier in
  the backward keep their update. nonfinite='raise' raises NonFiniteGradientError from the backward,
  naming the parameter and the units already updated; 'skip' counts the step in
  optimizer.skipped_steps (and stats.partial_skips when units had been updated).
- FSDP2-sharded (DTensor) parameters: refused (NotImplementedError; APOLLO.step() steps them). FSDP2
  itself calls these hooks per sharded parameter after each reduce-scatter.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.autograd import Variable

from .apollo import APOLLO, NonFiniteGradientError

__all__ = [
    "CLIP_SCOPES",
    "GlobalClippingError",
    "GradientAccumulationError",
    "InBackward",
    "InBackwardError",
    "InBackwardStats",
    "StepResult",
    "check_one_backward",
    "model_units",
    "step_in_backward",
]

CLIP_SCOPES = ("layer", "param")
_ACTIVE: weakref.WeakSet[APOLLO] = weakref.WeakSet()  # optimizers that have hooks registered


class InBackwardError(RuntimeError):
    """Something step-in-backward mode cannot do, or a misuse of its handle."""


class GradientAccumulationError(InBackwardError):
    """More than one backward pass in one optimizer step (gradient accumulation, micro-batches, reentrant
    activation checkpointing): each would need the whole step's gradient before any update."""


class GlobalClippingError(InBackwardError):
    """Global gradient-norm clipping needs every gradient before the first update; clip per layer or parameter."""


_ACCUMULATION = (
    "step in backward takes one backward pass per optimizer step: APOLLO's update applies the full-rank "
    "gradient scaled by factors that depend on the whole step's gradient, so it cannot be accumulated over "
    "several backward passes without keeping every gradient. Put the step's samples in one batch (one "
    "backward), or train without step_in_backward"
)


def check_one_backward(backward_passes: int, where: str = "") -> None:
    """Raise GradientAccumulationError unless an optimizer step runs exactly one backward pass.

    For trainers, before the first backward: e.g. check_one_backward(grad_accum_steps * micro_batches, "--grad-accum").
    """
    if backward_passes != 1:
        at = f" ({where} gives {backward_passes} backward passes per optimizer step)" if where else ""
        raise GradientAccumulationError(_ACCUMULATION + at)


@dataclass
class StepResult:
    """What finish_step() reports about the optimizer step it closed."""

    grad_norm: torch.Tensor | None  # total 2-norm of the step's gradients before clipping (0-dim fp32, no sync)
    skipped: bool  # a non-finite gradient stopped the step (host-decided; capturable: see skipped_steps_device)
    units_updated: int  # units (layers, or parameters outside them) updated in this step
    units_with_grad: int  # units that received a gradient


@dataclass
class InBackwardStats:
    """Counters since step_in_backward() (bookkeeping of the hooks)."""

    steps: int = 0  # finish_step() calls
    unit_steps: int = 0  # optimizer calls (one per unit or late parameter)
    partial_units: int = 0  # units stepped before all their parameters had a gradient (unused or late ones)
    late_params: int = 0  # parameters stepped alone, after their unit
    skipped_steps: int = 0  # steps stopped by a non-finite gradient (nonfinite='skip')
    partial_skips: int = 0  # ... of which some units had already been updated
    grad_bytes: int = 0  # gradient bytes held now
    peak_grad_bytes: int = 0  # most gradient bytes held at once


@dataclass(eq=False)
class _Unit:
    name: str
    params: list[torch.Tensor]
    arrived: list[torch.Tensor] = field(default_factory=list)  # complete gradients waiting for the step


def _outermost_lists(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every element of an nn.ModuleList that is not inside such an element: the layers."""
    found: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if isinstance(child, nn.ModuleList):
                found.extend((f"{path}.{i}", m) for i, m in enumerate(child))
            else:
                walk(f"{path}.", child)

    walk("", model)
    return found


def model_units(
    model: nn.Module, params: Sequence[torch.Tensor], units: str | Sequence[nn.Module] = "layer"
) -> list[tuple[str | None, list[torch.Tensor]]]:
    """The units step in backward steps `params` in: [(name, parameters)], layers first, in model order.

    units: 'layer' (each element of an outermost nn.ModuleList, i.e. each decoder layer, then every other
    parameter alone), 'param' (every parameter alone) or a list of modules (each one unit, then every other
    parameter alone). Only parameters of `params` that require grad are placed; a parameter that is not in
    the model gets the name None.
    """
    if units == "layer":
        modules = _outermost_lists(model)
    elif units == "param":
        modules = []
    elif isinstance(units, Sequence) and not isinstance(units, str) and all(isinstance(m, nn.Module) for m in units):
        by_module = {m: n for n, m in model.named_modules()}
        modules = [(by_module.get(m, type(m).__name__), m) for m in units]
    else:
        raise ValueError(f"units must be 'layer', 'param' or a list of modules, got {units!r}")
    wanted = {p for p in params if p.requires_grad}
    out: list[tuple[str | None, list[torch.Tensor]]] = []
    taken: set[torch.Tensor] = set()
    for name, module in modules:
        ps = [p for p in module.parameters() if p in wanted and p not in taken]
        taken.update(ps)
        if ps:
            out.append((name, ps))
    names = {p: n for n, p in model.named_parameters()}
    for p in [*names, *params]:  # the rest alone: in the model's order, then any only `params` has
        if p in wanted and p not in taken:
            taken.add(p)
            out.append((names.get(p), [p]))
    return out


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed
        return False
    return isinstance(t, DTensor)


def _reentrant_checkpointing(model: nn.Module) -> str | None:
    """Name of a module that runs transformers' activation checkpointing with use_reentrant=True, if any."""
    for name, module in model.named_modules():
        if getattr(module, "gradient_checkpointing", False) is True:
            fn = getattr(module, "_gradient_checkpointing_func", None)
            if getattr(fn, "keywords", {}).get("use_reentrant", False):
                return name or type(module).__name__
    return None


class InBackward:
    """The handle of step_in_backward(): per optimizer step, one backward, then finish_step().

    Attributes: units (names, in model order), stats (InBackwardStats), last (the last StepResult).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: APOLLO,
        *,
        units: str | Sequence[nn.Module] = "layer",
        max_grad_norm: float | None = None,
        clip: str | None = None,
        grad_norm: bool = True,
    ) -> None:
        self.optimizer, self.max_grad_norm, self.clip, self.track_norm = optimizer, max_grad_norm, clip, grad_norm
        self.stats = InBackwardStats()
        self._model = model
        self.last: StepResult | None = None
        self._names = {p: n for n, p in model.named_parameters()}
        self._units = self._make_units(model, units)
        self.units = [u.name for u in self._units]
        self._unit_of = {p: u for u in self._units for p in u.params}
        self._lock = threading.RLock()
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for u in self._units for p in u.params]
        self._reset_step()
        optimizer._launches.clear()  # step()'s Triton tables and scratch: this mode keeps its own per unit
        _ACTIVE.add(optimizer)

    def _make_units(self, model: nn.Module, units: str | Sequence[nn.Module]) -> list[_Unit]:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        return [
            _Unit(name if name is not None else f"parameter #{self.optimizer._param_index[ps[0]]}", ps)
            for name, ps in model_units(model, params, units)
        ]

    # -- per optimizer step ---------------------------------------------------------------------

    def _reset_step(self) -> None:
        self._task: int | None = None  # graph task id of this step's backward
        self._seen: set[torch.Tensor] = set()  # parameters whose gradient arrived this step
        self._stepped: set[_Unit] = set()
        self._open: _Unit | None = None
        self._first = True  # the next optimizer call is the first of the optimizer step
        self._skipping = False  # a non-finite unit stopped this step: drop the rest
        self._updated: list[str] = []
        self._with_grad: set[_Unit] = set()
        self._sq_norm: dict[torch.device, torch.Tensor] = {}
        self._held: dict[torch.Tensor, int] = {}  # gradient bytes per parameter whose gradient arrived

    def _on_grad(self, p: torch.Tensor) -> None:
        """Post-accumulate-grad hook: p.grad is complete for this backward."""
        with self._lock:
            if p.grad is None:
                return
            try:
                self._arrive(p)
            except BaseException:
                self._abort([p])
                raise

    def _abort(self, extra: list[torch.Tensor] = ()) -> None:
        """An error ends the step: what was updated stays updated, every pending gradient is dropped."""
        pending = [*extra, *(self._open.arrived if self._open is not None else [])]
        if self._open is not None:
            self._open.arrived = []
        self._drop(pending)
        self._reset_step()

    def _arrive(self, p: torch.Tensor) -> None:
        grad = p.grad
        task = torch._C._current_graph_task_id()
        if self._task is None:
            self._task = task
            if task != -1:  # inside the autograd engine: flush what is pending when this backward ends
                Variable._execution_engine.queue_callback(lambda: self._on_backward_end(task))
        elif task != self._task or p in self._seen:
            raise GradientAccumulationError(
                f"{self._names.get(p, 'a parameter')} got a gradient from a second backward pass in one optimizer "
                "step (call finish_step() after each backward; the step's earlier updates stay applied). "
                + _ACCUMULATION
            )
        if grad.requires_grad:
            raise InBackwardError("step in backward does not support backward(create_graph=True)")
        self._seen.add(p)
        self._held[p] = grad.numel() * grad.element_size()
        self.stats.grad_bytes += self._held[p]
        self.stats.peak_grad_bytes = max(self.stats.peak_grad_bytes, self.stats.grad_bytes)
        unit = self._unit_of[p]
        self._with_grad.add(unit)
        if unit in self._stepped:  # late: its unit was stepped without it (the open unit may go on)
            self.stats.late_params += 1
            self._step([p], unit, (unit.name, self._names.get(p)))
            return
        if self._open is not None and self._open is not unit:
            self._flush(self._open)  # the backward moved on: that unit will get no more gradients
        unit.arrived.append(p)
        self._open = unit
        if len(unit.arrived) == len(unit.params):
            self._flush(unit)

    def _on_backward_end(self, task: int) -> None:
        with self._lock:
            if self._task == task and self._open is not None:
                try:
                    self._flush(self._open)
                except BaseException:
                    self._abort()
                    raise

    def _flush(self, unit: _Unit) -> None:
        arrived, unit.arrived, self._open = set(unit.arrived), [], None
        params = [p for p in unit.params if p in arrived]  # model order, whatever order the backward took
        self._stepped.add(unit)
        if len(params) < len(unit.params):
            self.stats.partial_units += 1
        self._step(params, unit, unit.name)

    def _step(self, params: list[torch.Tensor], unit: _Unit, part: Any) -> None:
        """Clip, step and drop the gradients of `params` (one unit, or a late parameter)."""
        try:
            if self._skipping:
                return
            with torch.no_grad():
                self._clip_and_measure(params)
            first, self._first = self._first, False
            try:
                ok = self.optimizer.step_params(params, new_step=first, part=part)
            except NonFiniteGradientError as e:
                done = self._updated
                raise NonFiniteGradientError(
                    f"step in backward: {e.args[0].split('; nothing was updated')[0]}. This unit ({unit.name}) and "
                    f"the rest of the backward were not updated; {len(done)} unit(s) stepped earlier in this "
                    f"backward keep their update ({', '.join(done[:4])}{', ...' if len(done) > 4 else ''}). "
                    "Pass nonfinite='skip' to skip such steps instead."
                ) from None
            self.stats.unit_steps += 1
            if ok:
                self._updated.append(unit.name)
            else:
                self._skipping = True
        finally:
            self._drop(params)

    def _clip_and_measure(self, params: list[torch.Tensor]) -> None:
        if self.clip is None and not self.track_norm:
            return
        grads = [p.grad for p in params]
        if self.clip == "param":
            norms = [torch.nn.utils.get_total_norm([g]) for g in grads]
            for p, n in zip(params, norms, strict=True):
                torch.nn.utils.clip_grads_with_norm_([p], self.max_grad_norm, n)
        else:
            norms = [torch.nn.utils.get_total_norm(grads)]
            if self.clip == "layer":
                torch.nn.utils.clip_grads_with_norm_(params, self.max_grad_norm, norms[0])
        if self.track_norm:
            sq = torch.stack([n.float() for n in norms]).square().sum()
            dev = sq.device
            self._sq_norm[dev] = self._sq_norm[dev] + sq if dev in self._sq_norm else sq

    def _drop(self, params: list[torch.Tensor]) -> None:
        for p in params:
            g = p.grad
            if g is None:
                continue
            local = getattr(g, "_local_tensor", g)  # a DTensor's shard (FSDP2)
            if local.is_cuda:  # FSDP2 allocates gradients on its reduce-scatter stream
                local.record_stream(torch.cuda.current_stream(local.device))
            self.stats.grad_bytes -= self._held.pop(p, 0)
            p.grad = None

    def finish_step(self) -> StepResult:
        """Close the optimizer step after its one backward: step what is pending, count the step, and call
        optimizer.step() (no gradient is left, so it changes nothing; its step hooks run and lr schedulers
        see a step). Then step the lr scheduler as usual."""
        with self._lock:
            if self._open is not None:
                try:
                    self._flush(self._open)
                except BaseException:
                    self._abort()
                    raise
            now = dict(self._model.named_parameters())
            stale = [n for n, p in now.items() if p.grad is not None]
            current = set(now.values())
            stale += [
                self._names.get(p, "a parameter") for p in self._unit_of if p.grad is not None and p not in current
            ]
            if stale:
                raise InBackwardError(
                    f"gradients arrived without the step-in-backward hooks ({', '.join(stale[:4])}"
                    f"{', ...' if len(stale) > 4 else ''}): were parameters replaced after step_in_backward() "
                    "(e.g. by fully_shard)? Call step_in_backward() on the model as it trains."
                )
            if not self._first:  # the optimizer stepped parts of this step
                self.optimizer.count_skipped_step(self._skipping)
            grad_norm = None
            if self.track_norm and self._sq_norm:
                devs = list(self._sq_norm)
                grad_norm = sum(self._sq_norm[d].to(devs[0]) for d in devs).sqrt()
            result = StepResult(grad_norm, self._skipping, len(self._updated), len(self._with_grad))
            self.stats.steps += 1
            if self._skipping:
                self.stats.skipped_steps += 1
                self.stats.partial_skips += int(bool(self._updated))
            self._reset_step()
            self.last = result
        self.optimizer.step()
        return result

    def remove(self) -> None:
        """Remove the hooks (call finish_step() first after the last backward). The optimizer and its state
        are unchanged; optimizer.step() takes over again."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.optimizer._launches.clear()  # the units' Triton tables and scratch
        _ACTIVE.discard(self.optimizer)
        self._reset_step()

    def __enter__(self) -> InBackward:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def step_in_backward(
    model: nn.Module,
    optimizer: APOLLO,
    *,
    units: str | Sequence[nn.Module] = "layer",
    max_grad_norm: float | None = None,
    clip: str | None = None,
    grad_accum_steps: int = 1,
    grad_norm: bool = True,
) -> InBackward:
    """Update `model` with `optimizer` during backward, one unit (decoder layer) at a time; returns the handle.

    units: 'layer' (each element of an outermost nn.ModuleList, i.e. each decoder layer, and every other
        parameter alone), 'param' (every parameter alone), or a list of modules (each one unit).
    max_grad_norm, clip: clip each unit's gradient ('layer') or each parameter's ('param') to max_grad_norm
        before its update. Global clipping is refused (GlobalClippingError).
    grad_accum_steps: the caller's gradient accumulation; anything but 1 raises GradientAccumulationError.
    grad_norm: measure the total gradient norm before clipping (StepResult.grad_norm; one extra read of
        each gradient unless clipping reads it anyway).
    """
    if not isinstance(optimizer, APOLLO):
        raise TypeError(f"step_in_backward needs an apollo_fast.APOLLO optimizer, got {type(optimizer).__name__}")
    if optimizer in _ACTIVE:
        raise InBackwardError("this optimizer already steps in backward: remove() the other handle first")
    check_one_backward(grad_accum_steps, "grad_accum_steps")
    if max_grad_norm is not None:
        if not (isinstance(max_grad_norm, (int, float)) and math.isfinite(max_grad_norm) and max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a finite number > 0 or None, got {max_grad_norm!r}")
        if clip is None:
            raise GlobalClippingError(
                "global gradient-norm clipping (max_grad_norm without clip=) needs every gradient before the "
                "first update, which step in backward does not have; pass clip='layer' (each unit's gradient "
                "clipped to max_grad_norm on its own) or clip='param' (each parameter's)"
            )
    if clip is not None and clip not in CLIP_SCOPES:
        raise ValueError(f"clip must be one of {CLIP_SCOPES} or None, got {clip!r}")
    if clip is not None and max_grad_norm is None:
        raise ValueError(f"clip={clip!r} needs max_grad_norm")
    reentrant = _reentrant_checkpointing(model)
    if reentrant is not None:
        raise GradientAccumulationError(
            f"{reentrant} uses activation checkpointing with use_reentrant=True, whose recomputation runs a "
            "backward pass of its own; enable it with use_reentrant=False"
        )
    opt_params = {p for g in optimizer.param_groups for p in g["params"]}
    names = {p: n for n, p in model.named_parameters()}
    sharded = [names.get(p, "a parameter") for p in opt_params if _is_dtensor(p)]
    if sharded:  # FSDP2 calls these hooks per sharded parameter; the step per unit on shards is not written yet
        raise NotImplementedError(
            f"{sharded[0]} is a DTensor (FSDP2-sharded): step_in_backward does not step sharded parameters yet; "
            "use optimizer.step() after the backward"
        )
    outside = [n for p, n in names.items() if p.requires_grad and p not in opt_params]
    if outside:
        raise InBackwardError(
            f"parameters that require grad are not in the optimizer ({', '.join(outside[:4])}"
            f"{', ...' if len(outside) > 4 else ''}); their gradients would pile up: freeze them "
            "(requires_grad_(False)) or give them to the optimizer"
        )
    held = [names.get(p, "a parameter") for p in opt_params if p.grad is not None]
    if held:
        raise InBackwardError(
            f"{held[0]} already holds a gradient: call optimizer.zero_grad(set_to_none=True) before step_in_backward"
        )
    return InBackward(model, optimizer, units=units, max_grad_norm=max_grad_norm, clip=clip, grad_norm=grad_norm)
