"""FrozenContextTrainer: the one training step around segment_loss (micro-batching, weighted accumulation,
clipping, the optimizer step). `apollo-fast train` drives it too."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .adapters import model_parts
from .context import FrozenContext, encode_context
from .segment import IGNORE_INDEX, prepare_segment, segment_loss

__all__ = ["FrozenContextTrainer", "pad_segments"]

Segments = Sequence[Mapping[str, Any]] | Mapping[str, Any] | torch.Tensor


def _as_row(value: Any, name: str, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(value, device=device)
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 1:
        raise ValueError(f"segment {name} must be 1-D (one segment per dict), got shape {tuple(t.shape)}")
    return t


def pad_segments(
    rows: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Right-pad (input_ids, labels) rows (1-D each): ids, labels (-100 on padding) and attention_mask [B, T].

    The mask is None when every row has the same length (nothing is padded).
    """
    lengths = [ids.shape[0] for ids, _ in rows]
    width = max(lengths)
    first = rows[0][0]
    ids = torch.zeros(len(rows), width, dtype=first.dtype, device=first.device)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.int64, device=first.device)
    mask = torch.zeros(len(rows), width, dtype=torch.int64, device=first.device)
    for i, ((row_ids, row_labels), n) in enumerate(zip(rows, lengths, strict=True)):
        ids[i, :n], labels[i, :n], mask[i, :n] = row_ids, row_labels, 1
    return ids, labels, (None if min(lengths) == width else mask)


class FrozenContextTrainer:
    """Trains segments against a FrozenContext: one call of `step` per context, an optimizer step every
    `grad_accum_steps` calls.

    step(context, segments): segments are a list of dicts {"input_ids", optional "labels", "attention_mask"}
    (1-D each; right-padded into micro-batches here) or one batch dict / tensor [B, T]. They run in micro-batches
    of `micro_batch_size` segments (default: all at once); the gradient is that of the mean CE over all target
    tokens of the call, divided by grad_accum_steps. After grad_accum_steps calls the gradients are clipped to
    max_grad_norm (if set), the optimizer steps and the gradients are cleared. gradient_checkpointing recomputes
    each segment layer in backward (safe: the context is read-only). backend: where attention and the GDN layers
    run in encode and the segment losses ('auto' | 'reference' | 'triton', apollo_fast.backend). Returns the
    call's mean loss.

    The parts, for callers that weigh items themselves (as `apollo-fast train` does): `encode(ids)`,
    `backward(context, segments, weight)` (context None: plain language modelling of the segments,
    full-sequence forward) and `apply()` (clip, step, clear; returns the gradient norm).

    step_in_backward=True (an APOLLO optimizer): each decoder layer is updated inside the backward as soon as
    its gradients are complete and they are freed (apollo_fast.step_in_backward), so the full set of gradients
    never exists. One backward per optimizer step is then required (grad_accum_steps=1, and a call's segments
    in one micro-batch); clipping is per layer or per parameter (clip='layer' | 'param' with max_grad_norm),
    never global. close() removes the hooks.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        grad_accum_steps: int = 1,
        max_grad_norm: float | None = None,
        gradient_checkpointing: bool = False,
        micro_batch_size: int | None = None,
        backend: str = "auto",
        step_in_backward: bool = False,
        clip: str | None = None,
    ) -> None:
        model_parts(model)  # unsupported architectures fail here, before any data is seen
        if not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be an int >= 1, got {grad_accum_steps!r}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}")
        if micro_batch_size is not None and (not isinstance(micro_batch_size, int) or micro_batch_size < 1):
            raise ValueError(f"micro_batch_size must be an int >= 1 or None, got {micro_batch_size!r}")
        self.model, self.optimizer = model, optimizer
        self.grad_accum_steps, self.max_grad_norm = grad_accum_steps, max_grad_norm
        self.gradient_checkpointing, self.micro_batch_size = gradient_checkpointing, micro_batch_size
        self.backend = backend
        self._in_backward = None
        if step_in_backward:
            from ..optim.in_backward import step_in_backward as register

            self._in_backward = register(
                model, optimizer, max_grad_norm=max_grad_norm, clip=clip, grad_accum_steps=grad_accum_steps
            )
        elif clip is not None:
            raise ValueError("clip='layer' | 'param' belongs to step_in_backward=True; global clipping otherwise")
        self.optimizer_steps = 0  # optimizer steps taken
        self._grad_norm: torch.Tensor | None = None  # kept on the device: read only when asked for
        self._pending = 0  # step() calls whose gradients wait for the optimizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def last_grad_norm(self) -> float | None:
        """Total gradient norm before clipping, at the last optimizer step (None before the first)."""
        return None if self._grad_norm is None else float(self._grad_norm)

    def _rows(self, segments: Segments) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """-> [(ids [t], labels [t] with -100 where nothing is learnt)], each trimmed to its real tokens."""
        device = self.device
        if isinstance(segments, torch.Tensor):
            segments = {"input_ids": segments}
        if isinstance(segments, Mapping):
            if "input_ids" not in segments:
                raise ValueError("a segment batch needs 'input_ids'")
            ids, labels, _ = prepare_segment(
                self.model, segments["input_ids"], segments.get("labels"), segments.get("attention_mask")
            )
            lengths = (
                segments["attention_mask"].reshape(ids.shape).sum(-1).tolist()
                if segments.get("attention_mask") is not None
                else [ids.shape[1]] * ids.shape[0]
            )
            rows = [(ids[i, :n], labels[i, :n]) for i, n in enumerate(lengths)]
        elif isinstance(segments, Sequence) and not isinstance(segments, (str, bytes)):
            rows = []
            for j, seg in enumerate(segments):
                if not isinstance(seg, Mapping) or "input_ids" not in seg:
                    raise ValueError(f"segment {j} must be a dict with 'input_ids'")
                ids_j = _as_row(seg["input_ids"], "input_ids", device)
                labels_j = None if seg.get("labels") is None else _as_row(seg["labels"], "labels", device)
                mask_j = None if seg.get("attention_mask") is None else _as_row(seg["attention_mask"], "mask", device)
                ids_j2, labels_j2, _ = prepare_segment(self.model, ids_j, labels_j, mask_j)
                n = ids_j.shape[0] if mask_j is None else int(mask_j.sum())
                rows.append((ids_j2[0, :n], labels_j2[0, :n]))
        else:
            raise TypeError(
                f"segments must be a list of dicts, a batch dict or a tensor, got {type(segments).__name__}"
            )
        if not rows:
            raise ValueError("no segments given")
        return rows

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> FrozenContext:
        """encode_context for this trainer's model (no grad; read-only per-layer state)."""
        return encode_context(self.model, input_ids, attention_mask, backend=self.backend)

    def _loss(self, context: FrozenContext | None, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if context is None:  # plain language modelling: the model's own full-sequence loss (same label shift)
            return self.model(input_ids=ids, labels=labels, use_cache=False).loss
        return segment_loss(
            self.model, context, ids, labels, gradient_checkpointing=self.gradient_checkpointing, backend=self.backend
        )

    def backward(self, context: FrozenContext | None, segments: Segments, weight: float = 1.0) -> torch.Tensor:
        """Accumulate the gradient of weight * (mean CE over all target tokens of `segments` after `context`).

        Micro-batches of `micro_batch_size` segments, each backward scaled by its share of the target
        tokens, so memory holds one micro-batch's graph at a time. context=None trains the segments as
        plain language modelling (the model's full-sequence forward, without gradient checkpointing).
        Returns that mean loss (0-dim fp32, detached, still on the device: no host sync).
        """
        rows = self._rows(segments)
        counts = torch.stack([(labels[1:] != IGNORE_INDEX).sum() for _, labels in rows]).tolist()
        total = sum(counts)
        if total == 0:
            raise ValueError("segments have no target tokens (labels are shifted inside; -100 is ignored)")
        size = self.micro_batch_size or len(rows)
        if self._in_backward is not None:
            from ..optim.in_backward import check_one_backward

            check_one_backward(-(-len(rows) // size), f"{len(rows)} segments in micro-batches of {size}")
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        for s, e in self.micro_batches(counts):
            n = sum(counts[s:e])
            ids, labels, _ = pad_segments(rows[s:e])
            loss = self._loss(context, ids, labels)
            (loss * (weight * (n / total))).backward()
            loss_sum += loss.detach().float() * n
        return loss_sum / total

    def micro_batches(self, target_counts: Sequence[int]) -> list[tuple[int, int]]:
        """[start, stop) of each micro-batch `backward` runs (one forward and one backward each) for segments
        with these numbers of target tokens: micro_batch_size segments at a time, skipping any without targets."""
        size = self.micro_batch_size or len(target_counts)
        bounds = [(s, min(s + size, len(target_counts))) for s in range(0, len(target_counts), size)]
        return [(s, e) for s, e in bounds if sum(target_counts[s:e]) > 0]

    def apply(self) -> torch.Tensor | None:
        """Clip to max_grad_norm (if set), step the optimizer, clear the gradients.

        Returns the total gradient norm before clipping (0-dim, on the device), None when no
        parameter had a gradient (the optimizer still steps).
        """
        if self._in_backward is not None:  # the layers were updated during the backward
            result = self._in_backward.finish_step()
            self._pending = 0
            self.optimizer_steps += 1
            if result.grad_norm is not None:
                self._grad_norm = result.grad_norm.detach()
            return result.grad_norm
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm = None
        if grads and self.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.grad is not None],
                                                  self.max_grad_norm)  # fmt: skip
        elif grads:
            norm = torch.nn.utils.get_total_norm(grads)
        if hasattr(norm, "full_tensor"):  # sharded gradients (FSDP2): a DTensor norm, the same on every rank
            norm = norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._pending = 0
        self.optimizer_steps += 1
        if norm is not None:
            self._grad_norm = norm.detach()
        return self._grad_norm if norm is not None else None

    def step(self, context: FrozenContext, segments: Segments) -> float:
        """Accumulate the gradient of the segments' mean loss after `context`; step the optimizer when due."""
        loss = self.backward(context, segments, 1.0 / self.grad_accum_steps)
        self._pending += 1
        if self._pending >= self.grad_accum_steps:
            self.apply()
        return float(loss)

    def close(self) -> None:
        """Remove the step-in-backward hooks (nothing to do otherwise)."""
        if self._in_backward is not None:
            self._in_backward.remove()
            self._in_backward = None

    def flush(self) -> bool:
        """Apply gradients accumulated by fewer than grad_accum_steps calls (e.g. at the end of data); True if it did.

        Their weight stays 1/grad_accum_steps per call, as if the missing calls had zero gradient.
        """
        if self._pending == 0:
            return False
        self.apply()
        return True
