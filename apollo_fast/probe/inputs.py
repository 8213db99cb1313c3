"""What the probes read: models, held-out pairs, evaluation texts, contexts; each refused with a named error.

Pairs files are JSON Lines of {"prompt": ..., "desired": ..., "undesired": ...} (prompt optional;
strings or token-id lists), the format of `apollo-fast steer`. Evaluation texts are JSON Lines of
{"text": ...} or `apollo-fast train` behaviour lines ({"context", "segments"}). Context files are JSON
Lines of strings, id lists, {"text": ...}, {"ids": [...]} or {"context": ...}.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checks import check_output as shared_check_output
from ..checks import finite_number
from ..jsonl import iter_jsonl

__all__ = [
    "ProbeError",
    "MIN_ITEMS",
    "Pair",
    "ModelHandle",
    "open_model",
    "check_same_architecture",
    "check_supported",
    "load_pairs",
    "load_texts",
    "load_train",
    "load_contexts",
    "check_output",
    "check_finite",
]

# Fewer evaluation items than this give no usable bootstrap interval: refused by name.
MIN_ITEMS = 10
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ProbeError(ValueError):
    """Bad input to a probe; the message names the file, line or option."""


@dataclass(frozen=True)
class Pair:
    """Token ids of a held-out pair: the prompt (>= 1 token) and two different continuations."""

    prompt: list[int]
    desired: list[int]
    undesired: list[int]


def check_finite(name: str, value: float, *, positive: bool = False, minimum: float | None = None) -> float:
    """A finite float (> 0 with positive=True, >= minimum if given); ProbeError naming the option otherwise."""
    try:
        return finite_number(name, value, above=0.0 if positive else None, minimum=minimum)
    except ValueError as err:
        raise ProbeError(str(err)) from None


def check_supported(model: nn.Module) -> None:
    """ProbeError unless the frozen-context path supports the model (Qwen3.5, Qwen3-Next, Llama, Qwen3)."""
    from ..frozen import SUPPORTED_MODELS, encode_context

    name = type(model).__name__
    if name not in SUPPORTED_MODELS:
        raise ProbeError(
            f"apollo-fast probe: model class {name} is not supported (supported: {', '.join(SUPPORTED_MODELS)})"
        )
    device = next(model.parameters()).device
    try:  # a one-token encode surfaces the layer-level checks (sliding windows, conv layouts)
        encode_context(model, torch.zeros(1, 1, dtype=torch.long, device=device))
    except ValueError as err:
        raise ProbeError(f"apollo-fast probe: {err}") from None


class ModelHandle:
    """A model to probe, opened in two stages: config and tokenizer first (cheap: the data is checked against
    them before any weights are read), the weights on `load()`."""

    def __init__(self, source: str | os.PathLike | nn.Module, tokenizer: Any, device, dtype: str, what: str):
        if dtype not in DTYPES:
            raise ProbeError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
        self.what, self.device, self.dtype = what, device, dtype
        self._model = source if isinstance(source, nn.Module) else None
        if self._model is not None:
            check_supported(self._model)
            self.config, self.tokenizer, self.name = self._model.config, tokenizer, type(self._model).__name__
            return
        from transformers import AutoConfig, AutoTokenizer

        self.path = Path(source)
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"{what}: not a transformers model folder (no config.json): {self.path}")
        self.config, self.name = AutoConfig.from_pretrained(self.path), str(self.path)
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        from ..frozen import SUPPORTED_MODELS

        # The class AutoModelForCausalLM will build (a multimodal checkpoint's config still maps to its text LM);
        # unknown types are checked once loaded.
        cls = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(self.config, "model_type", None))
        if cls is not None and cls not in SUPPORTED_MODELS:
            raise ProbeError(
                f"{what} {self.path}: model class {cls} is not supported (supported: {', '.join(SUPPORTED_MODELS)})"
            )
        if tokenizer is None:
            try:
                tokenizer = AutoTokenizer.from_pretrained(self.path)
            except (OSError, ValueError, TypeError):
                tokenizer = None
        self.tokenizer = tokenizer

    @property
    def vocab(self) -> int:
        if self._model is not None:
            return int(self._model.get_input_embeddings().num_embeddings)
        return int(self.config.get_text_config().vocab_size)

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> nn.Module:
        """The model in eval mode (read from the folder on first use)."""
        if self._model is None:
            from transformers import AutoModelForCausalLM

            dev = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
            model = AutoModelForCausalLM.from_pretrained(self.path, dtype=DTYPES[self.dtype]).to(dev)
            check_supported(model)
            self._model = model
        return self._model.eval()

    def release(self) -> None:
        """Drop a model read from a folder (a module passed in stays the caller's)."""
        if hasattr(self, "path"):
            self._model = None


def open_model(
    model: str | os.PathLike | nn.Module,
    tokenizer: Any = None,
    *,
    device: str | torch.device | None = None,
    dtype: str = "auto",
    what: str = "model",
) -> ModelHandle:
    """A supported causal LM: a transformers folder (with its tokenizer) or a module; weights read on load()."""
    return ModelHandle(model, tokenizer, device, dtype, what)


def check_same_architecture(base: ModelHandle, trained: ModelHandle) -> None:
    """ProbeError unless the two models have the same architecture (type, sizes, layer kinds)."""
    keys = (
        "model_type",
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "layer_types",
        "num_attention_heads",
        "num_key_value_heads",
        "linear_num_value_heads",
        "linear_key_head_dim",
        "linear_value_head_dim",
    )
    a, b = base.config.get_text_config().to_dict(), trained.config.get_text_config().to_dict()
    diff = [k for k in keys if a.get(k) != b.get(k)]
    if diff:
        detail = ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in diff)
        raise ProbeError(f"base {base.name} and trained {trained.name} differ in architecture ({detail})")


def _read_jsonl(path: Path) -> list[tuple[int, Any]]:
    """(line number, value) for every non-blank line; ProbeError naming FILE:LINE for a line that is not JSON."""
    out = []
    for n, value, problem in iter_jsonl(path):
        if problem is not None:
            raise ProbeError(f"{path}:{n}: {problem}")
        out.append((n, value))
    return out


def _records(source: str | os.PathLike | Sequence[Any], kind: str) -> tuple[list[tuple[str, Any]], str]:
    """(where, record) for each line of a JSON Lines file or item of a list, and the name errors give the whole."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        return [(f"{path}:{n}", r) for n, r in _read_jsonl(path)], str(path)
    return [(f"{kind} {i}", r) for i, r in enumerate(source)], f"the {kind}s given"


def _ids(value: Any, tokenizer: Any, where: str, vocab: int, special: bool = False) -> list[int]:
    if isinstance(value, str):
        if tokenizer is None:
            raise ProbeError(f"{where}: text needs a tokenizer (the model folder has none): give token-id lists")
        return list(tokenizer(value, add_special_tokens=special)["input_ids"]) if value or special else []
    if isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        bad = [t for t in value if not 0 <= t < vocab]
        if bad:
            raise ProbeError(f"{where}: token ids {bad[:5]} outside the vocabulary [0, {vocab})")
        return list(value)
    raise ProbeError(f"{where}: expected a string or a list of token ids, got {type(value).__name__}")


def _check_count(n: int, source: str, minimum: int) -> None:
    if n == 0:
        raise ProbeError(f"{source} is empty: no evaluation items")
    if n < minimum:
        raise ProbeError(f"{source} has {n} items, too few for a confidence interval (need at least {minimum})")


def _split(prompt: list[int], desired: list[int], undesired: list[int]) -> Pair:
    """Move the continuations' common prefix into the prompt (it is not what the pair contrasts)."""
    n = 0
    while n < min(len(desired), len(undesired)) and desired[n] == undesired[n]:
        n += 1
    return Pair(prompt + desired[:n], desired[n:], undesired[n:])


def load_pairs(
    source: str | os.PathLike | Sequence[Any],
    model: ModelHandle,
    *,
    minimum: int = MIN_ITEMS,
) -> list[Pair]:
    """Held-out pairs from a JSON Lines file or a list of dicts / (prompt, desired, undesired) tuples.

    The prompt is encoded with the tokenizer's special tokens (e.g. BOS), continuations without, as
    `apollo-fast steer` does. Every pair needs a desired and an undesired continuation that differ after
    their common prefix, and a prompt of at least one token (the common prefix counts).
    """
    vocab, tokenizer = model.vocab, model.tokenizer
    records, name = _records(source, "pair")
    pairs = []
    for where, r in records:
        if isinstance(r, (tuple, list)) and len(r) == 3 and not isinstance(r[0], int):
            r = {"prompt": r[0], "desired": r[1], "undesired": r[2]}
        if not isinstance(r, dict):
            raise ProbeError(f"{where}: expected an object with desired and undesired, got {type(r).__name__}")
        missing = [k for k in ("desired", "undesired") if k not in r]
        if missing:
            raise ProbeError(
                f"{where}: pair without {' and '.join(missing)} (need desired, undesired, optional prompt)"
            )
        prompt = _ids(r["prompt"], tokenizer, where, vocab, special=True) if r.get("prompt") not in (None, "") else []
        pair = _split(
            prompt, _ids(r["desired"], tokenizer, where, vocab), _ids(r["undesired"], tokenizer, where, vocab)
        )
        if not pair.desired or not pair.undesired:
            raise ProbeError(f"{where}: desired and undesired are identical or one is a prefix of the other")
        if not pair.prompt:
            raise ProbeError(f"{where}: no prompt and no common first token: the first token cannot be scored")
        pairs.append(pair)
    _check_count(len(pairs), name, minimum)
    return pairs


def is_pairs_file(path: str | os.PathLike) -> bool:
    """True when the file's first record is a pair (has desired or undesired)."""
    for _, r in _read_jsonl(Path(path)):
        return isinstance(r, dict) and ("desired" in r or "undesired" in r)
    return False


def _limits(model: ModelHandle, **kw):
    from ..training.data import Limits, max_positions

    return Limits(max_positions=max_positions(model.config), **kw)


def load_texts(
    source: str | os.PathLike | Sequence[Any],
    model: ModelHandle,
    *,
    minimum: int = MIN_ITEMS,
    chunk_tokens: int = 1024,
) -> list[Any]:
    """Evaluation items for perplexity: a JSON Lines file of {"text"} and/or behaviour lines (the formats of
    `apollo-fast train --general`), or a list of GeneralItem / BehaviourExample."""
    from ..training.data import load_general

    if isinstance(source, (str, os.PathLike)):
        if model.tokenizer is None:
            raise ProbeError(f"{source}: text files need a tokenizer (the model folder has none)")
        items = load_general(source, model.tokenizer, _limits(model, general_chunk_tokens=chunk_tokens))
        _check_count(len(items), str(source), minimum)
        return items
    items = list(source)
    _check_count(len(items), "the evaluation items given", minimum)
    return items


def load_train(source: str | os.PathLike | Sequence[Any], model: ModelHandle) -> list[Any]:
    """Training examples: an `apollo-fast train --data` file (behaviour JSON Lines) or a list of BehaviourExample."""
    from ..training.data import load_behaviour

    if isinstance(source, (str, os.PathLike)):
        if model.tokenizer is None:
            raise ProbeError(f"{source}: training files need a tokenizer (the model folder has none)")
        return load_behaviour(source, model.tokenizer, _limits(model))
    items = list(source)
    if not items:
        raise ProbeError("no training examples given")
    return items


def load_contexts(
    source: str | os.PathLike | Sequence[Any], model: ModelHandle, *, minimum: int = MIN_ITEMS
) -> list[list[int]]:
    """Held-out contexts as token ids (>= 2 tokens: the last one is the token whose readout is measured)."""
    vocab, tokenizer = model.vocab, model.tokenizer
    records, name = _records(source, "context")
    out = []
    for where, r in records:
        if isinstance(r, dict):
            keys = [k for k in ("text", "ids", "context") if k in r]
            if not keys:
                raise ProbeError(f"{where}: expected a string, an id list, or an object with text, ids or context")
            r = r[keys[0]]
        ids = _ids(r, tokenizer, where, vocab, special=True)
        if len(ids) < 2:
            raise ProbeError(f"{where}: a context needs at least 2 tokens, got {len(ids)}")
        out.append(ids)
    _check_count(len(out), name, minimum)
    return out


def check_output(path: str | os.PathLike | None, *, overwrite: bool, folder: bool) -> None:
    """Refuse an existing output (unless overwrite) and an output location that cannot be written, before work:
    the package's one output rule (apollo_fast.checks.check_output) for --out (a folder) or --json (a file)."""
    if path is not None:
        shared_check_output(path, overwrite=overwrite, folder=folder, option="--out" if folder else "--json")
