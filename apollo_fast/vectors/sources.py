"""Lazy tensor sources: a model, a state dict, or a safetensors checkpoint (file or sharded folder).

A source lists its tensors' names, shapes and dtypes without loading them, and loads one tensor
on request, so task-vector work holds only a few tensors in memory at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from .io import CODE_DTYPES

__all__ = ["TensorSource", "StateDictSource", "SafetensorsSource", "open_source", "model_identity"]


@runtime_checkable
class TensorSource(Protocol):
    """Names, shapes and dtypes up front; one tensor loaded per `get`."""

    name: str
    config: dict[str, Any]

    def keys(self) -> list[str]: ...

    def spec(self, key: str) -> tuple[tuple[int, ...], torch.dtype]: ...

    def get(self, key: str) -> torch.Tensor: ...

    def head(self, key: str) -> torch.Tensor: ...


class StateDictSource:
    """A model's state dict (or any name -> tensor mapping) as a source; tensors are not copied."""

    def __init__(self, obj: nn.Module | dict[str, torch.Tensor], name: str | None = None) -> None:
        if isinstance(obj, nn.Module):
            cfg = getattr(obj, "config", None)
            self.config = cfg.to_dict() if hasattr(cfg, "to_dict") else {}
            if not self.config.get("architectures"):
                self.config["architectures"] = [type(obj).__name__]
            self._sd = obj.state_dict()
            default = str(self.config.get("_name_or_path") or "") or type(obj).__name__
        elif isinstance(obj, dict):
            bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
            if bad:
                raise TypeError(f"state dict values must be tensors; not tensors: {bad[:10]}")
            self.config, self._sd, default = {}, obj, "state_dict"
        else:
            raise TypeError(f"expected an nn.Module or a dict of tensors, got {type(obj).__name__}")
        self.name = name or default

    def keys(self) -> list[str]:
        return list(self._sd.keys())

    def spec(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        t = self._sd[key]
        return tuple(t.shape), t.dtype

    def get(self, key: str) -> torch.Tensor:
        return self._sd[key].detach()

    def head(self, key: str) -> torch.Tensor:
        """The first row (first element of a 1-D tensor), for fingerprints."""
        t = self._sd[key].detach()
        return t.reshape(1) if t.dim() == 0 else t[:1]


class _SafetensorsFile:
    """One .safetensors file read with plain positioned reads (no mmap).

    Reading into freshly allocated tensors keeps the process's resident memory at the tensors it
    holds: mmap'ed pages of multi-GB checkpoints would otherwise count towards it as they are touched.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError(f"{path}: not a safetensors file (too short)")
            n = struct.unpack("<Q", raw)[0]
            if n > size - 8:
                raise ValueError(f"{path}: not a safetensors file (header length {n} > file size)")
            raw_header = f.read(n)
        try:
            header = json.loads(raw_header)
            self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
            entries = {}
            for key, e in header.items():
                start, end = (int(x) for x in e["data_offsets"])
                entries[key] = (e["dtype"], tuple(int(x) for x in e["shape"]), start, end)
        except (ValueError, KeyError, TypeError, AttributeError) as err:  # junk bytes, or JSON of another shape
            raise ValueError(f"{path}: not a safetensors file (unreadable header: {type(err).__name__})") from None
        self.base = 8 + n
        self.entries: dict[str, tuple[tuple[int, ...], torch.dtype, int, int]] = {}
        for key, (code, shape, start, end) in entries.items():
            if code not in CODE_DTYPES:
                raise TypeError(f"{path}: tensor {key!r} has unsupported dtype {code}")
            dtype = CODE_DTYPES[code]
            numel = 1
            for x in shape:
                numel *= x
            if end - start != numel * torch.empty((), dtype=dtype).element_size() or self.base + end > size:
                raise ValueError(f"{path}: tensor {key!r} has inconsistent offsets {[start, end]}")
            self.entries[key] = (shape, dtype, start, end)
        self._fd = os.open(path, os.O_RDONLY)

    def read(self, key: str, rows: int | None = None) -> torch.Tensor:
        """The tensor, or only its first `rows` rows."""
        shape, dtype, start, end = self.entries[key]
        if rows is not None and len(shape) >= 1:
            shape = (min(rows, shape[0]),) + shape[1:]
        out = torch.empty(shape, dtype=dtype)
        if out.numel() == 0:
            return out
        buf = memoryview(out.reshape(-1).view(torch.uint8).numpy()).cast("B")
        pos, done = self.base + start, 0
        while done < len(buf):
            if hasattr(os, "preadv"):
                n = os.preadv(self._fd, [buf[done:]], pos + done)
            else:  # no preadv (e.g. Windows): read, then copy
                data = os.pread(self._fd, min(len(buf) - done, 1 << 28), pos + done)
                n = len(data)
                buf[done : done + n] = data
            if n <= 0:
                raise OSError(f"{self.path}: unexpected end of file reading {key!r}")
            done += n
        return out

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return obj


class SafetensorsSource:
    """A .safetensors file, or a folder of them (sharded with model.safetensors.index.json, or not)."""

    def __init__(self, path: str | os.PathLike, name: str | None = None) -> None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no such checkpoint: {path}")
        self.config = {}
        if path.is_dir():
            cfg = path / "config.json"
            if cfg.exists():
                self.config = _read_json(cfg)
            index = path / "model.safetensors.index.json"
            if index.exists():
                weight_map = _read_json(index).get("weight_map")
                if not isinstance(weight_map, dict):
                    raise ValueError(f"{index}: no weight_map")
                files = sorted({path / f for f in weight_map.values()})
            else:
                files = sorted(path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no .safetensors files in {path}")
        else:
            files = [path]
        self._where: dict[str, _SafetensorsFile] = {}
        self.metadata: dict[str, str] = {}
        for f in files:
            handle = _SafetensorsFile(f)
            self.metadata.update(handle.metadata)
            for k in handle.entries:
                if k in self._where:
                    raise ValueError(f"{path}: tensor {k!r} appears in more than one shard")
                self._where[k] = handle
        self.path = path
        self.name = name or str(self.config.get("_name_or_path") or "") or str(path)

    def keys(self) -> list[str]:
        return list(self._where.keys())

    def spec(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        shape, dtype, _, _ = self._where[key].entries[key]
        return shape, dtype

    def get(self, key: str) -> torch.Tensor:
        return self._where[key].read(key)

    def head(self, key: str) -> torch.Tensor:
        """The first row (first element of a 0-dim tensor), for fingerprints."""
        t = self._where[key].read(key, rows=1)
        return t.reshape(1) if t.dim() == 0 else t


def open_source(obj: Any, name: str | None = None) -> TensorSource:
    """A model, a state dict, a path to a .safetensors file or checkpoint folder, or a source -> a source."""
    if isinstance(obj, (StateDictSource, SafetensorsSource)):
        return obj
    if isinstance(obj, (nn.Module, dict)):
        return StateDictSource(obj, name)
    if isinstance(obj, (str, os.PathLike)):
        return SafetensorsSource(obj, name)
    if isinstance(obj, TensorSource):
        return obj
    raise TypeError(f"cannot read tensors from {type(obj).__name__}: pass a model, a state dict or a path")


def model_identity(src: TensorSource) -> dict[str, Any]:
    """Name, architecture and a fingerprint (tensor names, shapes and first rows in fp32) of a model.

    The fingerprint ignores the storage dtype, so a bf16 checkpoint and the same weights loaded
    in fp32 agree; reading it costs one row per tensor.
    """
    h = hashlib.sha256()
    n_el = 0
    for key in sorted(src.keys()):
        shape, dtype = src.spec(key)
        h.update(key.encode())
        h.update(repr(tuple(shape)).encode())
        if dtype.is_floating_point:
            h.update(src.head(key).reshape(-1)[:64].float().numpy().tobytes())
            n = 1
            for s in shape:
                n *= s
            n_el += n
    cfg = src.config or {}
    return {
        "name": src.name,
        "architectures": list(cfg.get("architectures") or []),
        "hidden_size": cfg.get("hidden_size"),
        "num_hidden_layers": cfg.get("num_hidden_layers"),
        "vocab_size": cfg.get("vocab_size"),
        "num_float_elements": n_el,
        "fingerprint": h.hexdigest()[:32],
    }
