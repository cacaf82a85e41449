"""Crash-safe JSON Lines output: whole lines, appended, flushed, fsynced every few seconds."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pagedbatch.files import named
from pagedbatch.outputs import RequestOutput

SYNC_INTERVAL_S = 2.0


class OutputWriter:
    """Appends one JSON line per call to a file; a context manager.

    Each line goes to the operating system in one unbuffered write, so a killed process
    leaves whole lines and at most one torn last line (which a resume drops, see
    output_scan.py). The file is fsynced when `sync_interval` seconds have passed since
    the last fsync (checked on every write and by `sync_if_due`) and on close. A write
    that fails (a full disk) is cut back off the file before the error is raised.
    """

    def __init__(self, path: str | os.PathLike[str], sync_interval: float = SYNC_INTERVAL_S):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.sync_interval = sync_interval
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._size = os.lseek(self._fd, 0, os.SEEK_END)  # bytes of whole lines
        self._synced_at = time.monotonic()
        self.count = 0  # lines written by this writer

    def write(self, output: RequestOutput) -> None:
        """Append the output's JSON line (RequestOutput.to_json)."""
        self.write_line(output.to_json())

    def write_line(self, line: Mapping[str, Any]) -> None:
        """Append `line` as one JSON line."""
        if self._fd is None:
            raise ValueError(f"{self.path}: OutputWriter is closed")
        data = encode_line(line)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as e:
            _truncate(self._fd, self._size)
            raise named(e, self.path) from None
        self._size += len(data)
        self.count += 1
        self.sync_if_due()

    def sync_if_due(self) -> None:
        """fsync when `sync_interval` seconds have passed since the last one."""
        if self._fd is not None and time.monotonic() - self._synced_at >= self.sync_interval:
            try:
                os.fsync(self._fd)
            except OSError as e:
                raise named(e, self.path) from None
            self._synced_at = time.monotonic()

    def close(self) -> None:
        """fsync and close the file; closing twice is a no-op."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.fsync(fd)
        except OSError as e:
            raise named(e, self.path) from None
        finally:
            os.close(fd)

    def abandon(self) -> None:
        """Close at once, cutting a line being written: safe to call from a signal handler."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        _truncate(fd, self._size)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def __enter__(self) -> OutputWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def encode_line(line: Mapping[str, Any]) -> bytes:
    """One strict JSON line as UTF-8: non-ASCII kept, lone surrogates escaped, NaN and
    infinities written as null (JSON has no such numbers), other types via str()."""
    try:
        text = json.dumps(line, ensure_ascii=False, default=str, allow_nan=False)
    except ValueError:  # a NaN or an infinity somewhere
        text = json.dumps(_finite(line), ensure_ascii=False, default=str, allow_nan=False)
    try:
        return (text + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (json.dumps(json.loads(text)) + "\n").encode("ascii")


def _finite(value: Any) -> Any:
    """`value` with every float that is NaN or infinite replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _truncate(fd: int, size: int) -> None:
    with contextlib.suppress(OSError):  # else the line stays torn; a resume drops it
        os.ftruncate(fd, size)
