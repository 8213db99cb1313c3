"""segment_loss / segment_logits: a segment's forward after a FrozenContext, differentiable w.r.t. the model only."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import ModelParts, model_parts
from .context import FrozenContext, _layer_kinds, check_ids, out_of_vocab
from .forward import as_forward, run_layers

__all__ = ["segment_logits", "segment_loss", "prepare_segment"]

IGNORE_INDEX = -100


def _check_context(parts: ModelParts, context: FrozenContext, batch: int) -> None:
    if not isinstance(context, FrozenContext):
        raise TypeError(f"context must be a FrozenContext from encode_context, got {type(context).__name__}")
    if context.arch != parts.arch or context.layer_kinds != _layer_kinds(parts):
        raise ValueError(f"context was encoded by a {context.arch} with other layers than this {parts.arch}")
    if context.batch_size not in (1, batch):
        raise ValueError(f"context batch {context.batch_size} serves segment batches of 1 or itself, not {batch}")
    device = next(iter(parts.embed.parameters())).device
    if context.device != device:
        raise ValueError(f"context is on {context.device} but the model is on {device}")
    context.check_unmodified()


def prepare_segment(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Validate a segment batch; return ids [B, T], labels [B, T] (-100 at padding) and the number of targets.

    The value checks are gathered into one device-to-host copy (one sync per segment batch).
    """
    ids = check_ids("input_ids", input_ids, model, check_range=False)
    checks: list[tuple[torch.Tensor, str]] = [
        (out_of_vocab(ids, model).any(), "input_ids has token ids outside the vocabulary")
    ]
    if labels is None:
        labels = ids
    else:
        if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point:
            raise TypeError("labels must be an integer torch.Tensor")
        labels = labels.unsqueeze(0) if labels.dim() == 1 else labels
        if labels.shape != ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(ids.shape)}")
        labels = labels.to(ids.device, torch.long)
        bad = (labels != IGNORE_INDEX) & out_of_vocab(labels, model)
        checks.append((bad.any(), "labels hold ids outside the vocabulary (use -100 to ignore a position)"))
    if attention_mask is not None:
        mask = attention_mask.unsqueeze(0) if attention_mask.dim() == 1 else attention_mask
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(ids.shape)}")
        mask = mask.to(ids.device)
        checks.append((((mask != 0) & (mask != 1)).any(), "attention_mask must hold only 0 and 1"))
        # Right padding only: padded positions come after every real token, so no real token ever sees them.
        checks.append(
            (
                (mask[:, 1:] > mask[:, :-1]).any(),
                "attention_mask must be right-padded (ones then zeros per row); left padding would put "
                "pad tokens between the context and the segment",
            )
        )
        checks.append(((mask[:, 0] == 0).any(), "attention_mask has a row with no real token"))
        labels = labels.masked_fill(mask == 0, IGNORE_INDEX)
    count = (labels[:, 1:] != IGNORE_INDEX).sum()
    values = torch.stack([c.to(torch.int64) for c, _ in checks] + [count]).tolist()
    for failed, (_, message) in zip(values[:-1], checks, strict=True):
        if failed:
            raise ValueError(message)
    return ids, labels, int(values[-1])


def _hidden(model, context, ids, gradient_checkpointing: bool, backend: str) -> tuple[ModelParts, torch.Tensor]:
    parts = model_parts(model)
    _check_context(parts, context, ids.shape[0])
    h, _ = run_layers(
        parts,
        ids,
        context.length,
        context.states,
        want_states=False,
        gradient_checkpointing=gradient_checkpointing,
        backend=backend,
    )
    return parts, parts.final_norm(h)


def segment_logits(
    model: nn.Module,
    context: FrozenContext,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    gradient_checkpointing: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Logits [B, T, V] of segment tokens input_ids [B, T] placed right after the context (positions Lc..Lc+T-1)."""
    ids, _, _ = prepare_segment(model, input_ids, None, attention_mask)

    def logits(ids: torch.Tensor) -> torch.Tensor:
        parts, h = _hidden(model, context, ids, gradient_checkpointing, backend)
        return parts.lm_head(h)

    return as_forward(model, logits, ids)  # under FSDP2: the root's parameters unsharded around it


def segment_loss(
    model: nn.Module,
    context: FrozenContext,
    input_ids: torch.Tensor,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    gradient_checkpointing: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Mean next-token cross-entropy (fp32 scalar) over the segment's target tokens, after the frozen context.

    labels [B, T] follow transformers: shifted inside (position t predicts labels[t+1]), -100 ignored, default the
    segment itself; attention_mask [B, T] right-padded. The mean is over all target tokens of the batch.
    Differentiable w.r.t. the model's parameters, never w.r.t. the context. backend: where attention and the GDN
    layers run ('auto' | 'reference' | 'triton', apollo_fast.backend).
    """
    ids, labels, count = prepare_segment(model, input_ids, labels, attention_mask)
    if count == 0:
        raise ValueError(
            "segment has no target tokens: labels are shifted inside, so a segment needs >= 2 tokens and at "
            "least one label != -100 after its first position"
        )
    targets = labels[:, 1:]

    def loss(ids: torch.Tensor) -> torch.Tensor:
        parts, h = _hidden(model, context, ids, gradient_checkpointing, backend)
        logits = parts.lm_head(h[:, :-1]).float()
        total = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return total / count

    return as_forward(model, loss, ids)  # under FSDP2: the root's parameters unsharded around it
