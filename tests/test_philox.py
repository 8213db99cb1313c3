"""The counter-based generator behind the default projection: known answers and statistics."""

import math

import pytest
import torch

from apollo_fast.reference.philox import philox4x32, philox_normal, philox_projection, projection_key


def _words(*vals):
    return [hex(int(v)) for v in vals]


@pytest.mark.parametrize(
    "counter, key, expect",
    [  # Random123's known-answer tests for Philox4x32-10
        ((0, 0, 0, 0), 0, ("0x6627e8d5", "0xe169c58d", "0xbc57ac4c", "0x9b00dbd8")),
        ((0xFFFFFFFF,) * 4, 0xFFFFFFFFFFFFFFFF, ("0x408f276d", "0x41c83b0e", "0xa20bc7c6", "0x6d5451fd")),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0x299F31D0 << 32) | 0xA4093822,
            ("0xd16cfe09", "0x94fdcceb", "0x5001e420", "0x24126ea1"),
        ),
    ],
)
def test_philox_known_answers(counter, key, expect):
    out = philox4x32(torch.tensor([counter[0]]), *counter[1:], key)
    assert tuple(_words(*(w[0] for w in out))) == expect


def test_normals_are_standard():
    z = philox_normal(torch.arange(200_000), key=12345)
    assert abs(z.mean().item()) < 0.01
    assert abs(z.var().item() - 1.0) < 0.01
    assert abs((z**3).mean().item()) < 0.03, "skewed"
    assert abs((z**4).mean().item() - 3.0) < 0.06, "wrong kurtosis"
    assert torch.isfinite(z).all()


def test_projection_layout_and_keys():
    p = philox_projection(4, 6, param_index=2, seed=7, refresh=3)
    assert p.shape == (4, 6) and p.dtype == torch.float32
    counter = torch.arange(24).view(4, 6)
    expect = philox_normal(counter, projection_key(2, 7), counter_hi=3) / math.sqrt(4)
    assert torch.equal(p, expect)
    others = [philox_projection(4, 6, 3, 7, 3), philox_projection(4, 6, 2, 8, 3), philox_projection(4, 6, 2, 7, 4)]
    for q in others:
        assert (p - q).abs().max() > 0.1, "index, seed and refresh must each change P"
    assert abs(philox_projection(64, 512, 0, 0, 0).var().item() * 64 - 1.0) < 0.02, "variance must be 1/r"


def test_projection_key_range():
    with pytest.raises(ValueError):
        projection_key(2**32, 0)
