"""Frozen-context training: encode a long context once without gradients, train many segments against it.

ctx = encode_context(model, context_ids)          # no grad; read-only per-layer state
loss = segment_loss(model, ctx, segment_ids)      # differentiable w.r.t. the model, never the context
FrozenContextTrainer(model, optimizer).step(ctx, segments)
"""

from .adapters import SUPPORTED_MODELS
from .context import FrozenContext, encode_context
from .segment import segment_logits, segment_loss
from .trainer import FrozenContextTrainer

__all__ = [
    "FrozenContext",
    "FrozenContextTrainer",
    "SUPPORTED_MODELS",
    "encode_context",
    "segment_logits",
    "segment_loss",
]
