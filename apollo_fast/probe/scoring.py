"""Log-probabilities the probes measure: pair margins and per-item negative log-likelihoods.

Long prompts and contexts go through the frozen-context path: the prompt is encoded once without
gradients and both continuations are scored against it as one batch (`encode_context`,
`segment_logits`), so memory does not grow with the number of continuations and a long prompt is
run once, not twice. Short prompts are batched full forwards (right-padded, so padding changes no
real token). Both give the same numbers (tests/test_probe.py checks it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .inputs import Pair

__all__ = ["FROZEN_FROM", "pair_logprobs", "item_nll", "Margins", "eval_mode"]

# Prompts (and contexts) of at least this many tokens take the frozen-context path.
FROZEN_FROM = 256


class eval_mode:
    """Context manager: model.eval() inside, the previous mode restored on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.was = model, model.training

    def __enter__(self) -> nn.Module:
        self.model.eval()
        return self.model

    def __exit__(self, *exc) -> None:
        self.model.train(self.was)


class Margins:
    """Per-pair sums of log p(continuation | prompt) in nats: desired, undesired and their difference."""

    def __init__(self, desired: np.ndarray, undesired: np.ndarray, desired_tokens: np.ndarray) -> None:
        self.desired, self.undesired, self.desired_tokens = desired, undesired, desired_tokens

    @property
    def margin(self) -> np.ndarray:
        return self.desired - self.undesired


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pad(rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def _token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[:, t+1] | ...) for t < T-1: [B, T-1] fp32."""
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return lp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def _continuations_after(model: nn.Module, prompt: list[int], conts: list[list[int]]) -> list[float]:
    """Frozen path: encode prompt[:-1] once, score prompt[-1] + each continuation against it."""
    from ..frozen import encode_context, segment_logits

    dev = _device(model)
    ctx = encode_context(model, torch.tensor([prompt[:-1]], device=dev))
    ids, mask = _pad([prompt[-1:] + c for c in conts])
    ids, mask = ids.to(dev), mask.to(dev)
    lp = _token_logprobs(segment_logits(model, ctx, ids, mask), ids) * mask[:, 1:]
    return lp.sum(1).tolist()


@torch.no_grad()
def _full_forward(model: nn.Module, seqs: list[list[int]], starts: list[int]) -> list[float]:
    """Sum of log p(token) for tokens at positions >= starts[i] of each sequence, in one padded batch."""
    dev = _device(model)
    ids, mask = _pad(seqs)
    ids, mask = ids.to(dev), mask.to(dev)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    lp = _token_logprobs(logits, ids)
    pos = torch.arange(1, ids.shape[1], device=dev)
    keep = (pos[None] >= torch.as_tensor(starts, device=dev)[:, None]) & (mask[:, 1:] == 1)
    return (lp * keep).sum(1).tolist()


def pair_logprobs(
    model: nn.Module,
    pairs: Sequence[Pair],
    *,
    batch_size: int = 16,
    frozen_from: int = FROZEN_FROM,
    progress: bool = False,
    desc: str = "score pairs",
) -> Margins:
    """log p(desired | prompt) and log p(undesired | prompt) (sums over the continuation's tokens) per pair."""
    from tqdm.auto import tqdm

    n = len(pairs)
    d, u = np.zeros(n), np.zeros(n)
    short = [i for i, p in enumerate(pairs) if len(p.prompt) < max(2, frozen_from)]
    long = [i for i, p in enumerate(pairs) if len(p.prompt) >= max(2, frozen_from)]
    bar = tqdm(total=n, desc=desc, unit="pair", leave=False, disable=not progress)
    with eval_mode(model), bar:
        for i in long:
            p = pairs[i]
            d[i], u[i] = _continuations_after(model, p.prompt, [p.desired, p.undesired])
            bar.update(1)
        per = max(1, batch_size // 2)
        for s in range(0, len(short), per):
            chunk = [pairs[i] for i in short[s : s + per]]
            seqs = [p.prompt + p.desired for p in chunk] + [p.prompt + p.undesired for p in chunk]
            starts = [len(p.prompt) for p in chunk] * 2
            lp = _full_forward(model, seqs, starts)
            for j, i in enumerate(short[s : s + per]):
                d[i], u[i] = lp[j], lp[len(chunk) + j]
            bar.update(len(chunk))
    return Margins(d, u, np.array([len(p.desired) for p in pairs], dtype=np.float64))


@torch.no_grad()
def _behaviour_nll(model: nn.Module, example: Any) -> tuple[float, int]:
    """Target-token NLL of a behaviour example: its context encoded once, its segments as one batch."""
    from ..frozen import encode_context, segment_logits

    dev = _device(model)
    ctx = encode_context(model, example.context_ids.to(dev).unsqueeze(0))
    ids, mask = _pad([s.input_ids.tolist() for s in example.segments])
    labels = torch.full_like(ids, -100)
    for i, s in enumerate(example.segments):
        labels[i, : s.labels.numel()] = s.labels
    ids, mask, labels = ids.to(dev), mask.to(dev), labels.to(dev)
    lp = _token_logprobs(segment_logits(model, ctx, ids, mask), ids)
    keep = labels[:, 1:] != -100
    return float(-(lp * keep).sum()), int(keep.sum())


def item_nll(
    model: nn.Module,
    items: Sequence[Any],
    *,
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "perplexity",
) -> tuple[np.ndarray, np.ndarray]:
    """Per item: the summed negative log-likelihood of its target tokens (nats) and their count.

    Items: GeneralItem (every token after the first; one padded full forward per batch), BehaviourExample
    (target tokens after the context, frozen path) or Pair (the desired continuation after the prompt).
    """
    from tqdm.auto import tqdm

    from ..training.data import BehaviourExample, GeneralItem

    nll, count = np.zeros(len(items)), np.zeros(len(items))
    texts = [i for i, it in enumerate(items) if isinstance(it, GeneralItem)]
    pairs = [i for i, it in enumerate(items) if isinstance(it, Pair)]
    other = [i for i, it in enumerate(items) if not isinstance(it, (GeneralItem, Pair))]
    with eval_mode(model), tqdm(total=len(items), desc=desc, unit="item", leave=False, disable=not progress) as bar:
        for s in range(0, len(texts), batch_size):
            chunk = texts[s : s + batch_size]
            lp = _full_forward(model, [items[i].input_ids.tolist() for i in chunk], [1] * len(chunk))
            for j, i in enumerate(chunk):
                nll[i], count[i] = -lp[j], items[i].n_target
            bar.update(len(chunk))
        if pairs:
            m = pair_logprobs(model, [items[i] for i in pairs], batch_size=batch_size)
            nll[pairs], count[pairs] = -m.desired, m.desired_tokens
            bar.update(len(pairs))
        for i in other:
            if not isinstance(items[i], BehaviourExample):
                raise TypeError(f"evaluation item {i}: {type(items[i]).__name__} is not a text, example or pair")
            nll[i], count[i] = _behaviour_nll(model, items[i])
            bar.update(1)
    return nll, count
