"""The GDN layer's causal conv continued from a frozen context's last inputs: what the frozen-context step adds to
apollo_fast.gdn (the gates and the delta rule live there)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["causal_conv_with_prefix"]


def causal_conv_with_prefix(
    x: torch.Tensor, prefix: torch.Tensor | None, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv + SiLU of x [B, T, C] after a frozen prefix [B|1, K-1, C] of earlier inputs.

    weight [C, K]. Returns (out [B, T, C], new prefix [B, K-1, C] = the last K-1 inputs). A None prefix is zeros
    (the start of a sequence). The prefix is only read.
    """
    bsz, t, c = x.shape
    k = weight.shape[1]
    x = x.to(weight.dtype)
    if prefix is None:
        prefix = x.new_zeros(1, k - 1, c)
    full = torch.cat((prefix.to(x.dtype).expand(bsz, -1, -1), x), dim=1)  # [B, K-1+T, C]
    out = F.conv1d(full.transpose(1, 2), weight.unsqueeze(1), groups=c).transpose(1, 2)
    return F.silu(out), full[:, full.shape[1] - (k - 1) :]
