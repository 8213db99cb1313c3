"""Where an operation runs: the one rule every operation of the package follows.

Every op that has a Triton implementation takes ``backend=`` with the same three names:

    "reference"  plain PyTorch (the readable implementation; any device, any float dtype)
    "triton"     the Triton kernels: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (tests)
    "auto"       "triton" when every tensor is on a CUDA device, triton is installed and the op's
                 kernels cover the call; "reference" otherwise. CPU tensors never reach Triton
                 under "auto", interpreter or not.

An explicit "triton" that cannot run raises ValueError with the reason; it never falls back.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable

import torch

__all__ = ["BACKENDS", "resolve_backend", "triton_usable"]

BACKENDS = ("auto", "reference", "triton")


def triton_usable(device: torch.device) -> bool:
    """True when Triton can run kernels on tensors of `device`: CUDA, or the CPU under TRITON_INTERPRET=1."""
    if importlib.util.find_spec("triton") is None:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(requested: str, devices: Iterable[torch.device], *, op: str, unsupported: str | None = None) -> str:
    """The backend that runs `op` ("reference" or "triton") for tensors on `devices`.

    unsupported: None when the op's kernels cover this call, else the reason they do not (e.g. "fp64
    inputs"); "auto" then takes the reference and an explicit "triton" raises with that reason.
    """
    if requested not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "reference":
        return "reference"
    devices = set(devices)
    if requested == "auto":
        on_cuda = bool(devices) and all(d.type == "cuda" for d in devices)
        return "triton" if on_cuda and unsupported is None and triton_usable(next(iter(devices))) else "reference"
    if importlib.util.find_spec("triton") is None:
        raise ValueError(f"{op}: backend='triton' needs the triton package (pip install triton)")
    bad = sorted(str(d) for d in devices if not triton_usable(d))
    if bad:
        raise ValueError(
            f"{op}: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {bad}"
        )
    if unsupported is not None:
        raise ValueError(f"{op}: backend='triton' does not support {unsupported}; use backend='reference'")
    return "triton"
