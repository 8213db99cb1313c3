"""torchrun jobs for the distributed tests: CPU ranks with one thread each, a hard timeout, and on expiry torchrun
and every rank killed by PID (torchrun starts its ranks in sessions of their own, so a process-group kill would
leave them running)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TIMEOUT_S = 300


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _kill_job(proc: subprocess.Popen) -> None:
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Job:
    """torchrun --standalone --nproc-per-node NPROC ARGS (a script, or -m apollo_fast ...), output to `logs`."""

    def __init__(
        self, nproc: int, *args: object, logs: Path, pause: float | None = None, env: dict | None = None
    ) -> None:
        extra = env or {}
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(HERE),
               "PYTHONWARNINGS": "ignore::FutureWarning"}  # torch's own collectives warn on every call  # fmt: skip
        env.pop("APOLLO_FAST_TEST_PAUSE_S", None)
        env.update(extra)
        if pause:
            env["APOLLO_FAST_TEST_PAUSE_S"] = str(pause)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               *map(str, args)]  # fmt: skip
        self.logs = logs
        self._log = open(logs, "w")  # noqa: SIM115 - closed in finish()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def finish(self) -> tuple[int, str]:
        """Wait for the job (hard timeout: kill torchrun and every rank); its exit code and output."""
        try:
            code = self.proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _kill_job(self.proc)
            self.proc.wait()
            pytest.fail(f"torchrun did not finish in {TIMEOUT_S} s:\n{self.logs.read_text()[-4000:]}")
        finally:
            self._log.close()
        return code, self.logs.read_text()

    def rank_pid(self, rank: int) -> int | None:
        for pid in _descendants(self.proc.pid):
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env and any(e.startswith(b"TORCHELASTIC_RUN_ID=") for e in env):
                return pid
        return None
