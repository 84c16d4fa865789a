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

The bottom layer beside errors (docs/DESIGN.md §2): imports nothing of the package but errors.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import IO, Any

from dsr_lightning.errors import WriteError

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
