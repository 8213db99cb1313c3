"""The official apollo-torch 1.0.3 optimizer, loaded as a test oracle without its package import.

`import apollo_torch` pulls in bitsandbytes; only apollo.py and its two projector modules are
needed, so they are loaded from the installed package folder under a private package name.
The official code is CC-BY-NC: it is only ever run here, never copied.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest

_PKG = "_apollo_torch_oracle"


def official_apollo_class():
    """apollo_torch.apollo.AdamW, or skip the test when apollo-torch is not installed."""
    if f"{_PKG}.apollo" in sys.modules:
        return sys.modules[f"{_PKG}.apollo"].AdamW
    spec = importlib.util.find_spec("apollo_torch")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("apollo-torch 1.0.3 (the test oracle) is not installed: pip install -e '.[test]'")
    folder = Path(next(iter(spec.submodule_search_locations)))
    pkg = types.ModuleType(_PKG)
    pkg.__path__ = [str(folder)]
    sys.modules[_PKG] = pkg
    for name in ("svd_projector", "random_projector", "apollo"):
        mspec = importlib.util.spec_from_file_location(f"{_PKG}.{name}", folder / f"{name}.py")
        module = importlib.util.module_from_spec(mspec)
        sys.modules[f"{_PKG}.{name}"] = module
        mspec.loader.exec_module(module)
    return sys.modules[f"{_PKG}.apollo"].AdamW
