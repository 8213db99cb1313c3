"""The README's Python examples run, and the demo (the README's main job) works."""

import re
from pathlib import Path

from apollo_fast.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python examples"
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"README.md python block {i}", "exec"), {"__name__": "readme"})
        except Exception as err:  # noqa: BLE001 - name the failing block
            raise AssertionError(f"README python block {i} failed: {err!r}\n{code}") from err


def test_demo_command_runs(capsys):
    assert main(["demo", "--steps", "3", "--batch-size", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for name in ("APOLLO", "APOLLO-Mini", "AdamW", "final loss", "optimizer state"):
        assert name in out


def test_demo_rejects_bad_steps(capsys):
    assert main(["demo", "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
