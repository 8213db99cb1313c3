"""The gate fused in front of the delta rule, as a composition of the two operations (two launches)."""

from __future__ import annotations

import torch

from .delta_rule import segment_delta_rule
from .gate import gate

__all__ = ["gated_segment_delta_rule"]


def gated_segment_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Raw gate inputs a, b [B, T, Hv] with A_log, dt_bias [Hv]: gate() then segment_delta_rule(); kwargs as
    segment_delta_rule (scale, use_qk_l2norm, output_final_state, cu_seqlens, backend)."""
    g, beta = gate(a, b, A_log, dt_bias, backend=kwargs.get("backend", "auto"))
    return segment_delta_rule(q, k, v, g, beta, initial_state, **kwargs)
