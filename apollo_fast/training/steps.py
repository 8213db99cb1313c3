"""Forward and backward of one training item. `behaviour_backward` is the only caller of the frozen-context core."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .data import BehaviourExample, GeneralItem

__all__ = ["FrozenCoreMissing", "load_frozen_api", "behaviour_backward", "general_backward", "item_backward"]


class FrozenCoreMissing(ImportError):
    """apollo_fast.encode_context / segment_loss are not available in this install."""


def load_frozen_api() -> tuple[Callable[..., Any], Callable[..., torch.Tensor]]:
    """(encode_context, segment_loss) from apollo_fast, imported lazily."""
    try:
        from apollo_fast import encode_context, segment_loss
    except ImportError as err:
        raise FrozenCoreMissing(
            "apollo-fast train needs the frozen-context core (apollo_fast.encode_context and "
            "apollo_fast.segment_loss), which this install does not have"
        ) from err
    return encode_context, segment_loss


def behaviour_backward(
    model: nn.Module, example: BehaviourExample, weight: float, gradient_checkpointing: bool = False
) -> torch.Tensor:
    """Encode the context once (no grad), then per segment: loss, backward scaled by weight * its token share.

    The gradient is that of weight * (token-weighted mean loss over all target tokens of the
    example). Each segment's graph is freed by its own backward, so memory holds one segment at a
    time. Returns the example's mean loss per target token (0-dim, detached). gradient_checkpointing
    is passed to segment_loss only when True (the keyword is an extension of the public signature).
    """
    encode_context, segment_loss = load_frozen_api()
    device = next(model.parameters()).device
    context = encode_context(model, example.context_ids.to(device).unsqueeze(0))
    total = torch.zeros((), dtype=torch.float32, device=device)
    extra = {"gradient_checkpointing": True} if gradient_checkpointing else {}
    for seg in example.segments:
        ids, labels = seg.input_ids.to(device).unsqueeze(0), seg.labels.to(device).unsqueeze(0)
        loss = segment_loss(model, context, ids, labels=labels, **extra)
        share = seg.n_target / example.n_target
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
    model: nn.Module, item: BehaviourExample | GeneralItem, weight: float, gradient_checkpointing: bool = False
) -> torch.Tensor:
    """Backward of weight * the item's mean loss; returns that mean loss (0-dim, detached)."""
    if isinstance(item, GeneralItem):
        return general_backward(model, item, weight)
    return behaviour_backward(model, item, weight, gradient_checkpointing)
