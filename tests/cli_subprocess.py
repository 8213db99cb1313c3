"""Run `apollo-fast` in a child process, as a user would: one thread, output to files, hard timeouts.

Children are started with `python -m apollo_fast` and stopped by PID (SIGKILL / SIGINT sent to that
process only). APOLLO_FAST_TEST_PAUSE_S (read by apollo_fast.atomic, documented in the README) makes
a child sleep at each commit point of a write, so a test can find that moment on disk and kill there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["child_env", "run_cli", "Child", "start_cli"]

TIMEOUT_S = 180


def child_env(**extra: object) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("APOLLO_FAST_TEST_PAUSE_S", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_cli(*args: object, timeout: float = TIMEOUT_S, **env: object) -> subprocess.CompletedProcess:
    """`apollo-fast ARGS` to completion; .returncode, .stdout, .stderr."""
    return subprocess.run(
        [sys.executable, "-m", "apollo_fast", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(**env),
    )


class Child:
    """A running `apollo-fast` process whose output goes to files in `logs`."""

    def __init__(self, args: tuple[object, ...], logs: Path, env: dict[str, object]) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        self._out = open(logs / "stdout.txt", "w+")  # noqa: SIM115 - closed in wait()
        self._err = open(logs / "stderr.txt", "w+")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "apollo_fast", *map(str, args)],
            stdout=self._out,
            stderr=self._err,
            env=child_env(**env),
        )
        self.pid = self.proc.pid

    def wait_until(self, condition: Callable[[], bool], what: str, timeout: float = TIMEOUT_S) -> None:
        """Poll the file system every 2 ms until `condition()`; fail if the child ends first."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(f"the run ended (exit {self.proc.returncode}) before {what}:\n{self.stderr()}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.002)

    def signal(self, sig: int) -> int:
        """Send `sig` to the child (only to it) and wait for it to end; its exit code (-9 for SIGKILL)."""
        self.proc.send_signal(sig)
        return self.wait()

    def wait(self, timeout: float = TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._out.close()
            self._err.close()

    def stderr(self) -> str:
        if not self._err.closed:
            self._err.flush()
        return Path(self._err.name).read_text()

    def stdout(self) -> str:
        if not self._out.closed:
            self._out.flush()
        return Path(self._out.name).read_text()


def start_cli(*args: object, logs: Path, **env: object) -> Child:
    return Child(args, logs, env)
