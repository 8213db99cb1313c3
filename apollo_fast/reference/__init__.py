"""The specification: plain fp32 PyTorch, readable, never imports triton. Public."""

from .apollo import adamw_update, apollo_step_size, apollo_update
from .philox import philox_normal, philox_projection
from .projection import channel_major, effective_rank, official_next_seed, official_projection

__all__ = [
    "adamw_update",
    "apollo_step_size",
    "apollo_update",
    "channel_major",
    "effective_rank",
    "official_next_seed",
    "official_projection",
    "philox_normal",
    "philox_projection",
]
