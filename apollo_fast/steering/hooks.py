"""Where steering acts: the residual stream at the output of each decoder layer of a transformers model.

`steer` adds coefficient * direction to the chosen layers' outputs at every position (prompt and
every token generated afterwards, with or without a KV cache); `capture_hidden` records them.
Both are context managers that remove their hooks on exit, even on error.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ..checks import finite_number
from .layers import decoder_layers
from .vector import SteeringVector

__all__ = ["steer", "capture_hidden"]


def _add_to_output(output, delta: torch.Tensor):
    if isinstance(output, torch.Tensor):
        return output + delta.to(dtype=output.dtype, device=output.device)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        h = output[0]
        return (h + delta.to(dtype=h.dtype, device=h.device),) + output[1:]
    raise TypeError(f"decoder layer returned {type(output).__name__}; cannot steer it")


def _hidden_of(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


@contextmanager
def steer(
    model: nn.Module,
    vector: SteeringVector,
    coefficient: float = 1.0,
    layers: Sequence[int] | None = None,
) -> Iterator[nn.Module]:
    """Add coefficient * vector[layer] to the output of each chosen decoder layer, at every position.

    layers: default every layer the vector has. The model's parameters are never touched; the
    hooks are removed on exit, so the model is exactly as before afterwards.
    """
    coefficient = finite_number("steering coefficient", coefficient)
    vector.check_compatible(model)
    layers = vector.layers if layers is None else [int(i) for i in layers]
    missing = [i for i in layers if i not in vector.directions]
    if missing:
        raise ValueError(f"steering vector has no direction for layers {missing} (it has {vector.layers})")
    blocks = decoder_layers(model)
    handles = []
    try:
        for i in layers:
            delta = vector.directions[i].float() * float(coefficient)

            def hook(mod, args, output, delta=delta):
                return _add_to_output(output, delta)

            handles.append(blocks[i].register_forward_hook(hook))
        yield model
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture_hidden(model: nn.Module, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Record each chosen layer's output (B, T, hidden) of the latest forward into the yielded dict.

    Enter it inside `steer` to see the steered stream (hooks run in registration order).
    """
    blocks = decoder_layers(model)
    bad = [i for i in layers if not 0 <= i < len(blocks)]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has {len(blocks)} decoder layers")
    store: dict[int, torch.Tensor] = {}
    handles = []
    try:
        for i in layers:

            def hook(mod, args, output, i=i):
                store[i] = _hidden_of(output).detach()

            handles.append(blocks[i].register_forward_hook(hook))
        yield store
    finally:
        for h in handles:
            h.remove()
