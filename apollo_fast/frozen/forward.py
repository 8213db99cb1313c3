"""The layer-by-layer forward of a token block after an optional frozen context (shared by encode and segment).

The context's tensors are only read: attention reads the frozen keys/values in place before the block's
own (apollo_fast.frozen.attention), GDN layers start their causal conv from the frozen prefix and the delta
rule from the frozen state. So the block is differentiable w.r.t. the model's parameters and never w.r.t. the context.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from ..gdn import gate, segment_delta_rule
from .adapters import AttentionAdapter, GDNAdapter, ModelParts, rotary_cos_sin
from .attention import attend_after_context
from .conv import causal_conv_with_prefix

__all__ = ["run_layers", "as_forward"]

LayerState = tuple[torch.Tensor, torch.Tensor]  # attention: (k, v); GDN: (conv prefix, recurrent state)


def _attention_mixer(
    mixer: AttentionAdapter,
    x: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    state: LayerState | None,
    backend: str,
) -> tuple[torch.Tensor, LayerState]:
    q, k, v, out_gate = mixer.project(x, *rope)
    ctx_k, ctx_v = state if state is not None else (None, None)
    module = mixer.module
    dropout = float(getattr(module, "attention_dropout", 0.0)) if module.training else 0.0
    o = attend_after_context(q, k, v, ctx_k, ctx_v, mixer.scaling, dropout, backend=backend)
    return mixer.output(o, out_gate), (k, v)


def _gdn_mixer(
    mixer: GDNAdapter, x: torch.Tensor, state: LayerState | None, want_state: bool, backend: str
) -> tuple[torch.Tensor, LayerState | None]:
    qkv, z, b, a = mixer.project(x)
    conv_prefix, recurrent = state if state is not None else (None, None)
    conv_out, new_prefix = causal_conv_with_prefix(qkv, conv_prefix, mixer.conv_weight)
    q, k, v = mixer.split_heads(conv_out)
    g, beta = gate(a, b, mixer.module.A_log, mixer.module.dt_bias, backend=backend)
    o, new_recurrent = segment_delta_rule(q, k, v, g, beta, recurrent, output_final_state=want_state, backend=backend)
    out = mixer.output(o, z)
    return out, ((new_prefix, new_recurrent) if want_state else None)


def _layer(
    layer: torch.nn.Module,
    mixer: AttentionAdapter | GDNAdapter,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
    state: LayerState | None,
    want_state: bool,
    backend: str,
    h: torch.Tensor,
) -> tuple[torch.Tensor, LayerState | None]:
    """One decoder layer (pre-norm residual mixer, then pre-norm residual MLP/MoE) on h [B, T, d]."""
    x = layer.input_layernorm(h)
    if isinstance(mixer, AttentionAdapter):
        mixed, new_state = _attention_mixer(mixer, x, rope, state, backend)
    else:
        mixed, new_state = _gdn_mixer(mixer, x, state, want_state, backend)
    h = h + mixed
    y = layer.mlp(layer.post_attention_layernorm(h))
    if isinstance(y, tuple):  # MoE blocks may return (hidden, router_logits)
        y = y[0]
    return h + y, (new_state if want_state else None)


def _layer_hidden_only(layer, mixer, rope, state, backend, h: torch.Tensor) -> torch.Tensor:
    return as_forward(layer, partial(_layer, layer, mixer, rope, state, False, backend), h)[0]


_FORWARD_METHOD = "_apollo_fast_forward"


@functools.cache
def _fsdp() -> tuple[type, Callable] | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

    return FSDPModule, register_fsdp_forward_method


def _call(self: torch.nn.Module, fn: Callable, *args: Any) -> Any:
    return fn(*args)


def as_forward(module: torch.nn.Module, fn: Callable, *args: Any) -> Any:
    """fn(*args) run as a forward of `module`. For a module sharded by FSDP2 (fully_shard) its parameters are
    all-gathered before and resharded after, and its gradients reduce-scattered in backward, exactly as around
    module(...); for any other module it is fn(*args).

    The frozen forward drives a layer's sub-modules and parameters directly (never the layer's forward), which
    FSDP's forward hooks would not see. Tensor arguments that need gradients go in `args` (not in fn's closure):
    FSDP hooks them to reduce-scatter the module's gradients as soon as its backward is done.
    """
    fsdp = _fsdp()
    if fsdp is None or not isinstance(module, fsdp[0]):
        return fn(*args)
    method = module.__dict__.get(_FORWARD_METHOD)
    if method is None:  # once per module: FSDP's public way to treat a method as a forward
        object.__setattr__(module, _FORWARD_METHOD, _call.__get__(module))
        fsdp[1](module, _FORWARD_METHOD)
        method = module.__dict__[_FORWARD_METHOD]
    return method(fn, *args)


def run_layers(
    parts: ModelParts,
    input_ids: torch.Tensor,
    offset: int,
    states: tuple[LayerState | None, ...] | None,
    *,
    want_states: bool,
    gradient_checkpointing: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, list[LayerState] | None]:
    """input_ids [B, T] at positions offset.. -> last hidden state [B, T, d] (before the final norm), new states.

    states: per layer, the frozen context's (k, v) or (conv prefix, recurrent state), or None (no context).
    Gradient checkpointing recomputes each layer in backward; that is safe because the states are read-only.
    A layer sharded by FSDP2 is unsharded around its part (`as_forward`); the caller runs this under the root's.
    backend: where attention and the GDN gate / delta rule run ('auto' | 'reference' | 'triton').
    """
    h = parts.embed(input_ids)
    rope = None
    if parts.rotary is not None and any(isinstance(m, AttentionAdapter) for m in parts.mixers):
        pos = torch.arange(offset, offset + input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        rope = rotary_cos_sin(parts.rotary, h, pos)
    new_states: list[Any] | None = [] if want_states else None
    for i, (layer, mixer) in enumerate(zip(parts.layers, parts.mixers, strict=True)):
        state = None if states is None else states[i]
        if gradient_checkpointing and not want_states and torch.is_grad_enabled():
            fn = partial(_layer_hidden_only, layer, mixer, rope, state, backend)
            h = checkpoint(fn, h, use_reentrant=False)
            continue
        h, new_state = as_forward(layer, partial(_layer, layer, mixer, rope, state, want_states, backend), h)
        if new_states is not None:
            new_states.append(new_state)
    return h, new_states
