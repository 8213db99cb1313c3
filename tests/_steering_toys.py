"""Shared toys for the steering tests: a word-level tokenizer and a tiny model with two 'modes'."""

from __future__ import annotations

import torch

from apollo_fast import APOLLO, apollo_param_groups
from apollo_fast.toy import tiny_causal_lm

VOCAB = 64
MODE_A, MODE_B = 0, 1  # first token of a sequence: which permutation the rest follows


def word_tokenizer():
    """A WordLevel tokenizer over the words t0..t63 (t0 = 'A', t1 = 'B'), built locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["A", "B"] + [f"t{i}" for i in range(2, VOCAB - 1)] + ["[PAD]"]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[PAD]")


def words(ids) -> str:
    return " ".join(["A", "B"][i] if i < 2 else f"t{i}" for i in ids)


class ModeTask:
    """[mode, x, f(x), f(f(x)), ...] where f is permutation A or B over tokens 2..62 by the mode token."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.perm = {m: torch.randperm(VOCAB - 3, generator=g) + 2 for m in (MODE_A, MODE_B)}
        self.gen = torch.Generator().manual_seed(seed + 1)

    def next(self, mode: int, x: int) -> int:
        return int(self.perm[mode][x - 2])

    def batch(self, n: int, length: int = 8) -> torch.Tensor:
        mode = torch.randint(0, 2, (n,), generator=self.gen)
        x = torch.empty(n, length, dtype=torch.int64)
        x[:, 0] = mode
        x[:, 1] = torch.randint(2, VOCAB - 1, (n,), generator=self.gen)
        for t in range(2, length):
            for i in range(n):
                x[i, t] = self.next(int(mode[i]), int(x[i, t - 1]))
        return x


def trained_mode_model(steps: int = 50):
    """A tiny Llama that learned ModeTask (APOLLO); returns (model in eval mode, task)."""
    task = ModeTask()
    model = tiny_causal_lm(vocab=VOCAB, seed=0)
    opt = APOLLO(apollo_param_groups(model, rank=16), lr=1e-2)
    for _ in range(steps):
        x = task.batch(32)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.eval(), task


def mode_pairs(task: ModeTask, tokens: list[int]):
    """Extraction pairs (desired: mode A, undesired: mode B) and held-out pairs on other tokens."""
    return [([MODE_A, y], [MODE_B, y]) for y in tokens]


def held_out_pairs(task: ModeTask, tokens: list[int]):
    """(prompt in mode B, continuation under A (desired), continuation under B (undesired))."""
    return [
        ([MODE_B, y], [task.next(MODE_A, y)], [task.next(MODE_B, y)])
        for y in tokens
        if task.next(MODE_A, y) != task.next(MODE_B, y)
    ]
