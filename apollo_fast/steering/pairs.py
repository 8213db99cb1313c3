"""Contrastive pairs and prompts: token ids or strings, encoded and right-padded into batches."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ContrastivePair", "as_pairs", "encode", "pad_batch", "EncodedPair", "encode_pairs"]

Text = str | Sequence[int]


@dataclass(frozen=True)
class ContrastivePair:
    """A prompt (may be empty) followed by a desired and an undesired continuation (str or token ids)."""

    desired: Text
    undesired: Text
    prompt: Text = ()


@dataclass(frozen=True)
class EncodedPair:
    """Token ids: prompt, desired continuation, undesired continuation."""

    prompt: list[int]
    desired: list[int]
    undesired: list[int]

    @property
    def desired_ids(self) -> list[int]:
        return self.prompt + self.desired

    @property
    def undesired_ids(self) -> list[int]:
        return self.prompt + self.undesired

    def split(self) -> tuple[list[int], list[int], list[int]]:
        """(prompt, desired, undesired) with the prompt extended by the continuations' common prefix."""
        d, u = self.desired, self.undesired
        n = 0
        while n < min(len(d), len(u)) and d[n] == u[n]:
            n += 1
        return self.prompt + d[:n], d[n:], u[n:]


def as_pairs(items: Iterable[Any]) -> list[ContrastivePair]:
    """Accept ContrastivePair, (desired, undesired), (prompt, desired, undesired) or dicts with those keys."""
    out = []
    for i, it in enumerate(items):
        if isinstance(it, ContrastivePair):
            out.append(it)
        elif isinstance(it, dict):
            missing = {"desired", "undesired"} - set(it)
            if missing:
                raise ValueError(f"pair {i}: missing keys {sorted(missing)} (need desired, undesired, optional prompt)")
            out.append(ContrastivePair(it["desired"], it["undesired"], it.get("prompt", ())))
        elif isinstance(it, (tuple, list)) and len(it) == 2 and not isinstance(it[0], int):
            out.append(ContrastivePair(it[0], it[1]))
        elif isinstance(it, (tuple, list)) and len(it) == 3 and not isinstance(it[0], int):
            out.append(ContrastivePair(it[1], it[2], it[0]))
        else:
            raise TypeError(
                f"pair {i}: expected (desired, undesired), (prompt, desired, undesired) or a dict, "
                f"got {type(it).__name__}"
            )
    if not out:
        raise ValueError("no contrastive pairs given")
    return out


def encode(x: Text, tokenizer: Any | None, special: bool = False, vocab_size: int | None = None) -> list[int]:
    """A string (needs `tokenizer`) or token ids -> list of ids; `special` adds the tokenizer's BOS etc."""
    if isinstance(x, str):
        if tokenizer is None:
            raise ValueError(f"got text {x[:40]!r} but no tokenizer: pass a tokenizer or token ids")
        if x == "" and not special:
            return []
        ids = list(tokenizer(x, add_special_tokens=special)["input_ids"])
    else:
        ids = [int(t) for t in x]
    if vocab_size is not None:
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} out of range for vocab size {vocab_size}")
    return ids


def encode_pairs(
    pairs: Iterable[Any], tokenizer: Any | None = None, vocab_size: int | None = None
) -> list[EncodedPair]:
    """Encode pairs: the prompt with the tokenizer's special tokens (e.g. BOS), continuations without."""
    out = []
    for p in as_pairs(pairs):
        prompt = encode(p.prompt, tokenizer, special=True, vocab_size=vocab_size) if len(p.prompt) else []
        e = EncodedPair(
            prompt,
            encode(p.desired, tokenizer, vocab_size=vocab_size),
            encode(p.undesired, tokenizer, vocab_size=vocab_size),
        )
        if not e.desired_ids or not e.undesired_ids:
            raise ValueError("a pair has an empty sequence: every side needs at least one token")
        out.append(e)
    return out


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad: (B, T) int64 ids and (B, T) int64 attention mask (1 = real token).

    Right padding keeps every real token's position ids and, under causal attention, its hidden
    states identical to an unpadded run.
    """
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("pad_batch needs non-empty sequences")
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(seqs), T), dtype=torch.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.int64)
        mask[i, : len(s)] = 1
    return ids, mask
