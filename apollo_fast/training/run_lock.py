"""One training run per output folder: an exclusive lock on OUT/.lock, held for the whole run.

The lock is fcntl.flock on an open file, so the kernel releases it when the process ends in any way
(exit, exception, SIGKILL): a killed run never leaves a stale lock behind, and the file itself
(holding the last holder's PID, for the message) is left in place on purpose — deleting it would let
two processes lock two different files under the same name.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

__all__ = ["RunLock", "RunFolderBusy", "LOCK_FILE"]

LOCK_FILE = ".lock"


class RunFolderBusy(OSError):
    """Another process holds the run folder's lock."""


class RunLock:
    """Context manager / object holding the exclusive lock of run folder `folder` (which must exist)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / LOCK_FILE
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise RunFolderBusy(
                f"{Path(folder)} is in use by another apollo-fast train run (PID {holder}); "
                "wait for it to end, stop it, or choose another --out"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
