"""End to end: a tiny random causal LM learns a synthetic task with APOLLO and APOLLO-Mini."""

import pytest
import torch

from apollo_fast import APOLLO, apollo_param_groups
from apollo_fast.toy import PermutationTask, tiny_causal_lm

STEPS = 40
FACTOR = 10.0  # loss must fall at least this much: ln(64) = 4.16 -> below 0.42


@pytest.mark.parametrize("arch", ["llama", "qwen3_5"])
@pytest.mark.parametrize("make", ["apollo", "mini"])
def test_loss_falls(arch, make):
    torch.manual_seed(0)
    model = tiny_causal_lm(vocab=64, hidden=32, layers=2, heads=4, arch=arch)
    groups = apollo_param_groups(model)
    opt = APOLLO(groups, lr=1e-2, rank=8) if make == "apollo" else APOLLO.mini(groups, lr=1e-2)
    task = PermutationTask(vocab=64, seq_len=24, seed=1)
    losses = []
    for _ in range(STEPS):
        x = task.batch(16)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    first, last = losses[0], sum(losses[-5:]) / 5
    assert first > 3.5, f"untrained loss {first:.3f} should be near ln(64)"
    assert last < first / FACTOR, f"{make} on {arch}: loss {first:.3f} -> {last:.3f}, not {FACTOR}x lower"
