"""What a push carries, shared by the trainer side and the vLLM worker: tensors by checkpoint name.

Names are the model's Hugging Face checkpoint names (`model.layers.3.mlp.up_proj.weight`), which is
what vLLM's `load_weights` takes. vLLM fuses some checkpoint tensors into one kernel tensor
(q/k/v into `qkv_proj`, gate/up into `gate_up_proj`, all experts of a layer into one MoE tensor) and
reloads a kernel tensor only from all of its parts, so a partial push sends whole *groups*: every
tensor of a decoder layer's sub-block (`model.layers.3.self_attn`, `model.layers.3.mlp`, ...), or
a whole top-level module. vLLM's fusions never cross these groups.

`tensor_digest` tells which tensors changed since the last push without keeping a copy of them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

__all__ = ["group_of", "incomplete_groups", "tensor_digest", "digests", "nbytes"]

_LAYER_BLOCK = re.compile(r"^(.*?\.(?:layers|h|blocks)\.\d+\.[^.]+)\.")
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed 64-bit integer
_CHUNK = 1 << 22


def group_of(name: str) -> str:
    """The push group of a checkpoint name: its decoder layer's sub-block, else its module."""
    m = _LAYER_BLOCK.match(name)
    if m:
        return m.group(1)
    return name.rpartition(".")[0] or name


def incomplete_groups(names: Iterable[str], all_names: Iterable[str]) -> dict[str, list[str]]:
    """Groups that `names` touch but do not cover, with the members missing from `names`."""
    names = set(names)
    touched = {group_of(n) for n in names}
    missing: dict[str, list[str]] = {}
    for n in all_names:
        g = group_of(n)
        if g in touched and n not in names:
            missing.setdefault(g, []).append(n)
    return missing


@torch.no_grad()
def tensor_digest(t: torch.Tensor) -> torch.Tensor:
    """A 64-bit, position-dependent digest of a tensor's bits (0-dim int64 tensor on its device).

    sum_i bits_i * w_i (mod 2**64) with odd pseudo-random weights w_i: any single changed element
    changes it, and unlike a plain or xor sum, equal updates of equal elements (Adam's first
    steps on norm weights) do not cancel. Chunked, so temporaries stay small.
    """
    flat = t.detach().reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    ints = flat.view(_INT_OF_SIZE[flat.element_size()]) if flat.dtype != torch.bool else flat.to(torch.uint8)
    total = torch.zeros((), dtype=torch.int64, device=flat.device)
    for start in range(0, ints.numel(), _CHUNK):
        x = ints[start : start + _CHUNK].to(torch.int64)
        w = torch.arange(start, start + x.numel(), dtype=torch.int64, device=flat.device)
        w = (w * _GOLDEN + 0x5BD1E995) | 1  # int64 arithmetic wraps: a cheap multiplicative hash
        total += (x * w).sum()
    return total + ints.numel()


def digests(tensors: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """tensor_digest of each tensor, fetched to the host in one transfer per device."""
    by_device: dict[torch.device, list[str]] = {}
    for name, t in tensors.items():
        by_device.setdefault(t.device, []).append(name)
    out: dict[str, int] = {}
    for names in by_device.values():
        out.update(zip(names, torch.stack([tensor_digest(tensors[n]) for n in names]).tolist(), strict=True))
    return out


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
