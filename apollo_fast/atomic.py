"""Durable atomic writes: an output is complete under its final name, or absent, or still the old one.

Every file and folder the package writes goes through here (checkpoints, saved models, task and
steering vectors, loss plots, JSON reports), so a kill at any moment never leaves a half-written
output under its final name.

- A file is written to `.tmp-NAME-XXXXXXXX` in the same folder, flushed and fsynced, given the
  mode an ordinary open() would give it (0666 & ~umask; mkstemp makes 0600), renamed onto NAME,
  and the folder is fsynced so that the rename itself survives a power cut.
- A folder is built as `.tmp-NAME-XXXXXXXX` (0777 & ~umask); every file and folder in it gets the
  umask's mode (whatever its writer chose: safetensors writes 0600) and is fsynced; then the folder
  is renamed into place and the parent fsynced. An existing folder is replaced by
  one atomic exchange (Linux renameat2 RENAME_EXCHANGE); where that is unavailable the old folder
  is first renamed to `.tmp-old-NAME-XXXXXXXX`, and `remove_stale` puts it back if a kill came
  between the two renames.
- A folder is deleted by renaming it to `.tmp-del-NAME-XXXXXXXX` first, so a kill during the
  deletion never leaves a half-deleted folder under its name.

So a name starting with `.tmp-` is never a finished output. `remove_stale(folder)` deletes such
leftovers of killed processes; call it only while no other process writes into that folder (the
training run holds a lock on its folder for this).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = [
    "TMP_PREFIX",
    "atomic_file",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_dir",
    "save_pretrained_atomic",
    "remove_tree",
    "remove_stale",
    "fsync_tree",
    "umask",
]

TMP_PREFIX = ".tmp-"
_OLD = f"{TMP_PREFIX}old-"
_DEL = f"{TMP_PREFIX}del-"
# Test-only: seconds to sleep at every commit point (before a rename into place, and between a
# folder's rename out of its name and its deletion), so a test can find the state on disk and kill
# the process there with a real signal. Unset (the default) it does nothing.
_PAUSE_ENV = "APOLLO_FAST_TEST_PAUSE_S"


def umask() -> int:
    """The process's umask (read from /proc where possible, so no other thread ever sees it changed)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)  # the stricter value, should another thread create a file right now
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    """Flush a file's or folder's contents to disk (folders: where the OS allows opening them)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # e.g. folders on Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike, *, modes: bool = False) -> None:
    """fsync every file and folder under `root`, `root` included; with modes=True first give each the mode
    an ordinary open() / mkdir() would under the umask (0644 / 0755 under umask 022; executables keep
    their x bits): some writers (safetensors) create 0600 files, which a teammate could not read."""
    mask = umask()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            if modes and not path.is_symlink():
                x = path.stat().st_mode & 0o111
                os.chmod(path, (0o777 if x else 0o666) & ~mask)
            _fsync(path)
        if modes:
            for name in dirnames:
                if not (Path(dirpath) / name).is_symlink():
                    os.chmod(Path(dirpath) / name, 0o777 & ~mask)
        _fsync(Path(dirpath))


def _commit_point() -> None:
    pause = os.environ.get(_PAUSE_ENV)
    if pause:
        time.sleep(float(pause))


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Yield a file object writing to a temporary file beside `path`; on success it becomes `path`.

    On any exception (KeyboardInterrupt included) the temporary file is removed and `path` is untouched.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8", "newline": ""} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        _commit_point()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_file(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_file(path, "w") as f:
        f.write(text)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Strict JSON (no NaN / Infinity tokens, which other parsers reject), indented, newline-terminated."""
    try:
        text = json.dumps(obj, indent=2, allow_nan=False)
    except ValueError as err:
        raise ValueError(f"{path}: cannot write {err} as strict JSON (NaN and Infinity are not JSON)") from None
    return atomic_write_text(path, text + "\n")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if sys.platform != "linux":
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # e.g. a file system without RENAME_EXCHANGE
    raise OSError(err, os.strerror(err), str(b))


def _suffix() -> str:
    return uuid.uuid4().hex[:8]


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished folder `tmp` to `final`; an existing `final` is swapped out, then deleted."""
    _commit_point()
    if final.is_dir() and any(final.iterdir()):
        if _exchange(tmp, final):
            _fsync(final.parent)
            shutil.rmtree(tmp, ignore_errors=True)  # now the old folder, already out of the way
            return
        old = final.with_name(f"{_OLD}{final.name}-{_suffix()}")
        os.replace(final, old)
        os.replace(tmp, final)
        _fsync(final.parent)
        shutil.rmtree(old, ignore_errors=True)
        return
    os.replace(tmp, final)  # onto nothing, or onto an empty folder
    _fsync(final.parent)


@contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it becomes `target`, complete and fsynced.

    `target` must not exist or be an empty folder unless overwrite=True, in which case the old
    folder is replaced only once the new one is complete. On any exception the temporary folder is
    removed and `target` is untouched.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder {target} exists and is not empty (pass overwrite=True / --overwrite)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{target.name}-", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700
        yield tmp
        fsync_tree(tmp, modes=True)
        _move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_pretrained_atomic(model: Any, tokenizer: Any, out_dir: str | os.PathLike, state_dict: Any = None) -> Path:
    """model.save_pretrained (safetensors) + tokenizer.save_pretrained as one atomic folder (replacing `out_dir`).
    state_dict: the weights to write instead of the model's own (e.g. gathered from a sharded model)."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=True) as tmp:
        model.save_pretrained(tmp, **({} if state_dict is None else {"state_dict": state_dict}))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if not any(tmp.glob("*.safetensors")):
            raise RuntimeError(f"save_pretrained wrote no safetensors file for {out_dir}")
    return out_dir


def remove_tree(path: str | os.PathLike) -> None:
    """Delete a folder; it leaves its name first (renamed to .tmp-del-*), so no half-deleted folder is ever visible."""
    path = Path(path)
    if not path.exists():
        return
    gone = path.with_name(f"{_DEL}{path.name}-{_suffix()}")
    os.replace(path, gone)
    _fsync(path.parent)
    _commit_point()
    shutil.rmtree(gone, ignore_errors=True)


def remove_stale(folder: str | os.PathLike) -> list[str]:
    """Clean up after killed writers in `folder`: put back an old folder a kill left swapped out
    (.tmp-old-NAME-* while NAME is missing), delete every other .tmp-* entry. Returns what it removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    entries = sorted(p for p in folder.iterdir() if p.name.startswith(TMP_PREFIX))
    for p in entries:
        if p.name.startswith(_OLD) and p.is_dir():
            name = p.name[len(_OLD) :].rsplit("-", 1)[0]
            if name and not (folder / name).exists():
                os.replace(p, folder / name)
    removed = []
    for p in entries:
        if not os.path.lexists(p):
            continue  # restored above
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p.name)
    if removed:
        _fsync(folder)
    return removed
