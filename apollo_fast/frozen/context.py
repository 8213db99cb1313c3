"""FrozenContext and encode_context: run a context once without gradients and keep its per-layer state."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from .adapters import AttentionAdapter, model_parts
from .forward import LayerState, as_forward, run_layers

__all__ = ["FrozenContext", "encode_context"]


@dataclass(frozen=True, eq=False)
class FrozenContext:
    """The read-only state a context leaves behind, per layer, for segments that follow it.

    Attention layers: keys and values [Bc, Hkv, Lc, D] (after k-norm and RoPE, model dtype). GDN layers: the
    causal-conv prefix [Bc, K-1, C] (the last K-1 conv inputs) and the recurrent state [Bc, Hv, dk, dv] (fp32).
    `length` is Lc, the position offset of the first segment token. Bc is 1 (shared by any batch of segments)
    or the segment batch. Nothing writes into these tensors; `check_unmodified` proves it.
    """

    arch: str
    layer_kinds: tuple[str, ...]  # "attention" | "gdn" per layer
    length: int
    batch_size: int
    states: tuple[LayerState, ...]
    _versions: tuple[int, ...] = field(repr=False)

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor the context holds, layer by layer."""
        for pair in self.states:
            yield from pair

    @property
    def nbytes(self) -> int:
        """Bytes held by the context's tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def device(self) -> torch.device:
        return self.states[0][0].device

    def check_unmodified(self) -> None:
        """Raise RuntimeError if anything wrote into the context's tensors since it was encoded."""
        if tuple(t._version for t in self.tensors()) != self._versions:
            raise RuntimeError("frozen context: its tensors were modified in place after encode_context")


def _layer_kinds(parts) -> tuple[str, ...]:
    return tuple("attention" if isinstance(m, AttentionAdapter) else "gdn" for m in parts.mixers)


def check_ids(name: str, ids: torch.Tensor, model: nn.Module, check_range: bool = True) -> torch.Tensor:
    """Validate token ids: integer [B, T] (a 1-D [T] gets B = 1) with T >= 1, on the model's device, in vocab
    (the vocabulary check syncs with the device; callers that batch their checks pass check_range=False)."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"{name} must have shape [batch, tokens] with both >= 1, got {tuple(ids.shape)}")
    device = next(model.parameters()).device
    if ids.device != device:
        raise ValueError(f"{name} is on {ids.device} but the model is on {device}")
    if check_range and bool(out_of_vocab(ids, model).any()):
        raise ValueError(f"{name} has token ids outside [0, {model.get_input_embeddings().num_embeddings})")
    return ids.long()


def out_of_vocab(ids: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Bool tensor: which ids lie outside [0, vocab)."""
    return (ids < 0) | (ids >= model.get_input_embeddings().num_embeddings)


def _own(t: torch.Tensor) -> torch.Tensor:
    if t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


@torch.no_grad()
def encode_context(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, backend: str = "auto"
) -> FrozenContext:
    """Run the context input_ids [Bc, Lc] once without gradients; return its read-only per-layer state.

    attention_mask, if given, must be all ones: padded contexts are not supported (encode each alone).
    backend: where attention and the GDN layers run ('auto' | 'reference' | 'triton', apollo_fast.backend).
    """
    parts = model_parts(model)
    ids = check_ids("input_ids", input_ids, model)
    if attention_mask is not None:
        mask = attention_mask.unsqueeze(0) if attention_mask.dim() == 1 else attention_mask
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(ids.shape)}")
        if not bool((mask == 1).all()):
            raise ValueError("encode_context: padded contexts are not supported; encode each context on its own")
    encode = partial(run_layers, parts, offset=0, states=None, want_states=True, backend=backend)
    _, states = as_forward(model, encode, ids)  # under FSDP2: the root's parameters unsharded around it
    # Own copies: views would keep the whole context's activations alive and share storage.
    states_t = tuple((_own(a), _own(b)) for a, b in states)
    versions = tuple(t._version for pair in states_t for t in pair)
    return FrozenContext(
        arch=parts.arch,
        layer_kinds=_layer_kinds(parts),
        length=ids.shape[1],
        batch_size=ids.shape[0],
        states=states_t,
        _versions=versions,
    )
