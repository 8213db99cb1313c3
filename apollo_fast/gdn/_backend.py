"""Backend choice shared by the GDN operations: CPU tensors never reach Triton unless TRITON_INTERPRET=1."""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "reference", "triton")


def triton_usable(device: torch.device) -> bool:
    """Triton runs on CUDA devices, and on the CPU only under the interpreter (TRITON_INTERPRET=1)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' -> 'triton' where usable else 'reference'; an explicit 'triton' that cannot run raises."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return backend
    usable = triton_usable(device)
    if backend == "triton" and not usable:
        raise ValueError(
            f"backend='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors); got device {device}"
        )
    return "triton" if usable else "reference"
