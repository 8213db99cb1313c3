"""The general-data stream: exact shares (by items and by tokens), determinism, resumability."""

from __future__ import annotations

import io
import random
from fractions import Fraction

import pytest
import torch

from apollo_fast.training.mixing import BEHAVIOUR, GENERAL, MixedStream, parse_fraction


def sizes(n: int, seed: int, lo: int = 1, hi: int = 50) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(lo, hi) for _ in range(n)]


@pytest.mark.parametrize("fraction", ["0.25", "1/3", "0.1", "0.7", "0.999", "5/7"])
def test_examples_share_is_exact_after_every_prefix(fraction):
    f = Fraction(fraction)
    stream = MixedStream(sizes(13, 0), sizes(5, 1), fraction=fraction, seed=3)
    general = 0
    for n in range(1, 2001):
        source, _ = next(stream)
        general += source == GENERAL
        # floor(f*n + 1/2): f*n rounded half up, never more than half an item from f*n
        assert general == (2 * f.numerator * n + f.denominator) // (2 * f.denominator), (fraction, n, general)
        assert abs(general - f * n) <= Fraction(1, 2)


@pytest.mark.parametrize("fraction", ["0.25", "1/3", "0.6"])
def test_tokens_share_is_within_one_item_after_every_prefix(fraction):
    f = Fraction(fraction)
    b_sizes, g_sizes = sizes(17, 2, 1, 40), sizes(7, 3, 5, 300)
    bound = max(f * max(b_sizes), (1 - f) * max(g_sizes))
    stream = MixedStream(b_sizes, g_sizes, fraction=fraction, mix_by="tokens", seed=5)
    tok = {BEHAVIOUR: 0, GENERAL: 0}
    for n in range(1, 3001):
        source, index = next(stream)
        tok[source] += (b_sizes if source == BEHAVIOUR else g_sizes)[index]
        total = tok[BEHAVIOUR] + tok[GENERAL]
        assert abs(tok[GENERAL] - f * total) <= bound, (fraction, n, tok)
    assert abs(tok[GENERAL] / total - float(f)) < float(bound) / total + 1e-12
    assert stream.tokens == tok


def test_each_pool_is_a_fresh_permutation_per_epoch():
    stream = MixedStream(sizes(10, 0), sizes(4, 1), fraction="1/2", seed=11)
    seen = {BEHAVIOUR: [], GENERAL: []}
    for source, index in stream.take(80):
        seen[source].append(index)
    b = seen[BEHAVIOUR]
    epochs = [b[i : i + 10] for i in range(0, 40, 10)]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1, "every epoch drew the same order"
    g = seen[GENERAL]
    assert all(sorted(g[i : i + 4]) == list(range(4)) for i in range(0, 40, 4))


@pytest.mark.parametrize("mix_by", ["examples", "tokens"])
def test_seeded_stream_is_deterministic(mix_by):
    make = lambda seed: MixedStream(sizes(9, 0), sizes(6, 1), fraction="0.3", mix_by=mix_by, seed=seed)
    a, b, c = make(7).take(300), make(7).take(300), make(8).take(300)
    assert a == b
    assert a != c
    if mix_by == "examples":  # the schedule does not depend on the seed, only the order inside each pool
        assert [s for s, _ in a] == [s for s, _ in c]


@pytest.mark.parametrize("mix_by", ["examples", "tokens"])
def test_resume_continues_the_identical_stream(mix_by):
    make = lambda: MixedStream(sizes(9, 0), sizes(6, 1), fraction="2/7", mix_by=mix_by, seed=4)
    whole = make().take(250)
    first = make()
    head = first.take(97)
    buf = io.BytesIO()
    torch.save({"stream": first.state_dict()}, buf)  # what a checkpoint does
    buf.seek(0)
    state = torch.load(buf, weights_only=True)["stream"]
    resumed = make()
    resumed.load_state_dict(state)
    assert head + resumed.take(153) == whole


def test_resume_refuses_a_different_stream():
    stream = MixedStream([3, 4], [5], fraction="0.25", seed=1)
    stream.take(5)
    state = stream.state_dict()
    for other in (
        MixedStream([3, 4], [5], fraction="0.25", seed=2),
        MixedStream([3, 4], [5], fraction="0.5", seed=1),
        MixedStream([3, 4], [5], fraction="0.25", mix_by="tokens", seed=1),
        MixedStream([3, 4, 1], [5], fraction="0.25", seed=1),
    ):
        with pytest.raises(ValueError, match="data stream differs"):
            other.load_state_dict(state)


def test_items_for_epochs_does_not_move_the_stream():
    make = lambda: MixedStream([1] * 10, [1] * 3, fraction="1/4", seed=0)
    stream = make()
    head = stream.take(3)
    # 2 epochs = 20 behaviour items; after N items round(N/4) are general: N = 27 gives 27 - 7 = 20
    assert stream.items_for_behaviour_epochs(2) == 27
    assert stream.items_for_behaviour_epochs(0.35) == 5  # ceil(3.5) = 4 behaviour items: 4 + round(5/4)
    assert stream.items == 3 and head + stream.take(5) == make().take(8)


def test_no_general_data_means_behaviour_only():
    assert all(s == BEHAVIOUR for s, _ in MixedStream([2, 3, 4], seed=0).take(20))


def test_bad_arguments():
    for bad in ("1", "1.5", "-0.1", "abc", "1/0"):
        with pytest.raises(ValueError, match="general fraction"):
            parse_fraction(bad)
    assert parse_fraction("0.1") == Fraction(1, 10) and parse_fraction(0.1) == Fraction(1, 10)
    with pytest.raises(ValueError, match="needs general data"):
        MixedStream([1], [], fraction="0.5")
    with pytest.raises(ValueError, match="general fraction of 0"):
        MixedStream([1], [1], fraction="0")
    with pytest.raises(ValueError, match="mix_by"):
        MixedStream([1], [1], fraction="0.5", mix_by="bytes")
    with pytest.raises(ValueError, match="behaviour pool is empty"):
        MixedStream([], [1], fraction="0.5")
    with pytest.raises(ValueError, match="at least one trained token"):
        MixedStream([1, 0], [1], fraction="0.5")
