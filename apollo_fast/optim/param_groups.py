"""Which parameters of a model get APOLLO: param groups built from module types and name patterns."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["apollo_param_groups"]


def _linear_types() -> tuple[type, ...]:
    types: list[type] = [nn.Linear]
    try:  # GPT-2 style transposed linear layers
        from transformers.pytorch_utils import Conv1D

        types.append(Conv1D)
    except ImportError:
        pass
    return tuple(types)


def _compile(patterns: str | Iterable[str] | None) -> list[re.Pattern[str]]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    return [re.compile(p) for p in patterns]


def apollo_param_groups(
    model: nn.Module,
    *,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    embeddings: bool = False,
    lm_head: bool = False,
    **apollo_options: Any,
) -> list[dict[str, Any]]:
    """Param groups for `APOLLO`: matrices chosen below get APOLLO, the rest AdamW.

    By default every `nn.Linear` weight (and transformers' Conv1D) gets APOLLO except the output
    head (`lm_head`, or whatever `model.get_output_embeddings()` returns); embeddings, biases,
    norms and convolutions get AdamW. `include` / `exclude` are regular expressions searched in
    the parameter's name; `include` adds 2-D parameters, `exclude` removes them (it wins).
    `apollo_options` (rank, alpha, ...) go into the APOLLO group. Frozen parameters are left out.
    Returns groups of (name, parameter) pairs, so optimizer errors can name the parameter.
    """
    inc, exc = _compile(include), _compile(exclude)
    chosen: set[int] = set()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for mod_name, module in model.named_modules():
        is_head = module is head or mod_name.split(".")[-1] == "lm_head"
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            continue
        if isinstance(module, _linear_types()) and (lm_head or not is_head):
            chosen.add(id(weight))
        elif isinstance(module, nn.Embedding) and embeddings:
            chosen.add(id(weight))
        elif is_head and lm_head:
            chosen.add(id(weight))

    apollo, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        take = id(p) in chosen or (p.dim() == 2 and any(r.search(name) for r in inc))
        if take and any(r.search(name) for r in exc):
            take = False
        (apollo if take else rest).append((name, p))
    groups: list[dict[str, Any]] = []
    if apollo:
        groups.append({"params": apollo, **apollo_options})
    if rest:
        groups.append({"params": rest, "apollo": False})
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return groups
