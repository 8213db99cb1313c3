"""Where the residual stream is: a transformers model's decoder layers and their width."""

from __future__ import annotations

from torch import nn

__all__ = ["decoder_layers", "hidden_size"]


def _text_config(model: nn.Module):
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise TypeError(f"{type(model).__name__} has no .config: pass a transformers model")
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers (model.model.layers, transformer.h, ...)."""
    for path in ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers", "layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj):
            return obj
    n = getattr(_text_config(model), "num_hidden_layers", None)
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) == n:
            return m
    raise TypeError(f"cannot find the decoder layers of {type(model).__name__}")


def hidden_size(model: nn.Module) -> int:
    """The width of the residual stream."""
    h = getattr(_text_config(model), "hidden_size", None)
    if h is None:
        raise TypeError(f"{type(model).__name__}: config has no hidden_size")
    return int(h)
