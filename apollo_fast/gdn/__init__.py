"""Gated DeltaNet kernels: the gates with exact parameter gradients, and the delta rule over segments
that start from a frozen state.

    gate(a, b, A_log, dt_bias) -> (g, beta)
    segment_delta_rule(q, k, v, g, beta, initial_state=None, ...) -> (o, final_state)
    gated_segment_delta_rule(q, k, v, a, b, A_log, dt_bias, initial_state=None, ...) -> (o, final_state)
The reference (the spec, plain PyTorch; backend='reference'): apollo_fast.gdn.naive (gate_ref,
segment_delta_rule_ref, chunk_delta_rule_ref); the kernels: apollo_fast.kernels.gdn_* (backend='triton').
"""

from .delta_rule import segment_delta_rule
from .gate import gate
from .gated import gated_segment_delta_rule

__all__ = ["gate", "gated_segment_delta_rule", "segment_delta_rule"]
