"""APOLLO, the optimizer: the class (apollo.py), its functional steps on the tensor lists of lists.py
(functional.py: the reference backend; fused.py: the Triton backend's launches), the step on FSDP2 shards
(placement.py: where a shard lies; sharded.py: the collectives), which parameters get it (param_groups.py),
and stepping it during the backward, one layer at a time (in_backward.py).

The specification it computes is apollo_fast.reference.apollo; its kernels are apollo_fast.kernels.apollo_*.
"""

from .apollo import APOLLO, NonFiniteGradientError
from .in_backward import step_in_backward
from .param_groups import apollo_param_groups

__all__ = ["APOLLO", "NonFiniteGradientError", "apollo_param_groups", "step_in_backward"]
