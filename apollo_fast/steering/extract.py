"""Extract steering directions from contrastive pairs: mean difference or PCA of differences per layer."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .hooks import capture_hidden
from .layers import decoder_layers
from .pairs import encode_pairs, pad_batch
from .vector import SteeringVector, model_summary

__all__ = ["extract_steering_vector", "hidden_at", "METHODS", "directions_from_differences"]

METHODS = ("mean_diff", "pca")


def _index(lengths: torch.Tensor, position: int) -> torch.Tensor:
    """Per sequence, the index of `position` among its real tokens (negative counts from the last)."""
    idx = lengths + position if position < 0 else torch.full_like(lengths, position)
    bad = (idx < 0) | (idx >= lengths)
    if bad.any():
        raise ValueError(f"token position {position} is outside a sequence of length {int(lengths[bad][0])}")
    return idx


@torch.no_grad()
def hidden_at(
    model: nn.Module,
    seqs: Sequence[Sequence[int]],
    layers: Sequence[int],
    position: int = -1,
    batch_size: int = 16,
    pad_id: int = 0,
) -> dict[int, torch.Tensor]:
    """Decoder-layer outputs at one token position: layer -> (len(seqs), hidden) fp32 on the CPU."""
    dev = next(model.parameters()).device
    out: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    with capture_hidden(model, layers) as store:
        for s in range(0, len(seqs), batch_size):
            ids, mask = pad_batch(seqs[s : s + batch_size], pad_id)
            idx = _index(mask.sum(1), position)
            model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False)
            rows = torch.arange(ids.shape[0])
            for i in layers:
                out[i].append(store[i][rows.to(dev), idx.to(dev)].float().cpu())
    return {i: torch.cat(v) for i, v in out.items()}


def directions_from_differences(diffs: torch.Tensor, method: str = "mean_diff") -> torch.Tensor:
    """diffs: (n_pairs, hidden) h_desired - h_undesired -> (hidden,) direction.

    mean_diff: the mean of the differences.
    pca: the first right-singular vector of the (uncentred) difference matrix, i.e. the first
    principal component of the differences with each pair's order randomised (as RepE does),
    oriented to agree with the mean difference and scaled to the mean difference's length along
    it, so the two methods share a scale and a coefficient means the same for both.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    mean = diffs.mean(0)
    if method == "mean_diff":
        return mean
    _, _, vh = torch.linalg.svd(diffs.double(), full_matrices=False)
    v = vh[0].float()
    along = torch.dot(mean, v)
    if along < 0:
        v, along = -v, -along
    return v * along


def extract_steering_vector(
    model: nn.Module,
    pairs: Iterable[Any],
    layers: Sequence[int] | None = None,
    method: str = "mean_diff",
    position: int = -1,
    tokenizer: Any | None = None,
    batch_size: int = 16,
) -> SteeringVector:
    """One direction per layer from (desired, undesired) pairs, at token `position` (-1: the last real token).

    pairs: (desired, undesired), (prompt, desired, undesired), dicts or ContrastivePair; strings
    need `tokenizer`. Sequences are right-padded in batches; padding never changes the result.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    n_layers = len(decoder_layers(model))
    layers = list(range(n_layers)) if layers is None else sorted({int(i) for i in layers})
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has {n_layers} decoder layers")
    vocab = getattr(model.config.get_text_config(), "vocab_size", None)
    enc = encode_pairs(pairs, tokenizer, vocab)
    if method == "pca" and len(enc) < 2:
        raise ValueError("PCA of differences needs at least 2 pairs")
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    was_training = model.training
    model.eval()
    try:
        hd = hidden_at(model, [e.desired_ids for e in enc], layers, position, batch_size, pad_id)
        hu = hidden_at(model, [e.undesired_ids for e in enc], layers, position, batch_size, pad_id)
    finally:
        model.train(was_training)
    directions = {i: directions_from_differences(hd[i] - hu[i], method) for i in layers}
    summary = model_summary(model)
    return SteeringVector(
        directions,
        summary["hidden_size"],
        summary["num_hidden_layers"],
        summary,
        method,
        position,
        {"n_pairs": len(enc)},
    )
