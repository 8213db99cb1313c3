"""`BackgroundPusher`: a training loop's weight pushes, every N optimizer steps, off the training thread.

Call `maybe_push(model, step)` once after every optimizer step. At a due step (a multiple of N) it
takes a snapshot (in the trainer's thread: only what changed, copied to the host) and hands the
transfer to a background thread, so the optimizer goes on while the engine reloads. At most one
push is in flight: a due step that finds the previous push still running is pushed at the first
later step where it has finished, so the served weights lag the trainer by at most N steps plus
one push. A push that failed raises PushError in the trainer's thread at the next call.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from torch import nn

from .handle import PushRecord, VLLMHandle

__all__ = ["BackgroundPusher"]


class BackgroundPusher:
    """Push `handle`'s engine every `every` optimizer steps; see the module docstring."""

    def __init__(self, handle: VLLMHandle, every: int, *, verify: bool = False) -> None:
        if int(every) < 1:
            raise ValueError(f"push interval must be at least 1 optimizer step, got {every}")
        self.handle, self.every, self.verify = handle, int(every), verify
        self.records: list[PushRecord] = []
        self.served_version: int | None = None  # the newest version the engine accepted
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="apollo-push")
        self._future: Future | None = None
        self._pending = False

    @property
    def busy(self) -> bool:
        return self._future is not None and not self._future.done()

    def _collect(self) -> None:
        """Account for a finished push; re-raise its error here, in the caller's thread."""
        if self._future is None or not self._future.done():
            return
        future, self._future = self._future, None
        record = future.result()  # raises PushError / VerifyError from the background thread
        self.records.append(record)
        self.served_version = record.version

    def maybe_push(self, model: nn.Module, step: int) -> bool:
        """Call after each optimizer step; returns True when a push of `step` was started."""
        self._collect()
        if step % self.every == 0:
            self._pending = True
        if not self._pending or self.busy:
            return False
        snap = self.handle.snapshot(model, step, self.verify)
        self._future = self._pool.submit(self.handle.send, snap)
        self._pending = False
        return True

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the push in flight (if any) and account for it."""
        if self._future is not None:
            self._future.exception(timeout)
            self._collect()

    def finish(self, model: nn.Module, step: int) -> list[PushRecord]:
        """End of training: wait, push `step` unless it is served already, wait again; the records."""
        self.wait()
        if self.served_version != step:
            self._pending = True
            self.maybe_push(model, step)
            self.wait()
        return self.records

    def status(self) -> str:
        """For a progress bar: the served version, '+' while a push is in flight."""
        served = "-" if self.served_version is None else str(self.served_version)
        return served + ("+" if self.busy else "")

    def close(self) -> None:
        """Stop the background thread (after the push in flight, whose error is not raised here)."""
        self._pool.shutdown(wait=True)
