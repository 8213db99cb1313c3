"""apollo_fast.atomic (the one writer behind every output), apollo_fast.checks and the run lock, in-process."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from apollo_fast import atomic
from apollo_fast.checks import check_output, finite_number
from apollo_fast.training.run_lock import RunFolderBusy, RunLock


@pytest.fixture
def umask027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_files_and_folders_get_the_umask_modes_whatever_the_writer_chose(tmp_path, umask027):
    assert atomic.umask() == 0o027
    f = atomic.atomic_write_text(tmp_path / "a.txt", "x\n")
    assert stat.S_IMODE(f.stat().st_mode) == 0o640
    with atomic.atomic_dir(tmp_path / "out") as tmp:
        (tmp / "secret.bin").write_bytes(b"1")
        (tmp / "secret.bin").chmod(0o600)  # as safetensors writes its files
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "sub" / "run.sh").write_text("#!/bin/sh\n")
        (tmp / "sub" / "run.sh").chmod(0o700)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [tmp_path / "out", *(tmp_path / "out").rglob("*")]}
    assert modes == {"out": 0o750, "secret.bin": 0o640, "sub": 0o750, "run.sh": 0o750}


@pytest.mark.parametrize("exchange", [True, False])
def test_replacing_a_folder_is_whole_or_not_at_all(tmp_path, monkeypatch, exchange):
    if not exchange:  # the swap-aside path of systems without renameat2(RENAME_EXCHANGE)
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    target = tmp_path / "model"
    with atomic.atomic_dir(target) as tmp:
        (tmp / "w").write_text("old")
    with pytest.raises(FileExistsError, match="not empty"):
        with atomic.atomic_dir(target):
            pass
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_dir(target, overwrite=True) as tmp:
            (tmp / "w").write_text("half")
            raise KeyboardInterrupt
    assert (target / "w").read_text() == "old" and listing(tmp_path) == ["model"]
    with atomic.atomic_dir(target, overwrite=True) as tmp:
        (tmp / "w").write_text("new")
    assert (target / "w").read_text() == "new" and listing(tmp_path) == ["model"]


def test_remove_stale_restores_a_swapped_out_folder_and_deletes_the_rest(tmp_path):
    """A kill between the two renames of the swap-aside path: the old folder comes back under its name."""
    (tmp_path / ".tmp-old-model-1a2b3c4d").mkdir()
    (tmp_path / ".tmp-old-model-1a2b3c4d" / "w").write_text("old")
    (tmp_path / ".tmp-model-xyz").mkdir()  # the new one, complete or not: never trusted
    (tmp_path / ".tmp-loss.png-abc").write_bytes(b"torn")
    (tmp_path / ".tmp-del-step-00000001-ffff").mkdir()
    (tmp_path / "keep.txt").write_text("mine")
    removed = atomic.remove_stale(tmp_path)
    assert sorted(removed) == [".tmp-del-step-00000001-ffff", ".tmp-loss.png-abc", ".tmp-model-xyz"]
    assert listing(tmp_path) == ["keep.txt", "model"] and (tmp_path / "model" / "w").read_text() == "old"


def test_remove_tree_leaves_the_name_before_deleting(tmp_path, monkeypatch):
    (tmp_path / "step-00000001").mkdir()
    (tmp_path / "step-00000001" / "trainer.pt").write_bytes(b"x")

    def killed(path, ignore_errors=False):
        raise KeyboardInterrupt  # the process dies while deleting

    monkeypatch.setattr(atomic.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic.remove_tree(tmp_path / "step-00000001")
    monkeypatch.undo()
    (leftover,) = listing(tmp_path)
    assert leftover.startswith(".tmp-del-step-00000001-")
    atomic.remove_stale(tmp_path)
    assert listing(tmp_path) == []


def test_json_is_strict(tmp_path):
    with pytest.raises(ValueError, match="report.json.*NaN"):
        atomic.atomic_write_json(tmp_path / "report.json", {"margin": float("nan")})
    assert listing(tmp_path) == []
    atomic.atomic_write_json(tmp_path / "report.json", {"margin": 1.5})
    assert json.loads((tmp_path / "report.json").read_text()) == {"margin": 1.5}


def test_checks(tmp_path):
    assert finite_number("lr", "1e-3", above=0) == 1e-3
    for value, bounds, match in [
        ("nan", {}, "lr must be a finite number"),
        (float("inf"), {}, "lr must be a finite number"),
        (0.0, {"above": 0}, "lr must be > 0"),
        (1.5, {"maximum": 1}, "lr must be <= 1"),
        ("x", {}, "lr must be a number"),
    ]:
        with pytest.raises(ValueError, match=match):
            finite_number("lr", value, **bounds)
    (tmp_path / "f").write_text("x")
    (tmp_path / "d").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert check_output(tmp_path / "new" / "deeper", overwrite=False, folder=True) == tmp_path / "new" / "deeper"
    assert check_output(tmp_path / "d", overwrite=False, folder=True)  # an empty folder is not an output yet
    check_output(tmp_path / "f", overwrite=True, folder=False)
    for path, kw, exc, match in [
        (tmp_path / "f", {"folder": False}, FileExistsError, "exists .pass --overwrite"),
        (tmp_path / "full", {"folder": True}, FileExistsError, "not empty .pass --overwrite"),
        (tmp_path / "f", {"folder": True}, ValueError, "exists and is not a folder"),
        (tmp_path / "d", {"folder": False}, ValueError, "is a folder; give a file name"),
        (tmp_path / "f" / "x", {"folder": False}, ValueError, "is not a folder"),
    ]:
        with pytest.raises(exc, match=match):
            check_output(path, overwrite=False, **kw)


def test_run_lock_is_exclusive_and_names_the_holder(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunFolderBusy, match=f"PID {os.getpid()}"):
            RunLock(tmp_path)
    RunLock(tmp_path).release()  # released on exit: free again
