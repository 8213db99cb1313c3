"""FrozenContextTrainer: the optimizer step around segment_loss (micro-batching, accumulation, clipping)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .adapters import model_parts
from .context import FrozenContext
from .segment import IGNORE_INDEX, prepare_segment, segment_loss

__all__ = ["FrozenContextTrainer"]

Segments = Sequence[Mapping[str, Any]] | Mapping[str, Any] | torch.Tensor


def _as_row(value: Any, name: str, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(value, device=device)
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 1:
        raise ValueError(f"segment {name} must be 1-D (one segment per dict), got shape {tuple(t.shape)}")
    return t


def _pad_rows(rows: list[torch.Tensor], value: int) -> torch.Tensor:
    width = max(r.shape[0] for r in rows)
    out = rows[0].new_full((len(rows), width), value)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


class FrozenContextTrainer:
    """Trains segments against a FrozenContext: one call of `step` per context, an optimizer step every
    `grad_accum_steps` calls.

    step(context, segments): segments are a list of dicts {"input_ids", optional "labels", "attention_mask"}
    (1-D each; right-padded into micro-batches here) or one batch dict / tensor [B, T]. They run in micro-batches
    of `micro_batch_size` segments (default: all at once); the gradient is that of the mean CE over all target
    tokens of the call, divided by grad_accum_steps. After grad_accum_steps calls the gradients are clipped to
    max_grad_norm (if set), the optimizer steps and the gradients are cleared. gradient_checkpointing recomputes
    each segment layer in backward (safe: the context is read-only). Returns the call's mean loss.
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
        self.optimizer_steps = 0  # optimizer steps taken
        self.last_grad_norm: float | None = None  # total gradient norm before clipping, at the last optimizer step
        self._pending = 0  # step() calls whose gradients wait for the optimizer

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _micro_batches(self, segments: Segments) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """-> [(ids [b, t], labels [b, t] with -100 at padding)], each trimmed to its longest segment."""
        device = self._device()
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
        size = self.micro_batch_size or len(rows)
        out = []
        for s in range(0, len(rows), size):
            chunk = rows[s : s + size]
            out.append((_pad_rows([r[0] for r in chunk], 0), _pad_rows([r[1] for r in chunk], IGNORE_INDEX)))
        return out

    def step(self, context: FrozenContext, segments: Segments) -> float:
        """Accumulate the gradient of the segments' mean loss after `context`; step the optimizer when due."""
        batches = self._micro_batches(segments)
        counts = [int((labels[:, 1:] != IGNORE_INDEX).sum()) for _, labels in batches]
        total = sum(counts)
        if total == 0:
            raise ValueError("segments have no target tokens (labels are shifted inside; -100 is ignored)")
        loss_sum = torch.zeros((), device=self._device())
        for (ids, labels), n in zip(batches, counts, strict=True):
            if n == 0:
                continue
            loss = segment_loss(self.model, context, ids, labels, gradient_checkpointing=self.gradient_checkpointing)
            (loss * (n / (total * self.grad_accum_steps))).backward()
            loss_sum += loss.detach() * n
        self._pending += 1
        if self._pending >= self.grad_accum_steps:
            self._apply()
        return float(loss_sum) / total

    def flush(self) -> bool:
        """Apply gradients accumulated by fewer than grad_accum_steps calls (e.g. at the end of data); True if it did.

        Their weight stays 1/grad_accum_steps per call, as if the missing calls had zero gradient.
        """
        if self._pending == 0:
            return False
        self._apply()
        return True

    def _apply(self) -> None:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.max_grad_norm is not None and params:
            self.last_grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm))
        elif params:
            self.last_grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._pending = 0
        self.optimizer_steps += 1
