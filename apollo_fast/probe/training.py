"""The training runs inside `dose` and `lr`: APOLLO on frozen contexts, from the base weights each time.

One run = `apollo-fast train`'s recipe without general data: per example, its context encoded once
without gradients (`encode_context`) and its segments trained against it (`FrozenContextTrainer`),
`batch` examples per optimizer step (equal weight each), gradients clipped to `max_grad_norm`,
APOLLO on `apollo_param_groups(model)` (AdamW for embeddings, norms and the head), constant lr.
The base weights are copied to the CPU once and written back before every run, so one model in
memory serves every run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .inputs import ProbeError

__all__ = ["TrainSettings", "DEFAULT_TRAINING", "snapshot", "restore", "train_run", "shuffle_targets", "run_steps"]


@dataclass(frozen=True)
class TrainSettings:
    """How each probe run trains: `steps` optimizer steps, or `epochs` over the run's examples (default 3 epochs;
    not both)."""

    lr: float = 1e-5
    epochs: float | None = None
    steps: int | None = None
    batch: int = 1  # examples per optimizer step
    rank: int = 256
    max_grad_norm: float | None = 1.0
    segment_batch: int = 8  # segments of one example per forward
    gradient_checkpointing: bool = False

    @property
    def budget_epochs(self) -> float:
        return 3.0 if self.epochs is None else self.epochs

    @property
    def budget(self) -> str:
        return f"{self.steps} steps" if self.steps is not None else f"{self.budget_epochs:g} epochs"

    def check(self) -> None:
        if self.epochs is not None and self.steps is not None:
            raise ProbeError("give either epochs or steps, not both")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ProbeError(f"steps must be an integer >= 1, got {self.steps!r}")
        if self.epochs is not None and not (math.isfinite(self.epochs) and self.epochs > 0):
            raise ProbeError(f"epochs must be a finite number > 0, got {self.epochs!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ProbeError(f"lr must be a finite number > 0, got {self.lr!r}")
        for name in ("batch", "rank", "segment_batch"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ProbeError(f"{name} must be an integer >= 1, got {v!r}")
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ProbeError(f"max_grad_norm must be a finite number > 0 or None, got {self.max_grad_norm!r}")


DEFAULT_TRAINING = TrainSettings()


def run_steps(settings: TrainSettings, n_examples: int) -> int:
    """Optimizer steps of one run on n_examples."""
    if settings.steps is not None:
        return settings.steps
    return max(1, math.ceil(settings.budget_epochs * n_examples / settings.batch))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of every parameter and buffer (the base weights every run starts from)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


@torch.no_grad()
def restore(model: nn.Module, snap: dict[str, torch.Tensor]) -> None:
    """Write the snapshot back into the model's own tensors (no reallocation)."""
    for k, v in model.state_dict().items():
        v.copy_(snap[k])


def _order(n: int, total: int, seed: int) -> list[int]:
    """`total` example indices: a fresh permutation of range(n) per epoch (seeded), concatenated."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 7]))
    out: list[int] = []
    while len(out) < total:
        out.extend(rng.permutation(n).tolist())
    return out[:total]


def train_run(
    model: nn.Module,
    examples: Sequence[Any],
    settings: TrainSettings,
    seed: int,
    bar: Any = None,
) -> list[float]:
    """Train `model` in place on `examples` (BehaviourExample); returns the loss of every optimizer step."""
    from .. import APOLLO, FrozenContextTrainer, apollo_param_groups, encode_context

    if not examples:
        raise ProbeError("a training run needs at least one example")
    device = next(model.parameters()).device
    torch.manual_seed(seed)  # dropout, if the model has any
    opt = APOLLO(apollo_param_groups(model, rank=settings.rank), lr=settings.lr, seed=seed)
    trainer = FrozenContextTrainer(
        model,
        opt,
        grad_accum_steps=settings.batch,
        max_grad_norm=settings.max_grad_norm,
        gradient_checkpointing=settings.gradient_checkpointing,
        micro_batch_size=settings.segment_batch,
    )
    steps = run_steps(settings, len(examples))
    order = _order(len(examples), steps * settings.batch, seed)
    losses, acc = [], 0.0
    model.train()
    try:
        for k, i in enumerate(order):
            ex = examples[i]
            ctx = encode_context(model, ex.context_ids.to(device).unsqueeze(0))
            segs = [{"input_ids": s.input_ids.to(device), "labels": s.labels.to(device)} for s in ex.segments]
            acc += trainer.step(ctx, segs) / settings.batch
            if (k + 1) % settings.batch == 0:
                losses.append(acc)
                acc = 0.0
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.4f}")
    finally:
        model.eval()
        opt.zero_grad(set_to_none=True)
    return losses


def shuffle_targets(examples: Sequence[Any], seed: int) -> list[Any]:
    """The null baseline's data: the same contexts and prompts, the target tokens permuted among all
    segments (seeded). Same tokens, same number of steps; the context -> target link is broken."""
    from ..training.data import BehaviourExample, Segment

    segs = [(e, s) for e in examples for s in e.segments]
    targets = []
    for _, s in segs:
        t = (s.labels != -100).nonzero()
        first = int(t[0]) if t.numel() else s.labels.numel()
        targets.append(s.input_ids[first:])
    perm = np.random.default_rng(np.random.SeedSequence([int(seed), 11])).permutation(len(targets))
    out, k = [], 0
    for e in examples:
        new = []
        for s in e.segments:
            t = (s.labels != -100).nonzero()
            first = int(t[0]) if t.numel() else s.labels.numel()
            target = targets[perm[k]]
            k += 1
            ids = torch.cat([s.input_ids[:first], target])
            labels = torch.cat([torch.full((first,), -100, dtype=torch.long), target])
            new.append(Segment(ids, labels, int(target.numel())))
        out.append(BehaviourExample(e.line, e.context_ids, tuple(new)))
    return out
