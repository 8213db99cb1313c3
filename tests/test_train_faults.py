"""Fault injection on `apollo-fast train`, run as a user runs it: a child process, real SIGKILL / SIGINT
at moments found by polling the run folder, damaged checkpoints, two runs on one folder.

After every fault the run is continued with `--resume` (or rerun) and must end on the weights and
loss history of an uninterrupted run, bit for bit, with no temporary file left. The children pause
at each commit point of a write (APOLLO_FAST_TEST_PAUSE_S), so the kill lands exactly where the
file system shows it (asserted after each kill).
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from cli_subprocess import run_cli, start_cli
from train_fixtures import copy_behaviour, general_texts, make_model_dir, write_jsonl

from apollo_fast.training.checkpoint import CHECKPOINT_DIR, MODEL_FILE, STATE_FILE, verify_checkpoint

PAUSE = 0.4  # seconds at each commit point of a paused child: the window in which the test kills it


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama with dropout (a resume must restore the RNG), mixed data, and an uninterrupted run."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("faults")
    model = make_model_dir(root, "llama", seed=1)
    m = AutoModelForCausalLM.from_pretrained(model)
    m.config.attention_dropout = 0.1
    m.save_pretrained(model)
    data = write_jsonl(root / "b.jsonl", copy_behaviour(6, seed=3))
    general = write_jsonl(root / "g.jsonl", general_texts(5))
    args = ["train", "--model", model, "--data", data, "--general", general, "--general-fraction", "0.3",
            "--steps", "6", "--grad-accum", "2", "--lr", "5e-3", "--rank", "4", "--lr-schedule", "cosine",
            "--warmup-steps", "2", "--checkpoint-every", "2", "--seed", "5", "--no-progress"]  # fmt: skip
    whole = root / "whole"
    done = run_cli(*args, "--out", whole)
    assert done.returncode == 0, done.stderr
    return {"root": root, "args": args, "whole": whole}


def start(setup, out: Path, *extra: object, pause: float = PAUSE):
    logs = out.parent / f"logs-{out.name}-{len(list(out.parent.glob(f'logs-{out.name}-*')))}"
    env = {"APOLLO_FAST_TEST_PAUSE_S": pause} if pause else {}
    return start_cli(*setup["args"], "--out", out, *extra, logs=logs, **env)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def temps(folder: Path) -> list[str]:
    return [n for n in names(folder) if n.startswith(".tmp-")]


def step_dirs(out: Path) -> list[str]:
    return [n for n in names(out / CHECKPOINT_DIR) if n.startswith("step-")]


def assert_matches_uninterrupted(setup, out: Path) -> None:
    from safetensors.torch import load_file

    want, got = (load_file(d / "model" / "model.safetensors") for d in (setup["whole"], out))
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), f"{name} differs from the uninterrupted run"
    a, b = (list(csv.DictReader((d / "loss.csv").open())) for d in (setup["whole"], out))
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and len(b) == 6
    assert temps(out) == [] and temps(out / CHECKPOINT_DIR) == [], "temporary files left behind"


def test_sigkill_during_the_first_checkpoint_write(setup, tmp_path):
    """Killed while its first checkpoint is being written, a run can be rerun plainly or resumed."""
    out = tmp_path / "run"
    for _ in range(2):  # the run, then a plain rerun (which must not refuse the folder), killed at the same point
        stale = set(temps(out / CHECKPOINT_DIR))  # the killed run's: the next one must make its own
        child = start(setup, out)
        child.wait_until(
            lambda stale=stale: any(
                n.startswith(".tmp-step-00000002-") and n not in stale for n in temps(out / CHECKPOINT_DIR)
            ),
            "the first checkpoint's temporary folder",
        )
        assert child.signal(signal.SIGKILL) == -signal.SIGKILL
        assert step_dirs(out) == [] and temps(out / CHECKPOINT_DIR), "the kill did not land in the checkpoint write"
        assert (out / ".lock").read_text().strip() == str(child.pid)  # a dead holder's lock: the OS released it
    done = run_cli(*setup["args"], "--out", out, "--resume")
    assert done.returncode == 0, done.stderr
    assert "no checkpoint" in done.stderr and "starting from the first step" in done.stderr
    assert_matches_uninterrupted(setup, out)


def test_sigkill_while_pruning_never_leaves_a_partial_checkpoint(setup, tmp_path):
    out = tmp_path / "run"
    child = start(setup, out, "--keep-checkpoints", "1")
    child.wait_until(lambda: any(n.startswith(".tmp-del-step-") for n in names(out / CHECKPOINT_DIR)),
                     "a pruned checkpoint leaving the step-* names")  # fmt: skip
    assert child.signal(signal.SIGKILL) == -signal.SIGKILL
    assert step_dirs(out) and temps(out / CHECKPOINT_DIR), "the kill did not land in the pruning"
    for name in step_dirs(out):
        verify_checkpoint(out / CHECKPOINT_DIR / name)  # every step-* folder is complete
    done = run_cli(*setup["args"], "--out", out, "--resume", "--keep-checkpoints", "1")
    assert done.returncode == 0, done.stderr
    assert_matches_uninterrupted(setup, out)
    assert step_dirs(out) == ["step-00000006"]


def test_sigkill_during_loss_plot_and_final_model_write(setup, tmp_path):
    out = tmp_path / "run"
    child = start(setup, out)
    child.wait_until(lambda: any(n.startswith(".tmp-loss.png-") for n in names(out)), "the loss plot's temp file")
    assert child.signal(signal.SIGKILL) == -signal.SIGKILL
    assert any(n.startswith(".tmp-loss.png-") for n in temps(out))

    child = start(setup, out, "--resume")  # the stale temp file is removed under the new run's lock
    child.wait_until(lambda: any(n.startswith(".tmp-model-") for n in names(out)), "the final model's temp folder")
    assert child.signal(signal.SIGKILL) == -signal.SIGKILL
    assert not (out / "model").exists() and any(n.startswith(".tmp-model-") for n in temps(out))
    assert not any(n.startswith(".tmp-loss.png-") for n in temps(out)), "the earlier run's temp file was not removed"

    done = run_cli(*setup["args"], "--out", out, "--resume")  # all steps done: writes the model
    assert done.returncode == 0, done.stderr
    assert_matches_uninterrupted(setup, out)


def test_sigint_during_a_checkpoint_write_cleans_up_and_resumes(setup, tmp_path):
    out = tmp_path / "run"
    child = start(setup, out)
    child.wait_until(lambda: any(n.startswith(".tmp-step-00000004-") for n in names(out / CHECKPOINT_DIR)),
                     "the second checkpoint's temporary folder")  # fmt: skip
    assert child.signal(signal.SIGINT) == 130
    err = child.stderr()
    assert "interrupted" in err and "step-00000002" in err and "Traceback" not in err, err
    assert step_dirs(out) == ["step-00000002"] and temps(out / CHECKPOINT_DIR) == []
    done = run_cli(*setup["args"], "--out", out, "--resume")
    assert done.returncode == 0, done.stderr
    assert_matches_uninterrupted(setup, out)


def _damage(path: Path, how: str) -> None:
    if how == "truncated":
        os.truncate(path, path.stat().st_size // 2)
    elif how == "zeroed":
        path.write_bytes(bytes(path.stat().st_size))
    else:  # random bytes of the same size
        path.write_bytes(torch.randint(0, 256, (path.stat().st_size,), dtype=torch.uint8).numpy().tobytes())


def test_damaged_newest_checkpoint_falls_back_or_names_the_good_one(setup, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(setup["whole"], out)  # a finished run: checkpoints at steps 4 and 6
    ckpts = out / CHECKPOINT_DIR
    _damage(ckpts / "step-00000006" / STATE_FILE, "random")

    # a named bad checkpoint: exit 2, the bad file and the --resume PATH that works; no traceback
    bad = run_cli(*setup["args"], "--out", out, "--resume", ckpts / "step-00000006")
    assert bad.returncode == 2, bad.stderr
    assert f"{ckpts / 'step-00000006' / STATE_FILE}: sha256 differs" in bad.stderr
    assert f"--resume {ckpts / 'step-00000004'}" in bad.stderr
    assert "Traceback" not in bad.stderr and "weights_only=False" not in bad.stderr

    # the run folder: the damaged newest one is skipped (and set aside), the run continues from step 4
    _damage(ckpts / "step-00000006" / MODEL_FILE, "truncated")
    shutil.rmtree(out / "model")  # so that the resumed run's own model is compared
    done = run_cli(*setup["args"], "--out", out, "--resume")
    assert done.returncode == 0, done.stderr
    assert f"skipped checkpoint {ckpts / 'step-00000006'}" in done.stderr and "resuming from" in done.stderr
    assert "corrupt-step-00000006" in names(ckpts)
    assert_matches_uninterrupted(setup, out)

    # every checkpoint damaged: exit 2 listing each, nothing trained
    for name in step_dirs(out):
        _damage(ckpts / name / MODEL_FILE, "zeroed")
    bad = run_cli(*setup["args"], "--out", out, "--resume")
    assert bad.returncode == 2 and "no usable checkpoint" in bad.stderr and "Traceback" not in bad.stderr
    assert bad.stderr.count("sha256 differs") == len(step_dirs(out)) == 2


def test_second_run_on_a_folder_refuses_at_once_naming_the_holder(setup, tmp_path):
    out = tmp_path / "run"
    first = start(setup, out, pause=0)
    first.wait_until(lambda: (out / ".lock").is_file() and (out / ".lock").read_text().strip() == str(first.pid),
                     "the first run's lock")  # fmt: skip
    os.kill(first.pid, signal.SIGSTOP)  # holds its lock, stopped, for as long as the second one takes
    try:
        second = run_cli(*setup["args"], "--out", out, "--lr", "1e-2", "--overwrite")
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 2, second.stderr
    assert f"in use by another apollo-fast train run (PID {first.pid})" in second.stderr
    assert "Traceback" not in second.stderr and "Loading weights" not in second.stderr
    assert first.wait() == 0, first.stderr()
    assert_matches_uninterrupted(setup, out)  # the folder holds the first run only
