"""Apply task vectors to a checkpoint folder, streaming: base + sum_i c_i tau_i written as a new checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..atomic import atomic_dir
from .io import write_sharded
from .sources import SafetensorsSource, model_identity
from .task_vector import TaskVector, _apply_arguments, _listing

__all__ = ["apply_to_checkpoint"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def apply_to_checkpoint(
    base: str | os.PathLike,
    out: str | os.PathLike,
    vectors: Sequence[TaskVector],
    coefficients: Sequence[float] | None = None,
    *,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
    check_base: str = "warn",
    progress: bool = False,
    on_tensor: Callable[[str, torch.Tensor], None] | None = None,
) -> Path:
    """Write `out` = base checkpoint + sum_i c_i * tau_i, one tensor at a time (fp32 math, base dtypes kept).

    Tensors the vectors do not cover (integer buffers, anything skipped) are copied unchanged.
    Non-weight files of the base folder (config.json, tokenizer files, ...) are copied. The output
    folder appears atomically (built under a temporary name, then renamed).
    """
    base = Path(base)
    src = SafetensorsSource(base)
    vectors, coefficients = _apply_arguments(vectors, coefficients, check_base)
    keys = src.keys()
    specs = {k: src.spec(k) for k in keys}
    problems = []
    for i, v in enumerate(vectors):
        missing = sorted(k for k in v.shapes if k not in specs)
        if missing:
            problems.append(f"vector {i} has tensors the checkpoint lacks: {_listing(missing)}")
        bad = sorted(
            f"{k}: vector {v.shapes[k]} vs checkpoint {specs[k][0]}"
            for k in v.shapes
            if k in specs and specs[k][0] != v.shapes[k]
        )
        if bad:
            problems.append(f"vector {i} shape mismatch: {_listing(bad)}")
    if problems:
        raise ValueError(f"cannot apply task vectors to {base}: " + "; ".join(problems))
    if check_base != "ignore":
        fp = model_identity(src)["fingerprint"]
        for i, v in enumerate(vectors):
            vfp = v.base_model.get("fingerprint")
            if vfp and vfp != fp:
                msg = f"task vector {i} was extracted from {v.base_model.get('name')!r} ({vfp}), not from {base} ({fp})"
                if check_base == "error":
                    raise ValueError(msg)
                warnings.warn(msg, stacklevel=2)

    from tqdm.auto import tqdm

    bar = tqdm(total=len(keys), desc="apply", unit="tensor", disable=not progress)

    def produce(k: str) -> torch.Tensor:
        w = src.get(k)
        hits = [(c, v) for c, v in zip(coefficients, vectors, strict=True) if k in v.shapes]
        if hits:
            acc = w.float()
            for c, v in hits:
                acc.add_(v[k], alpha=c)
            w = acc.to(w.dtype)
        bar.update(1)
        return w

    meta = {
        "format": "pt",
        "apollo_fast": json.dumps(
            {"op": "apply", "coefficients": coefficients, "vectors": [v.method for v in vectors]}, allow_nan=False
        ),
    }
    try:
        with atomic_dir(out, overwrite=overwrite) as tmp:
            for f in base.iterdir():
                if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES) and f.name != "model.safetensors.index.json":
                    shutil.copy2(f, tmp / f.name)
            write_sharded(
                tmp,
                [(k, specs[k][0], specs[k][1]) for k in keys],
                produce,
                meta,
                max_shard_bytes=max_shard_bytes,
                on_tensor=on_tensor,
            )
    finally:
        bar.close()
    return Path(out)
