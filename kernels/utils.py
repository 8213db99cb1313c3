"""What every launcher shares: how it allocates the buffers its kernels write."""

from __future__ import annotations

import torch

__all__ = ["empty"]


def empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A buffer a kernel fills. Launchers call it as `utils.empty`, so tests can swap in a NaN fill and any
    element a kernel leaves unwritten fails the comparison."""
    return torch.empty(*shape, dtype=dtype, device=device)
