"""Task vectors: tau = W_finetuned - W_base per tensor, in fp32, computed lazily one tensor at a time.

A `TaskVector` is a recipe: its names and shapes are known up front and each tensor is computed
when asked for (from two checkpoints, from a file, or from other vectors), so that arithmetic,
merging and saving touch one tensor at a time and work on models larger than memory.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checks import finite_number
from .io import parse_dtype, write_safetensors
from .sources import SafetensorsSource, model_identity, open_source

__all__ = [
    "TaskVector",
    "extract_task_vector",
    "add_vectors",
    "apply_task_vectors",
    "VOCAB_POLICIES",
    "DEFAULT_VOCAB_KEYS",
    "FORMAT",
]

FORMAT = "apollo_fast.task_vector"
VOCAB_POLICIES = ("error", "base")
# Tensors whose first dimension is the vocabulary: input embeddings and output heads.
DEFAULT_VOCAB_KEYS = r"(embed_tokens|lm_head|wte|word_embeddings|embed_out|output_embeddings?)\.weight$"


def _listing(items: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


class TaskVector:
    """A lazy mapping name -> fp32 tensor, with metadata (base model identity, method, dtype).

    Arithmetic: `a + b`, `a - b`, `-a`, `c * a`; `apply_to(model, coefficient)`; `save(path)`;
    `TaskVector.load(path)`. Each tensor is computed on access; `materialize()` keeps them in memory.
    """

    def __init__(
        self,
        shapes: dict[str, tuple[int, ...]],
        compute: Callable[[str], torch.Tensor],
        base_model: dict[str, Any] | None = None,
        method: dict[str, Any] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.shapes = {k: tuple(int(s) for s in v) for k, v in shapes.items()}
        self._compute = compute
        self.base_model = dict(base_model or {})
        self.method = dict(method or {"op": "custom"})
        self.dtype = dtype  # the precision the values were stored in (compute is always fp32)

    # mapping interface ------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def __contains__(self, key: object) -> bool:
        return key in self.shapes

    def __getitem__(self, key: str) -> torch.Tensor:
        """The fp32 tensor for `key` (shape `self.shapes[key]`), computed now."""
        if key not in self.shapes:
            raise KeyError(key)
        t = self._compute(key).float()
        if tuple(t.shape) != self.shapes[key]:
            raise ValueError(f"{key}: computed shape {tuple(t.shape)} != declared {self.shapes[key]}")
        return t

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for k in self.shapes:
            yield k, self[k]

    def numel(self) -> int:
        total = 0
        for shape in self.shapes.values():
            n = 1
            for s in shape:
                n *= s
            total += n
        return total

    @classmethod
    def from_tensors(
        cls,
        tensors: dict[str, torch.Tensor],
        base_model: dict[str, Any] | None = None,
        method: dict[str, Any] | None = None,
    ) -> TaskVector:
        """An in-memory vector from name -> tensor (stored as fp32 copies)."""
        data = {k: v.detach().float().clone() for k, v in tensors.items()}
        return cls(
            {k: tuple(v.shape) for k, v in data.items()}, data.__getitem__, base_model, method or {"op": "tensors"}
        )

    def materialize(self, progress: bool = False) -> TaskVector:
        """Compute every tensor once and keep them in memory (fp32)."""
        from tqdm.auto import tqdm

        data = {k: self[k] for k in tqdm(self.shapes, desc="materialize", disable=not progress)}
        return TaskVector(dict(self.shapes), data.__getitem__, self.base_model, self.method, self.dtype)

    def _derived(self, compute: Callable[[str], torch.Tensor], method: dict[str, Any]) -> TaskVector:
        return TaskVector(dict(self.shapes), compute, self.base_model, method)

    # arithmetic -------------------------------------------------------------------------------
    def __neg__(self) -> TaskVector:
        return self._derived(lambda k: -self[k], {"op": "negate", "input": self.method})

    def __mul__(self, c: float) -> TaskVector:
        if isinstance(c, bool) or not isinstance(c, (int, float)):
            return NotImplemented
        c = finite_number("task vector scale", c)
        return self._derived(lambda k: self[k] * c, {"op": "scale", "coefficient": c, "input": self.method})

    __rmul__ = __mul__

    def __add__(self, other: TaskVector) -> TaskVector:
        if not isinstance(other, TaskVector):
            return NotImplemented
        return add_vectors([self, other])

    def __sub__(self, other: TaskVector) -> TaskVector:
        if not isinstance(other, TaskVector):
            return NotImplemented
        return add_vectors([self, other], [1.0, -1.0])

    # persistence ------------------------------------------------------------------------------
    def metadata(self, dtype: torch.dtype) -> dict[str, str]:
        from .. import __version__

        return {
            "format": FORMAT,
            "format_version": "1",
            "apollo_fast_version": __version__,
            "dtype": str(dtype).replace("torch.", ""),
            "base_model": json.dumps(self.base_model, sort_keys=True, allow_nan=False),
            "method": json.dumps(self.method, sort_keys=True, allow_nan=False),
        }

    def save(
        self,
        path: str | os.PathLike,
        dtype: str | torch.dtype = "fp32",
        progress: bool = False,
        on_tensor: Callable[[str, torch.Tensor], None] | None = None,
    ) -> Path:
        """Stream the vector to one .safetensors file (atomic write); dtype 'fp32' | 'bf16' | 'fp16'."""
        from tqdm.auto import tqdm

        dt = parse_dtype(dtype)
        bar = tqdm(total=len(self.shapes), desc=f"write {Path(path).name}", disable=not progress, unit="tensor")

        def produce(k: str) -> torch.Tensor:
            t = self[k]
            bar.update(1)
            return t

        try:
            specs = [(k, s, dt) for k, s in self.shapes.items()]
            return write_safetensors(path, specs, produce, self.metadata(dt), on_tensor)
        finally:
            bar.close()

    @classmethod
    def load(cls, path: str | os.PathLike) -> TaskVector:
        """A lazy vector over a file written by `save` (tensors are read on access, returned in fp32)."""
        src = SafetensorsSource(path)
        meta = src.metadata
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not an apollo_fast task vector (metadata format={meta.get('format')!r})")
        shapes = {k: src.spec(k)[0] for k in src.keys()}
        dt = parse_dtype(meta.get("dtype", "float32"))
        return cls(
            shapes,
            lambda k: src.get(k).float(),
            json.loads(meta.get("base_model", "{}")),
            json.loads(meta.get("method", "{}")),
            dt,
        )

    # application ------------------------------------------------------------------------------
    def apply_to(self, model: nn.Module, coefficient: float = 1.0, check_base: str = "warn") -> nn.Module:
        """W <- W + coefficient * tau, in place (computed in fp32, stored in W's dtype)."""
        return apply_task_vectors(model, [self], [coefficient], check_base=check_base)

    def __repr__(self) -> str:
        return (
            f"TaskVector({len(self.shapes)} tensors, {self.numel():,} elements, "
            f"op={self.method.get('op')!r}, base={self.base_model.get('name')!r})"
        )


def _check_same_base(vectors: Sequence[TaskVector], what: str) -> None:
    prints = {v.base_model.get("fingerprint") for v in vectors} - {None}
    if len(prints) > 1:
        names = [v.base_model.get("name") for v in vectors]
        raise ValueError(
            f"{what}: the task vectors come from different base models {names} "
            f"(fingerprints {sorted(prints)}); combine vectors of one base model only"
        )


def _check_same_keys(vectors: Sequence[TaskVector], what: str) -> None:
    first = vectors[0]
    for i, v in enumerate(vectors[1:], start=1):
        if v.shapes == first.shapes:
            continue
        missing = sorted(set(first.shapes) - set(v.shapes))
        extra = sorted(set(v.shapes) - set(first.shapes))
        shape = sorted(
            f"{k}: {first.shapes[k]} vs {v.shapes[k]}"
            for k in set(first.shapes) & set(v.shapes)
            if first.shapes[k] != v.shapes[k]
        )
        parts = []
        if missing:
            parts.append(f"missing in vector {i}: {_listing(missing)}")
        if extra:
            parts.append(f"only in vector {i}: {_listing(extra)}")
        if shape:
            parts.append(f"shape mismatch: {_listing(shape)}")
        raise ValueError(f"{what}: vector 0 and vector {i} differ; " + "; ".join(parts))


def add_vectors(vectors: Sequence[TaskVector], weights: Sequence[float] | None = None) -> TaskVector:
    """sum_i weights[i] * vectors[i] (weights default to 1): task arithmetic."""
    vectors = list(vectors)
    if not vectors:
        raise ValueError("add_vectors needs at least one vector")
    weights = [1.0] * len(vectors) if weights is None else [finite_number("weight", w) for w in weights]
    if len(weights) != len(vectors):
        raise ValueError(f"{len(weights)} weights for {len(vectors)} vectors")
    _check_same_keys(vectors, "add")
    _check_same_base(vectors, "add")

    def compute(k: str) -> torch.Tensor:
        out = vectors[0][k] * weights[0]
        for w, v in zip(weights[1:], vectors[1:], strict=True):
            out.add_(v[k], alpha=w)
        return out

    method = {"op": "add", "weights": weights, "inputs": [v.method for v in vectors]}
    return TaskVector(dict(vectors[0].shapes), compute, vectors[0].base_model, method)


def extract_task_vector(
    base: Any,
    finetuned: Any,
    *,
    vocab_policy: str = "error",
    vocab_keys: str = DEFAULT_VOCAB_KEYS,
    base_name: str | None = None,
) -> TaskVector:
    """tau = finetuned - base for every floating-point tensor the two share (lazy, fp32).

    `base` / `finetuned`: models, state dicts, .safetensors files or checkpoint folders (sharded
    with an index json, or not). Integer and bool tensors (e.g. position ids) are skipped. A name
    present in only one of the two, or a shape mismatch, raises ValueError listing them, except
    for vocabulary tensors (names matching `vocab_keys`) whose shapes differ only in the first
    dimension, which `vocab_policy` decides:
      'error' (default): raise;
      'base': the vector has the base's shape; rows both have get W_ft - W_base, rows only the base
              has get 0, rows only the fine-tuned model has (added tokens) are dropped. Applying
              the vector to the base therefore never adds tokens.
    """
    if vocab_policy not in VOCAB_POLICIES:
        raise ValueError(f"vocab_policy must be one of {VOCAB_POLICIES}, got {vocab_policy!r}")
    b, f = open_source(base, base_name), open_source(finetuned)
    bkeys, fkeys = b.keys(), set(f.keys())
    only_b = sorted(k for k in bkeys if k not in fkeys and b.spec(k)[1].is_floating_point)
    only_f = sorted(k for k in fkeys if k not in set(bkeys) and f.spec(k)[1].is_floating_point)
    vocab_re = re.compile(vocab_keys)
    shapes: dict[str, tuple[int, ...]] = {}
    vocab_rows: dict[str, int] = {}
    skipped, bad_shape, vocab_mismatch = [], [], []
    for k in bkeys:
        if k not in fkeys:
            continue
        (bs, bd), (fs, fd) = b.spec(k), f.spec(k)
        if not (bd.is_floating_point and fd.is_floating_point):
            skipped.append(k)
            continue
        if bs != fs:
            if vocab_re.search(k) and len(bs) == len(fs) and len(bs) >= 1 and bs[1:] == fs[1:]:
                vocab_mismatch.append(f"{k}: base {bs} vs finetuned {fs}")
                vocab_rows[k] = min(bs[0], fs[0])
            else:
                bad_shape.append(f"{k}: base {bs} vs finetuned {fs}")
                continue
        shapes[k] = bs
    problems = []
    if only_b:
        problems.append(f"only in base: {_listing(only_b)}")
    if only_f:
        problems.append(f"only in finetuned: {_listing(only_f)}")
    if bad_shape:
        problems.append(f"shape mismatch: {_listing(bad_shape)}")
    if vocab_mismatch and vocab_policy == "error":
        problems.append(
            f"vocabulary size mismatch: {_listing(vocab_mismatch)} "
            "(pass vocab_policy='base' to keep the shared rows; see the docs)"
        )
    if problems:
        raise ValueError("base and finetuned checkpoints do not match: " + "; ".join(problems))

    def compute(k: str) -> torch.Tensor:
        if k in vocab_rows:
            r = vocab_rows[k]
            wb = b.get(k).float()
            out = torch.zeros_like(wb)
            out[:r] = f.get(k)[:r].float() - wb[:r]
            return out
        w = f.get(k)
        out = w.float()
        if out.data_ptr() == w.data_ptr():
            out = out.clone()  # already fp32 (e.g. a model's own parameter): never modify it in place
        return out.sub_(b.get(k))

    method = {"op": "extract", "finetuned": f.name, "vocab_policy": vocab_policy, "skipped_non_float": skipped}
    if vocab_rows:
        method["vocab_rows_kept"] = vocab_rows
    return TaskVector(shapes, compute, model_identity(b), method)


def _unique_storage(sd: dict[str, torch.Tensor]) -> dict[str, str]:
    """Map each key to the first key sharing its storage (tied weights are updated once)."""
    first: dict[tuple[int, int, tuple[int, ...]], str] = {}
    owner = {}
    for k, t in sd.items():
        sig = (t.data_ptr(), t.storage_offset(), tuple(t.shape))
        owner[k] = first.setdefault(sig, k)
    return owner


def _apply_arguments(
    vectors: Sequence[TaskVector], coefficients: Sequence[float] | None, check_base: str
) -> tuple[list[TaskVector], list[float]]:
    """Validated (vectors, coefficients) of an apply call; coefficients default to 1."""
    vectors = list(vectors)
    coefficients = [1.0] * len(vectors) if coefficients is None else coefficients
    coefficients = [finite_number("coefficient", c) for c in coefficients]
    if len(coefficients) != len(vectors):
        raise ValueError(f"{len(coefficients)} coefficients for {len(vectors)} vectors")
    if check_base not in ("warn", "error", "ignore"):
        raise ValueError(f"check_base must be 'warn', 'error' or 'ignore', got {check_base!r}")
    return vectors, coefficients


@torch.no_grad()
def apply_task_vectors(
    model: nn.Module,
    vectors: Sequence[TaskVector],
    coefficients: Sequence[float] | None = None,
    check_base: str = "warn",
) -> nn.Module:
    """In place: W <- W + sum_i c_i tau_i for every tensor in the vectors (fp32 math, W's dtype kept).

    Names in a vector that the model lacks, or shape mismatches, raise ValueError before anything
    changes. Tensors tied to another (shared storage, e.g. tied embeddings) are updated once, from
    the first name. `check_base`: 'warn' | 'error' | 'ignore' when the model's fingerprint differs
    from the vectors' base model (applying to a sibling fine-tune is legitimate, hence 'warn').
    """
    vectors, coefficients = _apply_arguments(vectors, coefficients, check_base)
    if not vectors:
        return model
    sd = model.state_dict(keep_vars=True)
    problems = []
    for i, v in enumerate(vectors):
        missing = sorted(k for k in v.shapes if k not in sd)
        if missing:
            problems.append(f"vector {i} has tensors the model lacks: {_listing(missing)}")
        bad = sorted(
            f"{k}: vector {v.shapes[k]} vs model {tuple(sd[k].shape)}"
            for k in v.shapes
            if k in sd and tuple(sd[k].shape) != v.shapes[k]
        )
        if bad:
            problems.append(f"vector {i} shape mismatch: {_listing(bad)}")
    if problems:
        raise ValueError("cannot apply task vector: " + "; ".join(problems))
    if check_base != "ignore":
        ident = model_identity(open_source(model))
        for i, v in enumerate(vectors):
            fp = v.base_model.get("fingerprint")
            if fp and fp != ident["fingerprint"]:
                msg = (
                    f"task vector {i} was extracted from base {v.base_model.get('name')!r} (fingerprint {fp}); "
                    f"the model's fingerprint is {ident['fingerprint']}"
                )
                if check_base == "error":
                    raise ValueError(msg)
                warnings.warn(msg, stacklevel=2)
    owner = _unique_storage({k: t for k, t in sd.items()})
    keys = dict.fromkeys(k for v in vectors for k in v.shapes)
    for k in keys:
        if owner[k] != k and owner[k] in keys:
            continue  # tied to an earlier name: updated there
        w = sd[k]
        delta = torch.zeros(w.shape, dtype=torch.float32, device="cpu")
        for c, v in zip(coefficients, vectors, strict=True):
            if k in v.shapes:
                delta.add_(v[k], alpha=c)
        w.copy_((w.float() + delta.to(w.device)).to(w.dtype))
    return model
