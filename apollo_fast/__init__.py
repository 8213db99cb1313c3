"""apollo_fast: fused kernels for behavioural fine-tuning of hybrid GDN/attention models.

Public API:
    APOLLO                 the optimizer (APOLLO for matrices, AdamW for the rest); APOLLO.mini
    apollo_param_groups    param groups from a model (which matrices get APOLLO)
    NonFiniteGradientError raised by APOLLO on inf/NaN gradients (nonfinite='raise')
"""

from .optim import APOLLO, NonFiniteGradientError
from .param_groups import apollo_param_groups

__version__ = "0.1.0"

__all__ = ["APOLLO", "NonFiniteGradientError", "apollo_param_groups", "__version__"]
