"""Training data: parse and validate JSONL files, tokenise them into behaviour examples and general items.

Behaviour file, one JSON object per line (blank lines are skipped, unknown keys ignored):
    {"context": str, "segments": [{"prompt": str, "target": str}, ...]}
Each segment continues the context on its own (segments are alternatives, not a chain); the loss
is on the target tokens only.

General file, one JSON object per line, either
    {"text": str}                     plain language modelling on every token, or
    {"context": ..., "segments": ...}  the behaviour schema above.
A text longer than the chunk length is cut into chunks that overlap by one token, so every token
after the first is a target exactly once.

Every problem is reported as `FILE:LINE: what is wrong` (up to MAX_REPORTED of them at once).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..jsonl import iter_jsonl

__all__ = [
    "DataError",
    "Limits",
    "Segment",
    "BehaviourExample",
    "GeneralItem",
    "load_behaviour",
    "load_general",
    "max_positions",
    "fingerprint",
]

IGNORE_INDEX = -100
MAX_REPORTED = 20


class DataError(ValueError):
    """Bad training data; the message names the file and line of every problem found."""


@dataclass(frozen=True)
class Limits:
    """Length limits in tokens (None: no limit)."""

    max_positions: int | None = None  # the model's max_position_embeddings: context + segment must fit
    max_context_tokens: int | None = None
    max_segment_tokens: int | None = None
    general_chunk_tokens: int = 1024  # general texts are cut into chunks of at most this many tokens
    target_eos: bool = False  # append the tokenizer's EOS token to every target


@dataclass(frozen=True)
class Segment:
    """One segment: input_ids and labels (L,) int64; labels are -100 except on target tokens."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    n_target: int


@dataclass(frozen=True)
class BehaviourExample:
    """A context (T,) int64 and the segments trained against it; `line` is its line in the file."""

    line: int
    context_ids: torch.Tensor
    segments: tuple[Segment, ...]

    @property
    def n_target(self) -> int:
        """Tokens carrying loss, over all segments."""
        return sum(s.n_target for s in self.segments)

    @property
    def n_tokens(self) -> int:
        """Tokens run through the model: the context once plus every segment."""
        return self.context_ids.numel() + sum(s.input_ids.numel() for s in self.segments)


@dataclass(frozen=True)
class GeneralItem:
    """A plain language-modelling chunk (L,) int64, L >= 2; every token after the first is a target."""

    line: int
    input_ids: torch.Tensor

    @property
    def n_target(self) -> int:
        return self.input_ids.numel() - 1

    @property
    def n_tokens(self) -> int:
        return self.input_ids.numel()


def max_positions(config: Any) -> int | None:
    """The model's max_position_embeddings (looking inside a multimodal config's text config), or None."""
    for cfg in (config, getattr(config, "get_text_config", lambda: None)()):
        value = getattr(cfg, "max_position_embeddings", None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class _Errors:
    """Collects `FILE:LINE: message` problems and raises them together."""

    def __init__(self, path: Path) -> None:
        self.path, self.messages, self.count = path, [], 0

    def add(self, line: int, message: str) -> None:
        self.count += 1
        if len(self.messages) < MAX_REPORTED:
            self.messages.append(f"{self.path}:{line}: {message}")

    def raise_if_any(self) -> None:
        if not self.count:
            return
        more = f"\n... and {self.count - len(self.messages)} more" if self.count > len(self.messages) else ""
        noun = "problem" if self.count == 1 else "problems"
        raise DataError(f"{self.count} {noun} in {self.path}:\n" + "\n".join(self.messages) + more)


def _read_objects(path: Path, errors: _Errors) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line that is a JSON object; the rest go to `errors`."""
    for lineno, obj, problem in iter_jsonl(path, "data file"):
        if problem is not None:
            errors.add(lineno, problem)
        elif not isinstance(obj, dict):
            errors.add(lineno, f"expected a JSON object, got {type(obj).__name__}")
        else:
            yield lineno, obj


def _check_behaviour(obj: dict[str, Any]) -> str | None:
    """What is wrong with a behaviour object's fields, or None."""
    if "context" not in obj:
        return 'missing field "context"'
    if not isinstance(obj["context"], str):
        return f'"context" must be a string, got {type(obj["context"]).__name__}'
    if "segments" not in obj:
        return 'missing field "segments"'
    segments = obj["segments"]
    if not isinstance(segments, list):
        return f'"segments" must be a list, got {type(segments).__name__}'
    if not segments:
        return '"segments" is empty: nothing to train'
    for i, seg in enumerate(segments):
        if not isinstance(seg, dict):
            return f"segments[{i}] must be an object, got {type(seg).__name__}"
        for key in ("prompt", "target"):
            if key not in seg:
                return f'segments[{i}]: missing field "{key}"'
            if not isinstance(seg[key], str):
                return f'segments[{i}]: "{key}" must be a string, got {type(seg[key]).__name__}'
        if not seg["target"]:
            return f'segments[{i}]: "target" is empty: nothing to train'
    return None


class _Tokeniser:
    """Tokenises text the same way for every file: BOS (when the tokenizer adds one) before each context/text."""

    def __init__(self, tokenizer: Any, limits: Limits) -> None:
        self.tok = tokenizer
        self.limits = limits
        bos = getattr(tokenizer, "bos_token_id", None)
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        self.prefix = [bos] if bos is not None and probe and probe[0] == bos else []
        self.eos = getattr(tokenizer, "eos_token_id", None)
        if limits.target_eos and self.eos is None:
            raise ValueError("target_eos was asked for but the tokenizer has no eos_token")

    def ids(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"]) if text else []

    def behaviour(self, line: int, obj: dict[str, Any]) -> BehaviourExample:
        """Tokenise a validated behaviour object; ValueError says what does not fit."""
        lim = self.limits
        context = self.prefix + self.ids(obj["context"])
        pieces = []
        for i, seg in enumerate(obj["segments"]):
            target = self.ids(seg["target"]) + ([self.eos] if lim.target_eos else [])
            if not target:
                raise ValueError(f"segments[{i}]: target tokenises to no tokens")
            pieces.append((self.ids(seg["prompt"]), target))
        # A segment's first token is never a target (labels are shifted inside the segment), so when
        # a prompt is empty the last context token moves into every segment to predict the target's
        # first token. The loss is unchanged; that one token is computed with gradients.
        if any(not prompt for prompt, _ in pieces):
            if len(context) < 2:
                raise ValueError("a segment has an empty prompt, so the context needs at least 2 tokens")
            carry, context = context[-1:], context[:-1]
            pieces = [(carry + prompt, target) for prompt, target in pieces]
        if not context:
            raise ValueError('"context" is empty (tokenises to no tokens)')
        if lim.max_context_tokens is not None and len(context) > lim.max_context_tokens:
            raise ValueError(f"context has {len(context)} tokens, more than the limit {lim.max_context_tokens}")
        segments = []
        for i, (prompt, target) in enumerate(pieces):
            n = len(prompt) + len(target)
            if lim.max_segment_tokens is not None and n > lim.max_segment_tokens:
                raise ValueError(f"segments[{i}] has {n} tokens, more than the limit {lim.max_segment_tokens}")
            if lim.max_positions is not None and len(context) + n > lim.max_positions:
                raise ValueError(
                    f"context ({len(context)} tokens) + segments[{i}] ({n} tokens) is longer than the model's "
                    f"max_position_embeddings ({lim.max_positions})"
                )
            ids = torch.tensor(prompt + target, dtype=torch.int64)
            labels = torch.tensor([IGNORE_INDEX] * len(prompt) + target, dtype=torch.int64)
            segments.append(Segment(ids, labels, len(target)))
        return BehaviourExample(line, torch.tensor(context, dtype=torch.int64), tuple(segments))

    def general(self, line: int, text: str) -> list[GeneralItem]:
        ids = self.prefix + self.ids(text)
        if len(ids) < 2:
            raise ValueError(f'"text" tokenises to {len(ids)} token(s): nothing to train (need at least 2)')
        chunk = self.limits.general_chunk_tokens
        stride = chunk - 1  # consecutive chunks share one token: it is the input of the next chunk's first target
        starts = range(0, max(1, len(ids) - 1), stride)
        return [GeneralItem(line, torch.tensor(ids[s : s + chunk], dtype=torch.int64)) for s in starts]


def _check_limits(limits: Limits) -> None:
    for name in ("max_positions", "max_context_tokens", "max_segment_tokens"):
        value = getattr(limits, name)
        if value is not None and (not isinstance(value, int) or value < 2):
            raise ValueError(f"{name} must be an integer >= 2 or None, got {value!r}")
    if not isinstance(limits.general_chunk_tokens, int) or limits.general_chunk_tokens < 2:
        raise ValueError(f"general_chunk_tokens must be an integer >= 2, got {limits.general_chunk_tokens!r}")


def load_behaviour(path: str | Path, tokenizer: Any, limits: Limits = Limits()) -> list[BehaviourExample]:
    """Parse, validate and tokenise a behaviour JSONL file; DataError lists every bad line."""
    _check_limits(limits)
    path = Path(path)
    errors, tok, examples = _Errors(path), _Tokeniser(tokenizer, limits), []
    for lineno, obj in _read_objects(path, errors):
        problem = _check_behaviour(obj)
        if problem:
            errors.add(lineno, problem)
            continue
        try:
            examples.append(tok.behaviour(lineno, obj))
        except ValueError as err:
            errors.add(lineno, str(err))
    errors.raise_if_any()
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty or has only blank lines)")
    return examples


def load_general(path: str | Path, tokenizer: Any, limits: Limits = Limits()) -> list[BehaviourExample | GeneralItem]:
    """Parse, validate and tokenise a general-data JSONL file ({"text"} lines or behaviour lines)."""
    _check_limits(limits)
    path = Path(path)
    errors, tok, items = _Errors(path), _Tokeniser(tokenizer, limits), []
    for lineno, obj in _read_objects(path, errors):
        has_text, has_behaviour = "text" in obj, "context" in obj or "segments" in obj
        try:
            if has_text and has_behaviour:
                raise ValueError('a line has either "text" or "context"/"segments", not both')
            if has_text:
                if not isinstance(obj["text"], str):
                    raise ValueError(f'"text" must be a string, got {type(obj["text"]).__name__}')
                items.extend(tok.general(lineno, obj["text"]))
            elif has_behaviour:
                problem = _check_behaviour(obj)
                if problem:
                    raise ValueError(problem)
                items.append(tok.behaviour(lineno, obj))
            else:
                raise ValueError('missing field "text" (or "context" and "segments")')
        except ValueError as err:
            errors.add(lineno, str(err))
    errors.raise_if_any()
    if not items:
        raise DataError(f"{path}: no examples (the file is empty or has only blank lines)")
    return items


def fingerprint(*pools: Sequence[BehaviourExample | GeneralItem]) -> str:
    """sha256 over every token id and label of the pools: resuming checks the data did not change."""
    h = hashlib.sha256()
    for pool in pools:
        h.update(f"pool:{len(pool)};".encode())
        for item in pool:
            if isinstance(item, GeneralItem):
                h.update(b"G" + item.input_ids.numpy().tobytes())
                continue
            h.update(b"B" + item.context_ids.numpy().tobytes())
            for seg in item.segments:
                h.update(b"S" + seg.input_ids.numpy().tobytes() + seg.labels.numpy().tobytes())
    return h.hexdigest()
