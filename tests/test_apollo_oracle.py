"""APOLLO(projection='official') against apollo-torch 1.0.3, fp32 on the CPU, step by step.

Tolerance: after every step, ||W_ours - W_official|| / ||W_official - W_0|| <= 1e-5: the error relative to the
weight change, not to the weights (which would hide an update error a hundred times larger). Measured: at most
4e-6 after 25 steps, weight decay on or off (fp32 arithmetic; the two codes order a few products
differently). Cases: tall, wide, square and odd shapes, several matrices (seeds 1, 2, ... by position), both
scale types, APOLLO-Mini, weight decay on (also small: lr * wd = 1e-5) and off, several alpha, rank below and
above the compressed side, and four projection refreshes (T = 3, 12 steps).
"""

import math

import pytest
import torch
from helpers import rel_err
from oracle import official_apollo_class

from apollo_fast import APOLLO

SHAPES = [(12, 5), (5, 12), (8, 8), (13, 7), (1, 9), (9, 1), (31, 17)]
STEPS, GAP = 12, 3
CHANGE_RTOL = 1e-5
WORST = {"rel": 0.0, "cases": 0}


def _assert_change_close(name: str, w0: torch.Tensor, official: torch.Tensor, ours: torch.Tensor) -> float:
    """||ours - official|| / ||official - w0|| <= CHANGE_RTOL; returns that ratio."""
    err = rel_err(official.data - w0, ours.data - w0)
    assert err <= CHANGE_RTOL, f"{name}: error {err:.2e} of the weight change > {CHANGE_RTOL:.0e}"
    return err


def _run_pair(shapes, rank, scale_type, alpha, weight_decay, seed, lr=1e-2, betas=(0.9, 0.999)):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen) for s in shapes]
    ours = [torch.nn.Parameter(w.clone()) for w in init]
    theirs = [torch.nn.Parameter(w.clone()) for w in init]
    opt = APOLLO(
        ours,
        lr=lr,
        rank=rank,
        scale_type=scale_type,
        alpha=alpha,
        update_proj_gap=GAP,
        weight_decay=weight_decay,
        betas=betas,
        projection="official",
    )
    official = official_apollo_class()(
        [
            {
                "params": theirs,
                "rank": rank,
                "proj": "random",
                "scale_type": scale_type,
                "scale": alpha**2,
                "update_proj_gap": GAP,
                "proj_type": "std",
            }
        ],
        lr=lr,
        weight_decay=weight_decay,
        betas=betas,
    )
    worst = 0.0
    for step in range(1, STEPS + 1):
        for a, b in zip(ours, theirs, strict=True):
            g = torch.randn(a.shape, generator=gen) * (1.0 + step)  # growing norms engage the limiter
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        official.step()
        for i, (a, b, w0) in enumerate(zip(ours, theirs, init, strict=True)):
            worst = max(worst, _assert_change_close(f"weight {i} {tuple(a.shape)} after step {step}", w0, b, a))
    WORST["rel"] = max(WORST["rel"], worst)
    WORST["cases"] += 1
    return worst


@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1, 1e-3])
@pytest.mark.parametrize("alpha", [1.0, math.sqrt(2.0), 3.0])
def test_matches_official_all_shapes(scale_type, weight_decay, alpha):
    _run_pair(SHAPES, rank=4, scale_type=scale_type, alpha=alpha, weight_decay=weight_decay, seed=11)


@pytest.mark.parametrize("rank", [1, 6, 40])
def test_matches_official_ranks(rank):
    """rank 6 exceeds some compressed sides, 40 exceeds all: 'official' keeps the rank, as apollo-torch."""
    _run_pair(SHAPES, rank=rank, scale_type="channel", alpha=1.0, weight_decay=0.05, seed=rank)


def test_matches_official_apollo_mini():
    _run_pair(SHAPES, rank=1, scale_type="tensor", alpha=math.sqrt(128.0), weight_decay=0.1, seed=3, lr=1e-3)


def test_matches_official_nondefault_betas():
    _run_pair(SHAPES[:3], rank=3, scale_type="channel", alpha=2.0, weight_decay=0.01, seed=5, betas=(0.8, 0.95))


def test_official_projection_state_is_loadable_and_matches(tmp_path):
    """Save mid-run with torch.save, reload with weights_only=True, continue: still matches the oracle."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(10, 6), (6, 10)]
    init = [torch.randn(s, generator=gen) for s in shapes]
    ours = [torch.nn.Parameter(w.clone()) for w in init]
    theirs = [torch.nn.Parameter(w.clone()) for w in init]
    kw = dict(lr=1e-2, rank=3, update_proj_gap=2, projection="official", weight_decay=0.1)
    opt = APOLLO(ours, **kw)
    official = official_apollo_class()(
        [
            {
                "params": theirs,
                "rank": 3,
                "proj": "random",
                "scale_type": "channel",
                "scale": 1.0,
                "update_proj_gap": 2,
                "proj_type": "std",
            }
        ],
        lr=1e-2,
        weight_decay=0.1,
    )
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(7)]
    for step, gs in enumerate(grads):
        if step == 3:
            torch.save(opt.state_dict(), tmp_path / "opt.pt")
            opt = APOLLO(ours, **kw)
            opt.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
        for a, b, g in zip(ours, theirs, gs, strict=True):
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        official.step()
        for i, (a, b, w0) in enumerate(zip(ours, theirs, init, strict=True)):
            _assert_change_close(f"weight {i} after step {step + 1}", w0, b, a)
