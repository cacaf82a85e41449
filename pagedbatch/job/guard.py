"""What keeps a job off its user's other files: distinct paths, regular files, one run per output.

`check_paths` refuses, before anything is read or written, an output, errors file or
fingerprint that is the input (or inside an input directory) or one another, and any of
them (the input too) that is not a regular file: a FIFO would block, a device read
forever. `check_writable` opens each file the job will write without changing it, and
checks that a file can be created where one will be, so that an immutable or read-only
file or directory is refused before the model loads. `OutputLock` is
an advisory lock beside the output, held for the life of the job: a second run on the
same output is refused, naming the process that holds it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

from pagedbatch.files import file_kind

LOCK_SUFFIX = ".lock"
# The written files the user names (-o, --errors, --summary-json).
USER_ROLES = ("output", "errors file", "summary file")


class GuardError(Exception):
    """A file the job must not touch, or cannot; `str()` is one line naming it."""


def check_paths(source: str, roles: Iterable[tuple[str, Path]]) -> None:
    """Refuse files that would overwrite the input or each other, and non-regular files.

    `roles` holds (role, path) of the files the job writes, e.g. ("output", out.jsonl);
    the user names those of USER_ROLES, the others are named after them (the fingerprint,
    lock files), so a clash is told as the user's file to move. Two paths are the same
    file when they resolve alike or share device and inode (hard links, symlinks, bind
    mounts). A written file inside an input directory is refused too: it would become
    part of the input. `-` (stdout) is refused: a job's output is a file a resume reads.
    """
    written = list(roles)
    for role, path in written:
        if role in USER_ROLES and str(path) == "-":
            raise GuardError(
                f"the {role} cannot be stdout ('-'): it is a file that --resume reads back; "
                "give a file path"
            )
        _check_regular(path, role)
    input_path = Path(source)
    input_mode = _mode(input_path)
    if input_mode is not None and not stat.S_ISDIR(input_mode):
        _check_regular(input_path, "input")
    seen: list[tuple[str, Path]] = []
    if input_mode is not None:
        seen.append(("input", input_path))
    for role, path in written:
        for other_role, other in seen:
            if other_role == "input" and input_mode is not None and stat.S_ISDIR(input_mode):
                if _inside(path, other):
                    raise GuardError(
                        f"the {role} {path} is inside the input directory {other}; "
                        "write it somewhere else"
                    )
            elif _same_file(path, other):
                move = role if role in USER_ROLES else _user_role(other_role, role)
                raise GuardError(
                    f"the {role} {path} is the same file as the {other_role} {other}; "
                    f"give the {move} another path"
                )
        seen.append((role, path))


def check_writable(appended: Iterable[Path], rewritten: Iterable[Path] = ()) -> None:
    """Refuse, before any work starts, a file the job could not write: read-only, immutable,
    or in a directory where no file can be created (immutable, read-only). `appended`: files
    written in place; an existing one is opened for appending, writing nothing, a missing
    one must be creatable. `rewritten`: files written whole (staged beside, then renamed
    over: atomic_write), whose directory must take a new file."""
    for path in appended:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK)
        except FileNotFoundError:
            _check_creatable(path)
            continue
        except OSError as e:
            raise GuardError(f"{path}: cannot write it ({e.strerror or e})") from None
        os.close(fd)
    for path in rewritten:
        _check_creatable(path)


def _check_creatable(path: Path) -> None:
    """Create and remove a file in the directory that holds (or, once created, will hold)
    `path`: GuardError naming `path` when that fails."""
    directory = path.parent
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent  # the job creates the directories below it
    try:
        fd, name = tempfile.mkstemp(prefix=".pagedbatch-", suffix=".check", dir=directory)
    except OSError as e:
        raise GuardError(
            f"{path}: cannot write it (no new file can be created in {directory}: "
            f"{e.strerror or e})"
        ) from None
    os.close(fd)
    os.unlink(name)


class OutputLock:
    """An exclusive advisory lock (flock) on `<output>.lock`, created beside the output.

    The file holds the owner's process id, for the message of a run that finds it held.
    `release` deletes the file while still holding the lock; `acquire` checks that the
    file it locked is still the one at the path (else it lost a race with a release and
    tries again). A process that dies releases its lock with it; the file it leaves is
    taken over by the next run.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @classmethod
    def beside(cls, target: Path) -> OutputLock:
        return cls(target.with_name(target.name + LOCK_SUFFIX))

    def acquire(self, role: str = "output") -> None:
        """Take the lock, or raise GuardError naming the process that holds it."""
        target = self.path.with_name(self.path.name.removesuffix(LOCK_SUFFIX))
        _check_regular(self.path, "lock file")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise GuardError(f"{self.path.parent}: cannot create it ({e.strerror or e})") from None
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                owner = _read_owner(fd)
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise GuardError(
                        f"the {role} {target} is in use by another pagedbatch run "
                        f"({'process ' + owner if owner else 'its lock is ' + str(self.path)}); "
                        "wait for it to finish or stop it"
                    ) from None
                raise GuardError(f"{self.path}: cannot lock it ({e.strerror or e})") from None
            if self._still_there(fd):
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        """Delete the lock file and let the lock go; a no-op when not held."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(fd)

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            reason = e.strerror or e
            raise GuardError(f"{self.path}: cannot create the lock file ({reason})") from None

    def _still_there(self, fd: int) -> bool:
        try:
            on_disk = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (on_disk.st_dev, on_disk.st_ino) == (mine.st_dev, mine.st_ino)


def _read_owner(fd: int) -> str:
    with contextlib.suppress(OSError):
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if text.isdigit():
            return text
    return ""


def _check_regular(path: Path, role: str) -> None:
    mode = _mode(path)
    if mode is None or stat.S_ISREG(mode):
        return
    raise GuardError(f"the {role} {path} is {file_kind(mode)}, not a regular file")


def _mode(path: Path) -> int | None:
    """st_mode of `path` (links followed), None when nothing is there."""
    try:
        return os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise GuardError(f"{path}: cannot inspect it ({e.strerror or e})") from None


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _user_role(other_role: str, derived_role: str) -> str:
    """Which file the user should move when a file named after theirs (`derived_role`, e.g.
    the errors file's lock file) is `other_role`'s file: that one if the user named it,
    else the one `derived_role` is named after."""
    if other_role in USER_ROLES:
        return other_role
    return next((r for r in USER_ROLES[::-1] if derived_role.startswith(r)), USER_ROLES[0])


def _inside(path: Path, directory: Path) -> bool:
    return path.resolve().is_relative_to(directory.resolve())
