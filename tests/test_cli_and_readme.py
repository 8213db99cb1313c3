"""The README's Python examples run, and the demo (the README's main job) works.

README blocks fenced `python` run everywhere; `python gpu` blocks run where CUDA is present;
`python files` blocks use files the reader brings (a model folder, JSONL data) and are shown only:
the API they call is exercised by the feature's own tests. `python vllm` blocks start a vLLM engine:
tests/test_serving_readme.py runs them, each in a fresh process.
"""

import re
from pathlib import Path

import pytest
import torch

from apollo_fast.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python( [\w-]+)?\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def _run(code: str, where: str) -> None:
    try:
        exec(compile(code, where, "exec"), {"__name__": "readme"})
    except Exception as err:  # noqa: BLE001 - name the failing block
        raise AssertionError(f"{where} failed: {err!r}\n{code}") from err


def test_readme_has_examples():
    kinds = [tag.strip() for tag, _ in BLOCKS]
    assert kinds.count("") >= 3, "README should show runnable python examples"
    assert set(kinds) <= {"", "gpu", "files", "vllm"}, f"unknown README block tags: {set(kinds)}"


@pytest.mark.parametrize("index", [i for i, (tag, _) in enumerate(BLOCKS) if tag.strip() == ""])
def test_readme_python_example_runs(index):
    _run(BLOCKS[index][1], f"README.md python block {index}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("index", [i for i, (tag, _) in enumerate(BLOCKS) if tag.strip() == "gpu"])
def test_readme_gpu_example_runs(index):
    _run(BLOCKS[index][1], f"README.md python gpu block {index}")


def test_demo_command_runs(capsys):
    assert main(["demo", "--steps", "3", "--batch-size", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for name in ("APOLLO", "APOLLO-Mini", "AdamW", "final loss", "optimizer state"):
        assert name in out


def test_demo_rejects_bad_steps(capsys):
    assert main(["demo", "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
