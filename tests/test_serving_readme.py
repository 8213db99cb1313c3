"""The README's `python vllm` blocks run, each in a fresh Python process (an in-process vLLM engine
changes process-wide state: threads, torch.distributed), in a temporary folder, with a hard timeout."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from serving_fixtures import skip_without_vllm

skip_without_vllm()

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python vllm\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_has_a_vllm_example():
    assert BLOCKS, "README should show a runnable serving example (a ```python vllm block)"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_vllm_example_runs(index, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKS[index]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, (
        f"README.md python vllm block {index} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    assert "served 9" in proc.stdout
