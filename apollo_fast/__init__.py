"""apollo_fast: fused kernels for behavioural fine-tuning of hybrid GDN/attention models.

Public API:
    APOLLO                 the optimizer (APOLLO for matrices, AdamW for the rest); APOLLO.mini
    apollo_param_groups    param groups from a model (which matrices get APOLLO)
    NonFiniteGradientError raised by APOLLO on inf/NaN gradients (nonfinite='raise')
    step_in_backward       APOLLO updates each layer during the backward, as its gradient completes
    encode_context, segment_loss, FrozenContextTrainer, FrozenContext
                           frozen-context training (apollo_fast.frozen)
Subpackages: apollo_fast.gdn (GDN kernels), apollo_fast.vectors (task vectors),
apollo_fast.steering (steering vectors), apollo_fast.reference (the fp32 specification).
"""

from .frozen import FrozenContext, FrozenContextTrainer, encode_context, segment_loss
from .optim import APOLLO, NonFiniteGradientError, apollo_param_groups, step_in_backward

__version__ = "0.1.0"

__all__ = [
    "APOLLO",
    "FrozenContext",
    "FrozenContextTrainer",
    "NonFiniteGradientError",
    "apollo_param_groups",
    "encode_context",
    "segment_loss",
    "step_in_backward",
    "__version__",
]
