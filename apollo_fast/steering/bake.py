"""Bake a steering vector into the weights: train the un-steered model (APOLLO) to match the steered
model's next-token distributions on a prompt set, minimising KL(steered || model).

With a shared context, the student trains through the frozen-context step by default (the context
encoded without gradients, only the prompt segment trained); `segment_forward` can replace it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
from torch import nn

from ..optim import APOLLO, apollo_param_groups
from .hooks import steer
from .pairs import encode, pad_batch
from .vector import SteeringVector
from .verify import verify_steering

__all__ = [
    "bake_steering",
    "BakeReport",
    "SegmentForward",
    "frozen_context_forward",
    "full_sequence_forward",
    "kl_divergence",
]


class SegmentForward(Protocol):
    """(model, context (C,) int64 or None, segment ids (B, S), segment mask (B, S)) -> logits (B, S, vocab).

    The logits at segment position j predict token j+1, given the context and segment[:j+1].
    """

    def __call__(
        self, model: nn.Module, context: torch.Tensor | None, ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor: ...


def full_sequence_forward(
    model: nn.Module, context: torch.Tensor | None, ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Default: run context + segment as one sequence (gradients flow through the context too)."""
    if context is None or context.numel() == 0:
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    c = context.to(ids.device).unsqueeze(0).expand(ids.shape[0], -1)
    full_ids = torch.cat([c, ids], 1)
    full_mask = torch.cat([torch.ones_like(c), mask], 1)
    return model(input_ids=full_ids, attention_mask=full_mask, use_cache=False).logits[:, c.shape[1] :]


def frozen_context_forward(
    model: nn.Module, context: torch.Tensor | None, ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """The frozen-context step: the context encoded under no_grad with the current weights, only the
    segment differentiated (apollo_fast.frozen; Llama/Qwen3/Qwen3.5/Qwen3-Next). Right-padded `mask`."""
    if context is None or context.numel() == 0:
        return full_sequence_forward(model, context, ids, mask)
    from ..frozen import encode_context, segment_logits

    frozen = encode_context(model, context.to(ids.device).unsqueeze(0))
    return segment_logits(model, frozen, ids, attention_mask=mask)


def kl_divergence(teacher_logp: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real positions of KL(teacher || student) in nats. (B, S, V) log-probs, (B, S, V) logits, (B, S)."""
    s = torch.log_softmax(student_logits.float(), -1)
    t = teacher_logp.to(s.device).float()
    kl = (t.exp() * (t - s)).sum(-1)
    m = mask.to(kl.device, kl.dtype)
    return (kl * m).sum() / m.sum().clamp_min(1)


@dataclass
class BakeReport:
    """KL(steered || model) on the evaluation prompts before and after baking, and retention metrics.

    kl_closed = 1 - kl_after / kl_before. With eval pairs, margin_* are the mean log-prob margins
    (desired - undesired) of the original model, the steered model, and the baked model without the
    hook; margin_retained = (baked - original) / (steered - original).
    """

    steps: int
    kl_before: float
    kl_after: float
    kl_closed: float
    first_loss: float
    last_loss: float
    margin_original: float | None = None
    margin_steered: float | None = None
    margin_baked: float | None = None
    margin_retained: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _batches(prompts: list[list[int]], batch_size: int, pad_id: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [pad_batch(prompts[s : s + batch_size], pad_id) for s in range(0, len(prompts), batch_size)]


@torch.no_grad()
def _teacher(model, vector, coefficient, layers, context, batches) -> list[torch.Tensor]:
    dev = next(model.parameters()).device
    out = []
    with steer(model, vector, coefficient, layers):
        for ids, mask in batches:
            logits = full_sequence_forward(model, context, ids.to(dev), mask.to(dev))
            out.append(torch.log_softmax(logits.float(), -1).cpu())
    return out


@torch.no_grad()
def _mean_kl(model, teacher, context, batches, forward: SegmentForward) -> float:
    dev = next(model.parameters()).device
    tot, n = 0.0, 0
    for t, (ids, mask) in zip(teacher, batches, strict=True):
        logits = forward(model, context, ids.to(dev), mask.to(dev))
        k = int(mask.sum())
        tot += kl_divergence(t, logits, mask).item() * k
        n += k
    return tot / max(1, n)


def bake_steering(
    model: nn.Module,
    vector: SteeringVector,
    prompts: Sequence[Any],
    coefficient: float = 1.0,
    layers: Sequence[int] | None = None,
    *,
    steps: int = 100,
    lr: float = 1e-3,
    batch_size: int = 8,
    eval_prompts: Sequence[Any] | None = None,
    eval_pairs: Sequence[Any] | None = None,
    tokenizer: Any | None = None,
    context: Any | None = None,
    segment_forward: SegmentForward | None = None,
    optimizer_factory: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
    rank: int = 16,
    seed: int = 0,
    progress: bool = False,
) -> BakeReport:
    """Train `model` in place (no hook) to match the steered model's next-token distributions.

    prompts: token-id lists or strings (with `tokenizer`); every position of every prompt is a
    target. context: optional shared prefix (ids or string) before every prompt; the teacher sees
    it steered (full sequence), the student through `segment_forward` (default with a context:
    `frozen_context_forward`, which trains only the segment; `full_sequence_forward` trains through
    the context too and serves models the frozen-context step does not support). The optimizer is APOLLO on
    `apollo_param_groups(model)` (rank `rank`, learning rate `lr`) unless `optimizer_factory` is given.
    The KL is measured on `eval_prompts` (default: the training prompts).
    """
    from tqdm.auto import tqdm

    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    vector.check_compatible(model)
    vocab = getattr(model.config.get_text_config(), "vocab_size", None)
    train = [encode(p, tokenizer, vocab_size=vocab) for p in prompts]
    evals = train if eval_prompts is None else [encode(p, tokenizer, vocab_size=vocab) for p in eval_prompts]
    if not train or any(len(p) == 0 for p in train + evals):
        raise ValueError("bake needs non-empty prompts")
    ctx = None
    if context is not None:
        ctx = torch.as_tensor(
            encode(context, tokenizer, special=isinstance(context, str), vocab_size=vocab), dtype=torch.int64
        )
    forward = segment_forward or (frozen_context_forward if ctx is not None else full_sequence_forward)
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    random.Random(seed).shuffle(train)
    train_b, eval_b = _batches(train, batch_size, pad_id), _batches(evals, batch_size, pad_id)
    was_training = model.training
    model.eval()  # distillation without dropout; the teacher is the same network with the hook
    try:
        train_t = _teacher(model, vector, coefficient, layers, ctx, train_b)
        eval_t = train_t if eval_prompts is None else _teacher(model, vector, coefficient, layers, ctx, eval_b)
        kl_before = _mean_kl(model, eval_t, ctx, eval_b, forward)
        before = None
        if eval_pairs is not None:
            before = verify_steering(model, vector, eval_pairs, coefficient, layers, tokenizer, batch_size)
        opt = optimizer_factory(model) if optimizer_factory else APOLLO(apollo_param_groups(model, rank=rank), lr=lr)
        dev = next(model.parameters()).device
        losses = []
        for step in tqdm(range(steps), desc="bake", disable=not progress):
            j = step % len(train_b)
            ids, mask = train_b[j]
            loss = kl_divergence(train_t[j], forward(model, ctx, ids.to(dev), mask.to(dev)), mask)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        kl_after = _mean_kl(model, eval_t, ctx, eval_b, forward)
        report = BakeReport(
            steps,
            kl_before,
            kl_after,
            1.0 - kl_after / kl_before if kl_before > 0 else 0.0,
            losses[0] if losses else kl_before,
            losses[-1] if losses else kl_before,
        )
        if before is not None:
            after = verify_steering(model, vector, eval_pairs, 0.0, layers, tokenizer, batch_size)
            report.margin_original = before.margin_off
            report.margin_steered = before.margin_on
            report.margin_baked = after.margin_off
            gap = before.margin_on - before.margin_off
            report.margin_retained = (after.margin_off - before.margin_off) / gap if gap != 0 else None
    finally:
        model.train(was_training)
    return report
