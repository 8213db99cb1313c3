"""The probes' statistics: bootstrap intervals, the verdict rule, AUC, and the scoring paths' agreement."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from frozen_models import build

from apollo_fast.probe.inputs import Pair
from apollo_fast.probe.scoring import item_nll, pair_logprobs
from apollo_fast.probe.stats import (
    NONE,
    POSITIVE,
    UNCLEAR,
    Interval,
    auc,
    bootstrap,
    paired_auc_bootstrap,
    two_way_bootstrap,
    verdict,
)


def test_verdict_separates_no_effect_from_not_enough_data():
    assert verdict(Interval(0.5, 0.2, 0.8, 0.95), 0.1) == POSITIVE
    assert verdict(Interval(-0.5, -0.8, -0.2, 0.95), 0.1) == "negative"
    assert verdict(Interval(0.01, -0.05, 0.08, 0.95), 0.1) == NONE  # inside +-delta: no effect
    assert verdict(Interval(0.01, -0.3, 0.4, 0.95), 0.1) == UNCLEAR  # holds 0 but reaches beyond delta
    assert verdict(Interval(0.03, 0.01, 0.05, 0.95), 0.1) == NONE  # excludes 0 but smaller than delta
    assert verdict(Interval(0.3, 0.05, 0.6, 0.95), 0.1) == POSITIVE
    assert verdict(Interval(0.5, 0.47, 0.54, 0.95), 0.05, null=0.5) == NONE
    assert verdict(Interval(0.0, float("nan"), float("nan"), 0.95), 0.1) == UNCLEAR


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    widths = []
    for n in (20, 320):
        x = rng.normal(1.0, 1.0, n)
        ci = bootstrap(x, lambda v: v.mean(-1), seed=0)
        assert ci.lo < x.mean() < ci.hi
        se = x.std(ddof=1) / math.sqrt(n)
        assert ci.hi - ci.lo == pytest.approx(2 * 1.96 * se, rel=0.25)
        widths.append(ci.hi - ci.lo)
    assert widths[1] < widths[0] / 3
    # fixed seed: reproducible
    assert bootstrap(x, lambda v: v.mean(-1), seed=3) == bootstrap(x, lambda v: v.mean(-1), seed=3)


def test_two_way_bootstrap_carries_seed_variance():
    rng = np.random.default_rng(1)
    items = rng.normal(0, 0.1, 50)
    tight = items[None] + np.array([[0.0], [0.0], [0.0], [0.0]])  # seeds agree
    loose = items[None] + np.array([[-1.0], [1.0], [-1.0], [1.0]])  # seeds disagree by +-1
    a, b = two_way_bootstrap(tight), two_way_bootstrap(loose)
    assert a.value == pytest.approx(b.value)
    assert (b.hi - b.lo) > 10 * (a.hi - a.lo)
    one = two_way_bootstrap(items[None])  # one seed: items only
    assert one.lo < items.mean() < one.hi
    # per-item weights are resampled with their items: ratio of sums
    w = rng.integers(1, 20, 50).astype(float)
    r = two_way_bootstrap(items[None] * w, weights=w, stat=lambda sub, ww: sub.sum(-1).mean(-1) / ww.sum(-1))
    assert r.value == pytest.approx((items * w).sum() / w.sum())


def test_auc_matches_brute_force_with_ties():
    pos, neg = np.array([0.1, 0.5, 0.5, 0.9]), np.array([0.5, 0.2, 0.95])
    brute = np.mean([1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg])
    assert auc(pos, neg) == pytest.approx(brute)
    ci = paired_auc_bootstrap(np.arange(30.0), np.arange(30.0) - 100)
    assert ci.value == 1.0 and ci.lo == 1.0


@pytest.mark.parametrize("arch", ["llama", "qwen3_5"])
def test_frozen_and_full_forward_scoring_agree(arch):
    """Long prompts take the frozen-context path, short ones batched full forwards: same log-probs."""
    model = build(arch)
    g = torch.Generator().manual_seed(0)
    pairs = [
        Pair(
            torch.randint(0, 97, (int(n),), generator=g).tolist(),
            torch.randint(0, 97, (2,), generator=g).tolist(),
            torch.randint(0, 97, (3,), generator=g).tolist(),
        )
        for n in (1, 5, 9, 17)
    ]
    pairs = [p for p in pairs if p.desired[0] != p.undesired[0]]
    full = pair_logprobs(model, pairs, frozen_from=10**9)
    frozen = pair_logprobs(model, pairs, frozen_from=2)  # every prompt of >= 2 tokens on the frozen path
    np.testing.assert_allclose(frozen.desired, full.desired, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(frozen.undesired, full.undesired, rtol=1e-4, atol=1e-4)
    # a pair's desired NLL is the same number item_nll gives for it
    nll, tokens = item_nll(model, pairs)
    np.testing.assert_allclose(nll, -full.desired, rtol=1e-4, atol=1e-4)
    assert tokens.tolist() == [len(p.desired) for p in pairs]


def test_behaviour_item_nll_matches_a_full_forward():
    from apollo_fast.training.data import BehaviourExample, GeneralItem, Segment

    model = build("qwen3_5")
    ctx = torch.randint(0, 97, (12,))
    segs = (
        Segment(torch.tensor([5, 6, 7, 8]), torch.tensor([-100, -100, 7, 8]), 2),
        Segment(torch.tensor([9, 10, 11]), torch.tensor([-100, 10, 11]), 2),
    )
    (nll, _), (count, _) = (x.tolist() for x in item_nll(model, [BehaviourExample(1, ctx, segs), GeneralItem(2, ctx)]))
    expect = 0.0
    with torch.no_grad():
        for s in segs:
            ids = torch.cat([ctx, s.input_ids])[None]
            lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            targets = torch.cat([torch.full((12,), -100), s.labels])[1:]
            expect -= sum(lp[t, int(y)].item() for t, y in enumerate(targets.tolist()) if y != -100)
    assert nll == pytest.approx(expect, rel=1e-4)
    assert count == 4
