"""Test set-up: without a GPU, Triton kernels run under the interpreter on the CPU.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection,
before any test module imports a kernel.

Every test starts from global RNG seeds derived from its own id, so a run is reproducible and a
failure can be replayed alone. APOLLO_FAST_TEST_SEED=N shifts every seed: running the suite with
several N draws fresh inputs for every test (how tolerances are checked against flakiness).
"""

import os
import random
import zlib

if not os.path.exists("/dev/nvidia0") and not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

_SEED_SHIFT = int(os.environ.get("APOLLO_FAST_TEST_SEED", "0"))


@pytest.fixture(autouse=True)
def _seed_global_rngs(request):
    seed = (zlib.crc32(request.node.nodeid.encode()) + 1_000_003 * _SEED_SHIFT) % 2**31
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine with `pytest -m gpu`)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
