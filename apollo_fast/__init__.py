"""apollo_fast: fused kernels for behavioural fine-tuning of hybrid GDN/attention models.

Public API:
    APOLLO                 the optimizer (APOLLO for matrices, AdamW for the rest); APOLLO.mini
    apollo_param_groups    param groups from a model (which matrices get APOLLO)
    NonFiniteGradientError raised by APOLLO on inf/NaN gradients (nonfinite='raise')
    encode_context, segment_loss, FrozenContextTrainer   frozen-context training (apollo_fast.frozen)
"""

from .frozen import FrozenContext, FrozenContextTrainer, encode_context, segment_loss
from .optim import APOLLO, NonFiniteGradientError
from .param_groups import apollo_param_groups

__version__ = "0.1.0"

__all__ = ["APOLLO", "NonFiniteGradientError", "apollo_param_groups", "__version__"]
__all__ += ["FrozenContext", "FrozenContextTrainer", "encode_context", "segment_loss"]
