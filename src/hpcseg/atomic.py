"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Write to a temporary file in the same folder, flush and fsync it, rename it over the target, fsync the folder.
A write that fails for want of space (or quota, or a read-only filesystem) becomes one :class:`WriteError` line
naming the file, the filesystem and what is left intact.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import UserError

#: What torch's zip writer and numpy's tofile say when a write came up short: the disk or the quota is full.
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written|unexpected pos|file write failed")


class WriteError(UserError, OSError):
    """A file that could not be written (full disk, quota, read-only filesystem), in one line.

    An OSError too, so code that handles a failed write as an OSError still does."""


def _mount(path: Path) -> str:
    """The mount point of the filesystem holding `path` (or where it would be created)."""
    path = Path(os.path.abspath(path))
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return str(path)


def write_failure(err: BaseException, path: Path | str, doing: str) -> WriteError | None:
    """`err` as one WriteError line naming `path`, its filesystem and `doing` (what was written, what is intact);
    None for an error that is not a failed write."""
    if isinstance(err, WriteError):
        return None
    if isinstance(err, OSError) and err.errno is not None:
        reason = os.strerror(err.errno)
    elif isinstance(err, (OSError, RuntimeError)) and _SHORT_WRITE.search(str(err)):
        reason = os.strerror(errno.ENOSPC)
    else:
        return None
    failure = WriteError(f"{path}: {reason[:1].lower()}{reason[1:]} (filesystem {_mount(Path(path))}; {doing})")
    failure.errno = getattr(err, "errno", None) or errno.ENOSPC
    return failure


@contextlib.contextmanager
def writing(path: Path | str, doing: str) -> Iterator[None]:
    """Turns a failed write inside the block into one WriteError line (see :func:`write_failure`)."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        failure = write_failure(err, path, doing)
        if failure is None:
            raise
        raise failure from None


@contextlib.contextmanager
def atomic_path(path: Path | str, what: str = "file") -> Iterator[Path]:
    """Yields a temporary path beside `path`; on success it replaces `path` durably, on error it is removed.

    A failed write (full disk...) raises WriteError naming `path`, the `what` and that the previous one is intact."""
    path = Path(path)
    doing = f"writing the {what}; " + (f"the previous {what} is intact" if path.exists() else "nothing was written")
    with writing(path, doing):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            yield tmp
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)


def remove_stale_temporaries(*paths: Path | str) -> None:
    """Remove the temporaries that :func:`atomic_path` left beside `paths` when its process was killed (kill -9
    during a write): only files named as it names them, `.<name>.<8 random characters>.tmp`. Call it where no
    other process is writing these files."""
    for path in map(Path, paths):
        ours = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")
        if not path.parent.is_dir():
            continue
        for entry in path.parent.iterdir():
            if ours.fullmatch(entry.name) and entry.is_file() and not entry.is_symlink():
                entry.unlink(missing_ok=True)


#: what fsync of a directory says on file systems that cannot sync one (some parallel and FUSE file systems)
_NO_DIR_FSYNC = (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP)


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable where the file system can; the rename itself has already succeeded, so a file system
    that cannot sync a directory (EINVAL on GPFS-like and FUSE mounts) leaves the new file in place, not an error."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in _NO_DIR_FSYNC:
            raise
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path | str, data: bytes, what: str = "file") -> None:
    with atomic_path(path, what) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path | str, text: str, what: str = "file") -> None:
    atomic_write_bytes(path, text.encode(), what)


def append_jsonl(path: Path | str, record: dict) -> None:
    """Append `record` as one JSON line, on disk before returning (a job may be killed right after)."""
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
