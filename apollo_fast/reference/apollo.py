"""The APOLLO and AdamW updates for one tensor, in plain fp32 PyTorch: the specification.

Every fast backend must compute these functions. The math (docs/apollo.md) is APOLLO, arXiv 2412.05270,
as apollo-torch 1.0.3 computes it. Nothing here allocates optimizer state or decides which parameter
gets which rule: that is `apollo_fast.optim`.
"""

from __future__ import annotations

import math

import torch

from .projection import channel_major
from .rounding import compensated_value, store_rounded

__all__ = [
    "adamw_update",
    "apollo_step_size",
    "apollo_update",
    "bias_corrections",
    "limiter_factor",
    "update_moments",
]

NORM_EPS = 1e-8  # the official code's epsilon in the scaling factor and the limiter


def bias_corrections(beta1: float, beta2: float, step: int) -> tuple[float, float]:
    """Adam's bias corrections (1 - b1^t, 1 - b2^t) for step t (1-based)."""
    return 1.0 - beta1**step, 1.0 - beta2**step


def apollo_step_size(lr: float, beta1: float, beta2: float, step: int) -> float:
    """eta_t = lr * sqrt(1 - b2^t) / (1 - b1^t): Adam's bias correction applied to the step size."""
    bc1, bc2 = bias_corrections(beta1, beta2, step)
    return lr * math.sqrt(bc2) / bc1


def update_moments(
    r_proj: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, beta1: float, beta2: float, eps: float
) -> torch.Tensor:
    """M <- b1 M + (1 - b1) R, V <- b2 V + (1 - b2) R^2 in place; returns N = M / (sqrt(V) + eps) (uncorrected)."""
    exp_avg.mul_(beta1).add_(r_proj, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(r_proj, r_proj, value=1.0 - beta2)
    return exp_avg / (exp_avg_sq.sqrt() + eps)


def limiter_factor(norm: torch.Tensor, limiter_norm: torch.Tensor, step: int, gamma: float) -> torch.Tensor | None:
    """The norm-growth limiter: the divisor lam for S (None on step 1, which only records ||S||), and
    limiter_norm <- ||S|| / lam, the post-limit norm the next step compares with."""
    if step == 1:
        limiter_norm.copy_(norm)
        return None
    lam = torch.clamp(norm / (limiter_norm + NORM_EPS), min=gamma) / gamma
    limiter_norm.copy_(norm / lam)
    return lam


@torch.no_grad()
def apollo_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    limiter_norm: torch.Tensor,
    proj: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    alpha: float,
    scale_type: str,
    norm_growth_limit: float | None,
    weight_decay: float,
    maximize: bool = False,
    param_rounding: str = "nearest",
    compensation: torch.Tensor | None = None,
    param_index: int = 0,
    seed: int = 0,
) -> None:
    """One APOLLO step for a matrix, in place.

    param, grad: m x n (any float dtype; math in fp32). proj: P~, r x d, fp32, d = min(m, n).
    exp_avg, exp_avg_sq: C x r fp32 moments, C = max(m, n) channels, updated in place.
    limiter_norm: 0-dim fp32, the limiter's previous ||S||_F, written at every step.
    step: 1-based count including this step (bias correction, and step 1 seeds the limiter).
    param_rounding, compensation (int16, m x n, 'compensated' only), param_index, seed: how the fp32 result is
    stored into a bf16/fp16 param (apollo_fast.reference.rounding).
    """
    g = channel_major(grad).float()
    if maximize:
        g = -g
    r_proj = g @ proj.t()  # C x r

    n_proj = update_moments(r_proj, exp_avg, exp_avg_sq, beta1, beta2, eps)

    if scale_type == "channel":
        s = n_proj.norm(dim=1) / (r_proj.norm(dim=1) + NORM_EPS)  # C
        scaled = g * s[:, None]
    elif scale_type == "tensor":
        s = n_proj.norm() / (r_proj.norm() + NORM_EPS)
        scaled = g * s
    else:
        raise ValueError(f"scale_type must be 'channel' or 'tensor', got {scale_type!r}")

    if norm_growth_limit is not None:
        lam = limiter_factor(scaled.norm(), limiter_norm, step, norm_growth_limit)
        if lam is not None:
            scaled = scaled / lam

    eta = apollo_step_size(lr, beta1, beta2, step)
    new_w = channel_major(compensated_value(param, compensation)) - (eta * alpha) * scaled
    if weight_decay > 0.0:
        # decay after the update, with the plain lr, as apollo-torch: w - (lr wd) w in one rounding (an fma; torch's
        # add with alpha is one), so that a small lr * wd is neither lost nor rounded into a factor near 1
        new_w.add_(new_w, alpha=-(lr * weight_decay))
    if param.shape[0] < param.shape[1]:
        new_w = new_w.t()  # back to the parameter's m x n layout
    store_rounded(param, new_w, param_rounding, compensation, param_index=param_index, seed=seed, step=step)


@torch.no_grad()
def adamw_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
    param_rounding: str = "nearest",
    compensation: torch.Tensor | None = None,
    param_index: int = 0,
    seed: int = 0,
    block: tuple[int, int, int] | None = None,
) -> None:
    """One AdamW step, in place, as torch.optim.AdamW computes it (decay first, eps after sqrt(v_hat)).

    param, grad: any shape and float dtype; exp_avg, exp_avg_sq: fp32, same shape. param_rounding,
    compensation, param_index, seed: as apollo_update; block: where `param` lies in the whole tensor when it is
    a shard (apollo_fast.reference.rounding.store_rounded).
    """
    g = grad.float()
    if maximize:
        g = -g
    w = compensated_value(param, compensation)
    if weight_decay != 0.0:
        w = w * (1.0 - lr * weight_decay)
    exp_avg.lerp_(g, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    bc1, bc2 = bias_corrections(beta1, beta2, step)
    denom = exp_avg_sq.sqrt() / math.sqrt(bc2) + eps
    new_w = w - (lr / bc1) * exp_avg / denom
    store_rounded(
        param, new_w, param_rounding, compensation, param_index=param_index, seed=seed, step=step, block=block
    )
