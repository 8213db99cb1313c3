"""End to end: a tiny model fine-tuned (APOLLO) on two synthetic tasks, task vectors merged, both tasks measured."""

from __future__ import annotations

import copy

import pytest
import torch

from apollo_fast import APOLLO, apollo_param_groups
from apollo_fast.toy import PermutationTask, tiny_causal_lm
from apollo_fast.vectors import dare, extract_task_vector, ties_merge

# Task A: a permutation chain over tokens 0..31; task B: another one over tokens 32..63. Each
# fine-tune learns one; a good merge does both.
OFFSETS = {"A": 0, "B": 32}


def _task(name: str) -> PermutationTask:
    return PermutationTask(vocab=32, seq_len=16, seed={"A": 1, "B": 2}[name])


def _train(model, name: str, steps: int = 30) -> None:
    task = _task(name)
    opt = APOLLO(apollo_param_groups(model, rank=16), lr=1e-2)
    for _ in range(steps):
        x = task.batch(16) + OFFSETS[name]
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@torch.no_grad()
def _accuracy(model, name: str) -> float:
    task = PermutationTask(vocab=32, seq_len=16, seed={"A": 1, "B": 2}[name])
    task._gen.manual_seed(1234)  # held-out starting tokens
    x = task.batch(64) + OFFSETS[name]
    pred = model(input_ids=x).logits.argmax(-1)
    return (pred[:, :-1] == x[:, 1:]).float().mean().item()


@pytest.fixture(scope="module")
def trained():
    base = tiny_causal_lm(seed=0).eval()
    ft = {}
    for name in ("A", "B"):
        ft[name] = copy.deepcopy(base)
        _train(ft[name], name)
        ft[name].eval()
    return base, ft


def _merged(base, vector):
    m = copy.deepcopy(base)
    vector.apply_to(m)
    return m


def test_fine_tunes_learn_only_their_task(trained):
    base, ft = trained
    assert _accuracy(base, "A") < 0.1 and _accuracy(base, "B") < 0.1
    assert _accuracy(ft["A"], "A") > 0.95 and _accuracy(ft["A"], "B") < 0.1
    assert _accuracy(ft["B"], "B") > 0.95 and _accuracy(ft["B"], "A") < 0.1


@pytest.mark.parametrize(
    "how",
    ["sum", "ties (paper defaults)", "ties per tensor, count", "dare + ties"],
)
def test_merged_model_does_both_tasks(trained, how):
    base, ft = trained
    va, vb = extract_task_vector(base, ft["A"]), extract_task_vector(base, ft["B"])
    if how == "sum":
        v = va + vb
    elif how == "ties (paper defaults)":
        v = ties_merge([va, vb])  # density 0.2 over the whole model, sign by total magnitude, lambda 1
    elif how == "ties per tensor, count":
        v = ties_merge([va, vb], density=0.3, trim="tensor", sign="count")
    else:
        v = ties_merge([dare(va, 0.3, seed=0), dare(vb, 0.3, seed=1)], density=1.0)
    m = _merged(base, v)
    acc_a, acc_b = _accuracy(m, "A"), _accuracy(m, "B")
    assert acc_a > 0.85 and acc_b > 0.85, f"{how}: accuracy A {acc_a:.3f}, B {acc_b:.3f}"


def test_negated_vector_forgets(trained):
    base, ft = trained
    va = extract_task_vector(base, ft["A"])
    forgot = copy.deepcopy(ft["A"])
    (-va).apply_to(forgot, check_base="ignore")
    assert _accuracy(forgot, "A") < 0.1
    for (k, p), q in zip(forgot.state_dict().items(), base.state_dict().values(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), k
