"""Streaming safetensors writing: one tensor in memory at a time, each file written atomically (apollo_fast.atomic).

safetensors layout: 8-byte little-endian header length N, N bytes of JSON header
({name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}), then the raw tensor bytes.
Writing the header first needs only the shapes and dtypes, so a lazy producer can stream the data.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from ..atomic import atomic_file, atomic_write_text

__all__ = [
    "DTYPE_CODES",
    "CODE_DTYPES",
    "write_safetensors",
    "write_sharded",
    "parse_dtype",
]

DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
_NAMED = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}

Spec = tuple[str, tuple[int, ...], torch.dtype]


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """'fp32' | 'bf16' | 'fp16' (or a torch float dtype) -> torch.dtype."""
    if isinstance(name, torch.dtype):
        if name not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"storage dtype must be float32, float16 or bfloat16, got {name}")
        return name
    if name not in _NAMED:
        raise ValueError(f"unknown dtype {name!r}: use one of {sorted(_NAMED)}")
    return _NAMED[name]


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


def _header(specs: list[Spec], metadata: dict[str, str] | None) -> bytes:
    header: dict[str, object] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise TypeError(f"safetensors metadata must map str to str; bad keys: {bad}")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, shape, dtype in specs:
        if dtype not in DTYPE_CODES:
            raise TypeError(f"{name}: dtype {dtype} cannot be stored in safetensors")
        size = _nbytes(shape, dtype)
        header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned


def _write_stream(f, specs: list[Spec], produce: Callable[[str], torch.Tensor], metadata, on_tensor) -> None:
    head = _header(specs, metadata)
    f.write(struct.pack("<Q", len(head)))
    f.write(head)
    for name, shape, dtype in specs:
        t = produce(name)
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name}: produced shape {tuple(t.shape)}, declared {tuple(shape)}")
        t = t.detach().to(device="cpu", dtype=dtype).contiguous()
        if on_tensor is not None:
            on_tensor(name, t)
        if t.numel():
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)


def write_safetensors(
    path: str | os.PathLike,
    specs: Iterable[Spec],
    produce: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
    on_tensor: Callable[[str, torch.Tensor], None] | None = None,
) -> Path:
    """Write tensors (name, shape, dtype) one at a time from `produce(name)` to `path`, atomically.

    The file appears complete or not at all (apollo_fast.atomic.atomic_file: temporary file, fsync,
    rename, fsync of the folder). `on_tensor(name, tensor)` sees each tensor as stored.
    """
    path = Path(path)
    specs = list(specs)
    names = [s[0] for s in specs]
    if len(set(names)) != len(names):
        raise ValueError("duplicate tensor names in safetensors specs")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "wb") as f:
        _write_stream(f, specs, produce, metadata, on_tensor)
    return path


def _shards(specs: list[Spec], max_shard_bytes: int) -> list[list[Spec]]:
    shards: list[list[Spec]] = [[]]
    size = 0
    for spec in specs:
        n = _nbytes(spec[1], spec[2])
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += n
    return shards


def write_sharded(
    folder: str | os.PathLike,
    specs: Iterable[Spec],
    produce: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
    max_shard_bytes: int = 5 * 2**30,
    on_tensor: Callable[[str, torch.Tensor], None] | None = None,
    progress: Iterator | None = None,
) -> list[Path]:
    """Write a Hugging Face style checkpoint: model.safetensors, or model-0000k-of-0000n.safetensors + index json.

    Writes into an existing folder (use apollo_fast.atomic.atomic_dir to make the whole folder appear atomically).
    """
    folder = Path(folder)
    specs = list(specs)
    shards = _shards(specs, max_shard_bytes)
    if len(shards) == 1:
        return [write_safetensors(folder / "model.safetensors", shards[0], produce, metadata, on_tensor)]
    paths, weight_map, total = [], {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        paths.append(write_safetensors(folder / name, shard, produce, metadata, on_tensor))
        for spec in shard:
            weight_map[spec[0]] = name
            total += _nbytes(spec[1], spec[2])
    index = {"metadata": {"total_size": total, **(metadata or {})}, "weight_map": weight_map}
    idx = folder / "model.safetensors.index.json"
    atomic_write_text(idx, json.dumps(index, indent=2, allow_nan=False))
    return paths
