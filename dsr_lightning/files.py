"""Writing files so that a failing disk loses nothing and says so in one line.

- `atomic_write(path, write_fn)`: the file is written beside its target under a hidden temporary
  name, fsynced and renamed over the target. Afterwards the target is either the old file, whole,
  or the new one, whole; no temporary file is left, whatever failed (a full or read-only disk, no
  permission, an error or an interrupt inside write_fn). A failed write is one error naming the
  file, the cause and what to do.
- `check_writable(folder, what)`: the folder exists (created if need be) and takes a file, checked
  before long work so a full or read-only disk stops a job at its start, not at its end.
- `write_error(path, exc, ...)`: the same one-line error for writes that cannot be atomic (appending
  to a locked results file).
- `FileLock(path)`: one process at a time on a file or a folder: an exclusive lock held through an
  open descriptor (flock on POSIX, msvcrt.locking on Windows, imported when a lock is taken, so the
  package imports everywhere). The OS releases it when the holder dies; no lock file can look
  stale. `RunFolderLock` is the training run's (one process per run folder); the results file's
  writer lock (results.WriterLock) is built on it too.

The bottom layer beside errors (docs/DESIGN.md §2): imports nothing of the package but errors.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import IO, Any

from dsr_lightning.errors import ConfigError, WriteError

_ELSEWHERE = "or write elsewhere (another path or output folder)"
# errno -> (the cause, what to do), for the messages
_CAUSES = {
    errno.ENOSPC: ("the disk is full", f"free space on it, {_ELSEWHERE}"),
    errno.EDQUOT: ("the disk quota is exceeded", f"free space in the quota, {_ELSEWHERE}"),
    errno.EROFS: ("read-only file system", "write to a writable disk (another path or output folder)"),
    errno.EACCES: ("permission denied", f"make the folder writable for this user, {_ELSEWHERE}"),
    errno.EPERM: ("permission denied", f"make the folder writable for this user, {_ELSEWHERE}"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "move that file away or choose "
                    "another path"),
    errno.EEXIST: ("a file stands where a folder is needed", "move it away or choose another path"),
    errno.EISDIR: ("it is a folder", "choose a file name, not a folder"),
}


def write_error(path: str | os.PathLike, exc: OSError, what: str = "the file",
                error: type[Exception] = WriteError, kept: str = "", hint: str = "") -> Exception:
    """The one error for a failed write of `path` (raise it `from None`): the file, the cause in
    words (ENOSPC: "the disk is full"; EROFS, EACCES: a read-only file system, permission denied),
    what is kept, and what to do. `kept` replaces the default sentence on what is kept; `hint` is
    appended."""
    cause, todo = _CAUSES.get(exc.errno, (exc.strerror or str(exc), f"check the disk, {_ELSEWHERE}"))
    # the part of the path that failed, when it is not the file itself (a folder above it)
    where = f" ({exc.filename})" if exc.filename and Path(exc.filename) != Path(path) else ""
    if not kept:
        try:
            kept = "The file that was there is unchanged." if Path(path).is_file() else \
                "Nothing was written."
        except OSError:
            kept = "Nothing was written."
    return error(f"cannot write {what} {path}: {cause}{where}. {kept} To fix: {todo}."
                 + (f" {hint}" if hint else ""))


def atomic_write(path: str | os.PathLike, write_fn: Callable[[IO[bytes]], Any], what: str = "the file",
                 error: type[Exception] = WriteError, hint: str = "") -> Path:
    """`write_fn(f)` writes the content to the open binary file f; the result replaces `path` (its
    folder is created) only once it is whole on disk. Any failure removes the temporary file; an
    OSError becomes one `error` (see write_error; the target is untouched), anything else (an
    interrupt, a bug in write_fn) propagates as it is. Returns the path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")  # hidden: no glob for *.ckpt sees it
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename, so a crash cannot leave it empty
        os.replace(tmp, path)
    except BaseException as e:
        with suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError):
            if e.filename is not None and Path(e.filename) == tmp:
                e.filename = None  # our temporary name means nothing to the user
            raise write_error(path, e, what, error, hint=hint) from None
        raise
    with suppress(OSError):  # the rename itself durable; not every file system syncs a folder
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


def check_writable(folder: str | os.PathLike, what: str, error: type[Exception] = WriteError,
                   hint: str = "", keep: bool = False) -> Path:
    """Create `folder` if need be and write, fsync and remove a probe file in it: a folder that
    cannot be created or written (read-only, no permission, below a file, a full disk) is one
    `error` naming it and `what` it is for (`hint` appended). The folders created for the probe are
    removed again unless `keep` (a check leaves nothing behind). Returns the folder."""
    folder = Path(folder)
    probe = folder / f".probe{os.getpid()}"
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"\0")  # a byte, not an empty file: a full disk refuses the data block
            os.fsync(fd)
        finally:
            os.close(fd)
        os.unlink(probe)
    except OSError as e:
        with suppress(OSError):
            probe.unlink()
        raise write_error(folder, e, what, error, kept="Nothing was written.", hint=hint) from None
    finally:
        for p in () if keep else created:
            with suppress(OSError):
                p.rmdir()  # only if still empty
    return folder


# -- locks -----------------------------------------------------------------------------------

class Locked(Exception):
    """FileLock.acquire(wait=False): another process holds the lock. Callers turn it into their
    own one-line error (who holds it, what to do)."""


# errno of a lock held by another process: flock (EWOULDBLOCK = EAGAIN), msvcrt (EACCES, EDEADLK)
_BUSY = {errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES, getattr(errno, "EDEADLK", errno.EACCES)}


def _lock_api(path: Path, error: type[Exception]):
    """('flock', fcntl) on POSIX, ('msvcrt', msvcrt) on Windows, imported here (not when the
    package is imported); elsewhere one `error` saying that this platform has no file locks."""
    try:
        import fcntl
    except ImportError:
        pass
    else:
        return "flock", fcntl
    try:
        import msvcrt
    except ImportError:
        raise error(f"cannot lock {path}: this platform has no file locks Python can use (neither "
                    "fcntl, POSIX, nor msvcrt, Windows); run on Linux, macOS or Windows") from None
    return "msvcrt", msvcrt


MSVCRT_OFFSET = 2**31 - 2  # Windows: the locked byte, past any results file's data


class FileLock:
    """An exclusive lock on `path`, a folder or a file (created if `create`), held through an open
    descriptor from acquire() until release(), the end of a `with` block (an exception included)
    or the process's death. A second holder, in this process or another, is refused (Locked) or,
    with `wait`, polls until the first is done. Failures other than a held lock are one `error`.
    The descriptor is not inherited by processes the holder starts (exec); a forked process (a
    DataLoader worker) shares it until it exits, which never outlives the holder's job.

    On Windows (msvcrt, untested here) locks are mandatory per byte range: the lock is on one
    byte far past any data (MSVCRT_OFFSET), so the holder's own writes through other handles are
    not blocked; a folder, which Windows cannot open, is locked through a file `.lock` in it (left
    behind; without the lock it holds nothing)."""

    def __init__(self, path: str | os.PathLike, create: bool = False,
                 error: type[Exception] = WriteError):
        self.path, self.create, self.error = Path(path), create, error
        self._fd: int | None = None
        self._api: str | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _open(self, api: str) -> int:
        target, flags = self.path, os.O_RDWR | (os.O_CREAT if self.create else 0)
        if self.path.is_dir():
            target, flags = ((self.path / ".lock", os.O_RDWR | os.O_CREAT) if api == "msvcrt"
                             else (self.path, os.O_RDONLY))
        try:
            return os.open(target, flags, 0o644)
        except OSError as e:
            raise self.error(f"cannot lock {self.path}: {e.strerror or e}") from None

    def _try(self, fd: int, api: str, mod) -> bool:
        try:
            if api == "flock":
                mod.flock(fd, mod.LOCK_EX | mod.LOCK_NB)
            else:
                os.lseek(fd, MSVCRT_OFFSET, os.SEEK_SET)
                mod.locking(fd, mod.LK_NBLCK, 1)
            return True
        except OSError as e:
            if e.errno in _BUSY:
                return False
            os.close(fd)
            raise self.error(f"cannot lock {self.path}: {e.strerror or e}") from None

    def acquire(self, wait: bool = False, poll: float = 0.5,
                waiting: Callable[[], None] | None = None) -> FileLock:
        """Take the lock. Held elsewhere: raise Locked, or with `wait` call `waiting()` once (to
        say so) and poll every `poll` seconds until it is free."""
        if self._fd is not None:
            return self
        api, mod = _lock_api(self.path, self.error)
        fd = self._open(api)
        said = False
        while not self._try(fd, api, mod):
            if not wait:
                os.close(fd)
                raise Locked(str(self.path))
            if not said and waiting is not None:
                waiting()
            said = True
            time.sleep(poll)
        self._fd, self._api = fd, api
        return self

    def release(self) -> None:
        """Let the lock go (closing the descriptor releases it); nothing if it is not held."""
        if self._fd is None:
            return
        if self._api == "msvcrt":
            with suppress(OSError, ImportError):
                import msvcrt

                os.lseek(self._fd, MSVCRT_OFFSET, os.SEEK_SET)
                msvcrt.locking(self._fd, msvcrt.LK_UNLCK, 1)
        os.close(self._fd)
        self._fd = self._api = None

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class RunFolderLock(FileLock):
    """One training process per run folder: the folder's FileLock, held for the whole job (a
    second resume of the same last.ckpt is refused with one ConfigError)."""

    def __init__(self, folder: str | os.PathLike):
        super().__init__(folder, error=ConfigError)

    def acquire(self, wait: bool = False, poll: float = 0.5,
                waiting: Callable[[], None] | None = None) -> RunFolderLock:
        if self.held:
            return self
        check_writable(self.path, "the run folder", hint="Run from a writable folder, or set "
                       "hydra.run.dir=<a writable folder>", keep=True)
        try:
            super().acquire(wait, poll, waiting)
        except Locked:
            raise ConfigError(f"the run folder {self.path} is in use by another training process "
                              "(a second resume of the same checkpoint?): one process per run. "
                              "Wait for it to finish, or resume from a copy in another "
                              "folder") from None
        return self
