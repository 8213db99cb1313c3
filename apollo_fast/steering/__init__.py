"""Steering vectors: extract from contrastive pairs, apply during inference, verify, bake into weights.

Public API:
    SteeringVector           per-layer directions + model identity; save/load (safetensors)
    extract_steering_vector  mean difference or PCA of differences at a token position
    steer                    context manager: add coefficient * direction at chosen layers
    capture_hidden           context manager: record decoder-layer outputs
    verify_steering          projection shift and log-prob margin, without vs with steering
    bake_steering            train the un-steered model (APOLLO) to match the steered one (KL)
    ContrastivePair, full_sequence_forward, SegmentForward, VerifyReport, BakeReport
"""

from .bake import BakeReport, SegmentForward, bake_steering, full_sequence_forward, kl_divergence
from .extract import directions_from_differences, extract_steering_vector, hidden_at
from .hooks import capture_hidden, steer
from .layers import decoder_layers
from .pairs import ContrastivePair
from .vector import SteeringVector
from .verify import VerifyReport, continuation_logprobs, verify_steering

__all__ = [
    "SteeringVector",
    "extract_steering_vector",
    "directions_from_differences",
    "hidden_at",
    "steer",
    "capture_hidden",
    "decoder_layers",
    "verify_steering",
    "continuation_logprobs",
    "VerifyReport",
    "bake_steering",
    "BakeReport",
    "SegmentForward",
    "full_sequence_forward",
    "kl_divergence",
    "ContrastivePair",
]
