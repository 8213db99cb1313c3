"""Forward and backward of one training item. `behaviour_backward` is the only caller of the frozen-context core."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .data import IGNORE_INDEX, BehaviourExample, GeneralItem, Segment

__all__ = [
    "load_frozen_api",
    "pad_segments",
    "behaviour_backward",
    "general_backward",
    "item_backward",
]


def load_frozen_api() -> tuple[Callable[..., Any], Callable[..., torch.Tensor]]:
    """(encode_context, segment_loss): the one seam between this command and the frozen-context core."""
    from apollo_fast.frozen import encode_context, segment_loss

    return encode_context, segment_loss


def pad_segments(segments: Sequence[Segment]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Right-pad segments into a batch: input_ids, labels (-100 on padding) [B, T] and attention_mask [B, T].

    The mask is None when every segment has the same length (nothing is padded).
    """
    lengths = [s.input_ids.numel() for s in segments]
    width = max(lengths)
    ids = torch.zeros(len(segments), width, dtype=torch.int64)
    labels = torch.full((len(segments), width), IGNORE_INDEX, dtype=torch.int64)
    mask = torch.zeros(len(segments), width, dtype=torch.int64)
    for row, (seg, n) in enumerate(zip(segments, lengths, strict=True)):
        ids[row, :n], labels[row, :n], mask[row, :n] = seg.input_ids, seg.labels, 1
    return ids, labels, (None if min(lengths) == width else mask)


def behaviour_backward(
    model: nn.Module,
    example: BehaviourExample,
    weight: float,
    gradient_checkpointing: bool = False,
    segment_batch: int = 8,
) -> torch.Tensor:
    """Encode the context once (no grad), then per batch of segments: loss, backward scaled by its token share.

    The gradient is that of weight * (token-weighted mean loss over all target tokens of the
    example). Up to `segment_batch` segments run as one right-padded batch against the shared
    context; each batch's graph is freed by its own backward, so memory holds one batch at a time.
    Returns the example's mean loss per target token (0-dim, detached). gradient_checkpointing is
    passed to segment_loss only when True (the keyword is an extension of the public signature).
    """
    if segment_batch < 1:
        raise ValueError(f"segment_batch must be >= 1, got {segment_batch}")
    encode_context, segment_loss = load_frozen_api()
    device = next(model.parameters()).device
    context = encode_context(model, example.context_ids.to(device).unsqueeze(0))
    total = torch.zeros((), dtype=torch.float32, device=device)
    extra = {"gradient_checkpointing": True} if gradient_checkpointing else {}
    for start in range(0, len(example.segments), segment_batch):
        chunk = example.segments[start : start + segment_batch]
        ids, labels, mask = pad_segments(chunk)
        mask = None if mask is None else mask.to(device)
        # segment_loss is the mean over the batch's target tokens, so this batch weighs by its share of them
        loss = segment_loss(model, context, ids.to(device), labels=labels.to(device), attention_mask=mask, **extra)
        share = sum(s.n_target for s in chunk) / example.n_target
        (loss * (weight * share)).backward()
        total += loss.detach().float() * share
    return total


def general_backward(model: nn.Module, item: GeneralItem, weight: float) -> torch.Tensor:
    """Plain language modelling on a chunk (full-sequence forward); returns its mean loss (0-dim, detached)."""
    device = next(model.parameters()).device
    ids = item.input_ids.to(device).unsqueeze(0)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    (loss * weight).backward()
    return loss.detach().float()


def item_backward(
    model: nn.Module,
    item: BehaviourExample | GeneralItem,
    weight: float,
    gradient_checkpointing: bool = False,
    segment_batch: int = 8,
) -> torch.Tensor:
    """Backward of weight * the item's mean loss; returns that mean loss (0-dim, detached)."""
    if isinstance(item, GeneralItem):
        return general_backward(model, item, weight)
    return behaviour_backward(model, item, weight, gradient_checkpointing, segment_batch)
