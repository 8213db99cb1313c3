"""Record the Triton launches a piece of code makes (under the interpreter), as compile jobs for another target.

`record(modules)` swaps every `_..._kernel` of the given kernel modules for a proxy that notes the argument
types, constexprs and launch options of each launch, then launches the real kernel. `to_jobs` turns the notes
into JSON-ready signatures that `aot_compile_sm90.py --jobs FILE` compiles for sm_90 (TRITON_INTERPRET=0).
So the ahead-of-time compile check covers exactly the specialisations the code really launches.
"""

from __future__ import annotations

import contextlib
import inspect
from types import ModuleType

import torch
import triton.language as tl

_TORCH_TO_TRITON = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "i1",
}
_OPTIONS = ("num_warps", "num_stages", "maxnreg")


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TORCH_TO_TRITON[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot record an argument of type {type(value).__name__}")


def _constexpr(value):
    """A JSON-ready constexpr: tl dtypes as 'tl.<name>', the rest as is."""
    if isinstance(value, tl.dtype):
        return f"tl.{value.name}"
    return value


class _Proxy:
    def __init__(self, kernel, jobs: list) -> None:
        self._kernel, self._jobs = kernel, jobs
        fn = getattr(kernel, "fn", kernel)
        params = inspect.signature(fn).parameters
        self._params = list(params)
        self._constexpr = {n for n, p in params.items() if "constexpr" in str(p.annotation)}

    def __getattr__(self, name):
        return getattr(self._kernel, name)

    def __getitem__(self, grid):
        launch = self._kernel[grid]

        def run(*args, **kwargs):
            bound = dict(zip(self._params, args, strict=False))
            bound.update({k: v for k, v in kwargs.items() if k not in _OPTIONS})
            signature, constexprs = {}, {}
            for name in self._params:
                value = bound.get(name)
                if name in self._constexpr or value is None:
                    signature[name] = "constexpr"
                    constexprs[name] = _constexpr(value)
                else:
                    signature[name] = _arg_type(value)
            options = {k: kwargs[k] for k in _OPTIONS if k in kwargs}
            self._jobs.append(
                {"kernel": self._name, "signature": signature, "constexprs": constexprs, "options": options}
            )
            return launch(*args, **kwargs)

        return run


@contextlib.contextmanager
def record(modules: list[ModuleType]):
    """Within the block, every `_*_kernel` launch of `modules` is noted in the yielded list (then launched)."""
    jobs: list = []
    saved = []
    for mod in modules:
        for name, obj in list(vars(mod).items()):
            if name.startswith("_") and name.endswith("_kernel") and hasattr(obj, "__getitem__"):
                proxy = _Proxy(obj, jobs)
                proxy._name = f"{mod.__name__}.{name}"
                saved.append((mod, name, obj))
                setattr(mod, name, proxy)
    try:
        yield jobs
    finally:
        for mod, name, obj in saved:
            setattr(mod, name, obj)


def unique(jobs: list) -> list:
    """One job per distinct (kernel, signature, constexprs, options)."""
    seen, out = set(), []
    for job in jobs:
        key = repr(
            (
                job["kernel"],
                sorted(job["signature"].items()),
                sorted(job["constexprs"].items(), key=str),
                sorted(job["options"].items()),
            )
        )
        if key not in seen:
            seen.add(key)
            out.append(job)
    return out
