"""What a careful user hits with the command line (issue 11), each case run as a user runs it: the CLI
in a child process. Every refusal is exit code 2 with one message naming the path or option, never a
traceback, and nothing is written.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from _steering_toys import word_tokenizer, words
from cli_subprocess import child_env, run_cli
from train_fixtures import copy_behaviour, make_model_dir, one_thread, write_jsonl

from apollo_fast.cli import build_parser
from apollo_fast.steering import SteeringVector, extract_steering_vector, steer
from apollo_fast.toy import tiny_causal_lm
from apollo_fast.vectors import TaskVector, add_vectors, apply_to_checkpoint, extract_task_vector, ties_merge


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A base model folder, a fine-tune, a task vector, a steering vector, pairs and prompts (all tiny)."""
    root = tmp_path_factory.mktemp("reliability")
    tok = word_tokenizer()
    for name, seed in (("base", None), ("ft", 1)):
        m = tiny_causal_lm(seed=0)
        if seed is not None:
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    extract_task_vector(root / "base", root / "ft").save(root / "tau.safetensors")
    g = torch.Generator().manual_seed(0)
    rows = [{"prompt": words(torch.randint(2, 63, (3,), generator=g).tolist()),
             "desired": words([int(torch.randint(2, 63, (1,), generator=g))]),
             "undesired": words([int(torch.randint(2, 63, (1,), generator=g))])} for _ in range(6)]  # fmt: skip
    write_jsonl(root / "pairs.jsonl", rows)
    write_jsonl(root / "prompts.jsonl", [json.dumps("t5 t6 t7"), json.dumps("t8 t9")])
    model = tiny_causal_lm(seed=0)
    extract_steering_vector(model, rows, tokenizer=tok).save(root / "sv.safetensors")
    (root / "junk.safetensors").write_bytes(os.urandom(3000))
    (root / "notes.txt").write_text("my notes\n")
    return root


def run_all(*commands: list[object]) -> list[subprocess.CompletedProcess]:
    """Run CLI commands two at a time (the CI machine has two cores)."""
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda argv: run_cli(*argv), commands))


def assert_refused(done: subprocess.CompletedProcess, *needles: str) -> None:
    assert done.returncode == 2, f"exit {done.returncode}:\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    for needle in needles:
        assert needle in done.stderr, f"{needle!r} not in:\n{done.stderr}"


def test_non_finite_or_out_of_range_numbers_are_refused_before_anything_is_read(files, tmp_path, capsys):
    f, out = files, tmp_path / "out"
    refused = [
        ("--coef: must be a finite number, got 'nan'",
         ["vectors", "apply", "--base", f / "base", "--vector", f / "tau.safetensors", "--coef", "nan", "--out", out]),
        ("--weights: must be a finite number, got 'nan'",
         ["vectors", "add", f / "tau.safetensors", f / "tau.safetensors", "--weights", "1", "nan", "--out", out]),
        ("--lam: must be a finite number, got 'nan'",
         ["vectors", "ties", f / "tau.safetensors", "--lam", "nan", "--out", out]),
        ("--coef: must be a finite number, got 'nan'",
         ["steer", "verify", "--model", f / "base", "--vector", f / "sv.safetensors", "--pairs", f / "pairs.jsonl",
          "--coef", "nan", "--json", out]),
        ("--coef: must be a finite number, got '-inf'",
         ["steer", "bake", "--model", f / "base", "--vector", f / "sv.safetensors", "--prompts", f / "prompts.jsonl",
          "--coef=-inf", "--out", out]),
    ]  # fmt: skip
    for (message, _), done in zip(refused, run_all(*(argv for _, argv in refused)), strict=True):
        assert_refused(done, message)
        assert not out.exists()

    # the same argument types, parsed in-process (every number option of every command uses them)
    for argv, message in [
        (["vectors", "apply", "--base", "B", "--vector", "V", "--coef", "inf", "--out", "O"], "--coef: must be a fin"),
        (["vectors", "ties", "V", "--density", "1.5", "--out", "O"], "--density: must be <= 1, got '1.5'"),
        (["vectors", "ties", "V", "--weights", "-1", "--out", "O"], "--weights: must be >= 0, got '-1'"),
        (["vectors", "dare", "V", "--p", "1", "--out", "O"], "--p: must be < 1, got '1'"),
        (["vectors", "apply", "--base", "B", "--vector", "V", "--max-shard-gb", "0", "--out", "O"], "must be > 0"),
        (["train", "--model", "M", "--data", "D", "--out", "O", "--lr", "nan"], "--lr: must be a finite number"),
        (["train", "--model", "M", "--data", "D", "--out", "O", "--max-grad-norm", "inf"], "--max-grad-norm: must"),
        (["steer", "bake", "--model", "M", "--vector", "V", "--prompts", "P", "--lr", "0", "--out", "O"], "--lr: must"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args(argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err

    # the library refuses them too, before anything is computed or written
    tau = TaskVector.load(f / "tau.safetensors")
    for call, match in [
        (lambda: apply_to_checkpoint(f / "base", out, [tau], [float("nan")]), "coefficient must be a finite"),
        (lambda: add_vectors([tau, tau], [1.0, float("inf")]), "weight must be a finite"),
        (lambda: ties_merge([tau], lam=float("nan")), "lambda must be a finite"),
        (lambda: ties_merge([tau], weights=[-1.0]), "TIES weight must be >= 0"),
        (lambda: tau * float("nan"), "scale must be a finite"),
        (lambda: steer(tiny_causal_lm(seed=0), SteeringVector.load(f / "sv.safetensors"), float("nan")).__enter__(),
         "steering coefficient must be a finite"),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            call()
    assert not out.exists()


def test_one_overwrite_rule_for_every_output_and_strict_json(files, tmp_path):
    f = files
    notes, report = tmp_path / "notes.txt", tmp_path / "report.json"
    shutil.copy(f / "notes.txt", notes)
    report.write_text("{}\n")
    full = tmp_path / "full"
    (full / "keep.txt").parent.mkdir()
    (full / "keep.txt").write_text("x")
    extract = ["steer", "extract", "--model", f / "base", "--pairs", f / "pairs.jsonl", "--out", notes]
    verify = ["steer", "verify", "--model", f / "base", "--vector", f / "sv.safetensors", "--pairs",
              f / "pairs.jsonl", "--coef", "3", "--json", report]  # fmt: skip
    apply = ["vectors", "apply", "--base", f / "base", "--vector", f / "tau.safetensors", "--out", full]
    bake = ["steer", "bake", "--model", f / "base", "--vector", f / "sv.safetensors", "--prompts",
            f / "prompts.jsonl", "--steps", "1", "--out", full]  # fmt: skip
    refused = run_all(extract, verify, apply, bake)
    assert_refused(refused[0], f"--out {notes} exists (pass --overwrite")
    assert_refused(refused[1], f"--json {report} exists (pass --overwrite")
    assert_refused(refused[2], f"--out {full} is a folder that is not empty (pass --overwrite")
    assert_refused(refused[3], f"--out {full} is a folder that is not empty (pass --overwrite")
    assert notes.read_text() == "my notes\n" and report.read_text() == "{}\n" and os.listdir(full) == ["keep.txt"]

    done = run_all([*extract, "--overwrite"], [*verify, "--overwrite"])
    assert [d.returncode for d in done] == [0, 0], [d.stderr for d in done]
    assert SteeringVector.load(notes).layers == [0, 1]

    def no_constants(name: str):
        raise ValueError(f"not strict JSON: {name}")

    r = json.loads(report.read_text(), parse_constant=no_constants)
    assert r["coefficient"] == 3.0 and r["n_pairs"] == 6


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def test_outputs_get_the_modes_of_the_umask(files, tmp_path):
    """Under umask 027 (not the usual 022, so a hard-coded 0644 would fail): 0640 files, 0750 folders."""
    umask = 0o027
    data = write_jsonl(tmp_path / "b.jsonl", copy_behaviour(3, seed=2))
    model = make_model_dir(tmp_path, "llama")
    run, tau, merged = tmp_path / "run", tmp_path / "neg.safetensors", tmp_path / "merged"
    commands = [
        ["train", "--model", model, "--data", data, "--out", run, "--steps", "2", "--rank", "4", "--no-progress"],
        ["vectors", "negate", files / "tau.safetensors", "--out", tau],
        ["vectors", "apply", "--base", files / "base", "--vector", files / "tau.safetensors", "--out", merged],
    ]
    for argv in commands:
        done = subprocess.run([sys.executable, "-m", "apollo_fast", *map(str, argv)], capture_output=True,
                              text=True, env=child_env(), umask=umask, timeout=180)  # fmt: skip
        assert done.returncode == 0, done.stderr
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    for root in (run, merged):
        for name, mode in _modes(root).items():
            want = dir_mode if (root / name).is_dir() else file_mode
            assert mode == want, f"{root.name}/{name}: {oct(mode)}, the umask gives {oct(want)}"
    assert stat.S_IMODE(tau.stat().st_mode) == file_mode
    assert {"model/model.safetensors", "checkpoints/step-00000002/model.safetensors", "run.json", "loss.png",
            ".lock"} <= set(_modes(run))  # fmt: skip


def _without_root_file_powers() -> None:
    """preexec_fn for a child of root: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set
    (kept across exec), so file modes bind the child as they bind any user (a 0555 folder is read-only)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_capbset_drop, cap_dac_override, cap_dac_read_search = 24, 1, 2
    for cap in (cap_dac_override, cap_dac_read_search):
        if libc.prctl(pr_capbset_drop, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def test_out_that_cannot_be_written_is_refused_before_the_model_is_loaded(files, tmp_path):
    data = write_jsonl(tmp_path / "b.jsonl", copy_behaviour(2))
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    (tmp_path / "a-file").write_text("x")
    train = ["-m", "apollo_fast", "train", "--model", files / "base", "--data", data, "--steps", "1", "--no-progress"]
    # root may write anywhere: its child gives up the capabilities that override file modes
    drop = {"preexec_fn": _without_root_file_powers} if os.geteuid() == 0 else {}
    cases = {
        tmp_path / "ro" / "run": f"--out {tmp_path / 'ro' / 'run'}: cannot write into {tmp_path / 'ro'}",
        tmp_path / "a-file" / "run": f"--out {tmp_path / 'a-file' / 'run'}: cannot be created, {tmp_path / 'a-file'}",
        tmp_path / "a-file": f"--out {tmp_path / 'a-file'}: exists and is not a folder",
    }
    try:
        for out, message in cases.items():
            done = subprocess.run([sys.executable, *map(str, train), "--out", str(out)], capture_output=True,
                                  text=True, env=child_env(), timeout=180, **drop)  # fmt: skip
            assert_refused(done, message)
            assert "Loading weights" not in done.stderr, "the model was loaded before --out was checked"
        assert os.listdir(tmp_path / "ro") == []
    finally:
        (tmp_path / "ro").chmod(0o755)


def test_junk_vector_files_and_bad_input_files_get_one_clear_message(files, tmp_path):
    f = files
    bad_pairs = tmp_path / "pairs.jsonl"
    bad_pairs.write_bytes(b'{"desired": "t3", "undesired": "t4"}\n{"desired": "t\xff5", "undesired": "t6"}\n')
    (tmp_path / "data-dir").mkdir()
    done = run_all(
        ["steer", "verify", "--model", f / "base", "--vector", f / "junk.safetensors", "--pairs", f / "pairs.jsonl"],
        ["steer", "bake", "--model", f / "base", "--vector", f / "notes.txt", "--prompts", f / "prompts.jsonl",
         "--out", tmp_path / "baked"],
        ["steer", "verify", "--model", f / "base", "--vector", f / "tau.safetensors", "--pairs", f / "pairs.jsonl"],
        ["steer", "extract", "--model", f / "base", "--pairs", bad_pairs, "--out", tmp_path / "sv.safetensors"],
        ["train", "--model", f / "base", "--data", tmp_path / "data-dir", "--out", tmp_path / "run", "--steps", "1"],
    )  # fmt: skip
    assert_refused(done[0], f"{f / 'junk.safetensors'}: not a safetensors file")
    assert_refused(done[1], f"{f / 'notes.txt'}: not a safetensors file")
    assert_refused(done[2], f"{f / 'tau.safetensors'} is not an apollo_fast steering vector")
    assert_refused(done[3], f"{bad_pairs}:2: not valid UTF-8")
    assert_refused(done[4], f"--data {tmp_path / 'data-dir'}: is a folder, not a file")
    assert not (tmp_path / "baked").exists() and not (tmp_path / "sv.safetensors").exists()
    assert not (tmp_path / "run").exists()
