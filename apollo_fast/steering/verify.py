"""Verify a steering vector on held-out pairs: projection on the direction and log-prob margin, off vs on."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .hooks import capture_hidden, steer
from .pairs import encode_pairs, pad_batch
from .vector import SteeringVector

__all__ = ["verify_steering", "VerifyReport", "continuation_logprobs"]


@dataclass
class VerifyReport:
    """Means over held-out pairs. margin = log p(desired | prompt) - log p(undesired | prompt) (nats).

    projection[layer]: the last token's hidden state at that layer's output, projected on the
    layer's unit direction: desired_off / undesired_off (no steering), mean_off / mean_on (both
    sequences, without / with steering) and shift = mean_on - mean_off.
    """

    n_pairs: int
    coefficient: float
    layers: list[int]
    margin_off: float
    margin_on: float
    prefer_desired_off: float
    prefer_desired_on: float
    logp_desired_off: float
    logp_desired_on: float
    logp_undesired_off: float
    logp_undesired_on: float
    projection: dict[int, dict[str, float]] = field(default_factory=dict)

    @property
    def margin_change(self) -> float:
        return self.margin_on - self.margin_off

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["margin_change"] = self.margin_change
        return d


@torch.no_grad()
def continuation_logprobs(
    model: nn.Module,
    seqs: Sequence[Sequence[int]],
    prompt_lens: Sequence[int],
    layers: Sequence[int] = (),
    batch_size: int = 16,
    pad_id: int = 0,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Sum of log p(token) over seqs[i][prompt_lens[i]:] -> (n,) fp32, and the last real token's
    hidden state at each layer in `layers` -> {layer: (n, hidden)}. Prompts need >= 1 token."""
    if any(p < 1 for p in prompt_lens):
        raise ValueError("each sequence needs at least one prompt token before its continuation")
    dev = next(model.parameters()).device
    logps, hidden = [], {i: [] for i in layers}
    with capture_hidden(model, list(layers)) as store:
        for s in range(0, len(seqs), batch_size):
            chunk, plen = seqs[s : s + batch_size], prompt_lens[s : s + batch_size]
            ids, mask = pad_batch(chunk, pad_id)
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False).logits.float()
            lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:].to(dev).unsqueeze(-1)).squeeze(-1)
            pos = torch.arange(1, ids.shape[1], device=dev)
            lens = mask.sum(1).to(dev)
            keep = (pos[None] >= torch.as_tensor(plen, device=dev)[:, None]) & (pos[None] < lens[:, None])
            logps.append((lp * keep).sum(1).cpu())
            rows = torch.arange(ids.shape[0], device=dev)
            for i in layers:
                hidden[i].append(store[i][rows, lens - 1].float().cpu())
    return torch.cat(logps), {i: torch.cat(v) for i, v in hidden.items()}


def verify_steering(
    model: nn.Module,
    vector: SteeringVector,
    pairs: Iterable[Any],
    coefficient: float = 1.0,
    layers: Sequence[int] | None = None,
    tokenizer: Any | None = None,
    batch_size: int = 16,
) -> VerifyReport:
    """Compare the model without and with steering on held-out (prompt, desired, undesired) pairs.

    Pairs without a prompt use the two continuations' common prefix as the prompt (which must
    be at least one token). Projections are reported for every layer the vector has.
    """
    vector.check_compatible(model)
    steered = vector.layers if layers is None else [int(i) for i in layers]
    vocab = getattr(model.config.get_text_config(), "vocab_size", None)
    enc = [e.split() for e in encode_pairs(pairs, tokenizer, vocab)]
    if any(len(p) == 0 for p, _, _ in enc):
        raise ValueError("verify needs a prompt: give (prompt, desired, undesired) or pairs sharing a first token")
    if any(len(d) == 0 or len(u) == 0 for _, d, u in enc):
        raise ValueError("a pair's desired and undesired sequences are identical or one is a prefix of the other")
    seqs = [p + d for p, d, _ in enc] + [p + u for p, _, u in enc]
    plens = [len(p) for p, _, _ in enc] * 2
    n = len(enc)
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    proj_layers = vector.layers
    was_training = model.training
    model.eval()
    try:
        lp_off, h_off = continuation_logprobs(model, seqs, plens, proj_layers, batch_size, pad_id)
        with steer(model, vector, coefficient, steered):
            lp_on, h_on = continuation_logprobs(model, seqs, plens, proj_layers, batch_size, pad_id)
    finally:
        model.train(was_training)
    proj = {}
    for i in proj_layers:
        u = vector.unit(i)
        p_off, p_on = h_off[i] @ u, h_on[i] @ u
        proj[i] = {
            "desired_off": p_off[:n].mean().item(),
            "undesired_off": p_off[n:].mean().item(),
            "mean_off": p_off.mean().item(),
            "mean_on": p_on.mean().item(),
            "shift": (p_on - p_off).mean().item(),
        }
    m_off, m_on = lp_off[:n] - lp_off[n:], lp_on[:n] - lp_on[n:]
    return VerifyReport(
        n_pairs=n,
        coefficient=float(coefficient),
        layers=steered,
        margin_off=m_off.mean().item(),
        margin_on=m_on.mean().item(),
        prefer_desired_off=(m_off > 0).float().mean().item(),
        prefer_desired_on=(m_on > 0).float().mean().item(),
        logp_desired_off=lp_off[:n].mean().item(),
        logp_desired_on=lp_on[:n].mean().item(),
        logp_undesired_off=lp_off[n:].mean().item(),
        logp_undesired_on=lp_on[n:].mean().item(),
        projection=proj,
    )
