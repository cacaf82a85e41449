"""Files that are whole or absent: written beside their place, fsynced, renamed into it."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "wb", **open_args: Any) -> Iterator[IO[Any]]:
    """Open `<path>.tmp` for writing; on a clean exit fsync it and rename it over `path`.

    A crash at any point leaves `path` either as it was or complete; on an exception the
    temporary file is removed and `path` is untouched. Whatever is at `<path>.tmp` before
    is removed first, not written through (a symlink to another file). The new file keeps
    the permissions of the one it replaces.
    An OSError raised while writing (a full disk) names `path`.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.unlink(missing_ok=True)  # a leftover, or a link to a file that is not ours
        with tmp.open(mode, **open_args) as f:
            _keep_mode(path, f.fileno())
            yield f
            f.flush()
            os.fsync(f.fileno())
        replace_file(tmp, path)
    except OSError as e:
        raise named(e, path, instead_of=tmp) from None
    finally:
        tmp.unlink(missing_ok=True)


def named(e: OSError, path: Path, instead_of: Path | None = None) -> OSError:
    """`e`, naming `path` when it names no file (a write or fsync on a descriptor) or names
    `instead_of` (a temporary file the user never asked for)."""
    if e.filename is not None and (instead_of is None or e.filename != str(instead_of)):
        return e
    return type(e)(e.errno, e.strerror, str(path))


def _keep_mode(path: Path, fd: int) -> None:
    """Give the new file the permissions of the one it replaces (a 0600 output stays so)."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return
    os.fchmod(fd, mode)


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """A fresh staging directory beside `target`, renamed to `target` on a clean exit.

    If another process created `target` first, its copy wins and ours is dropped.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        try:
            os.replace(staging, target)
        except OSError:
            if not target.is_dir():  # not a concurrent writer that finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_file(src: Path, dst: Path) -> None:
    """Rename `src` over `dst` and make the rename itself durable."""
    os.replace(src, dst)
    fd = os.open(dst.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_kind(mode: int) -> str:
    """What a file of this st_mode is, in words ("a FIFO (named pipe)")."""
    kinds = [
        (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ]  # fmt: skip
    return next((name for test, name in kinds if test(mode)), "of an unknown kind")
