"""What an existing output file holds: the records done, the errors, a torn last line."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pagedbatch.files import atomic_write
from pagedbatch.job.jsonl import loads

RecordId = str | int


class OutputFileError(ValueError):
    """An output file that pagedbatch did not write (or that was damaged); one line."""


@dataclass
class OutputScan:
    """The whole lines of an output file, by record id.

    `size` is the byte length of the whole lines; a torn last line (no newline: the
    process died while writing it) follows them when `torn`.
    """

    ok: set[RecordId] = field(default_factory=set)
    errors: dict[RecordId, dict[str, Any]] = field(default_factory=dict)  # id -> error object
    size: int = 0
    torn: bool = False
    lines: dict[RecordId, int] = field(default_factory=dict)  # id -> its first line number
    duplicates: list[tuple[RecordId, int, int]] = field(default_factory=list)  # id, first, again

    @property
    def done(self) -> set[RecordId]:
        return self.ok | self.errors.keys()

    @property
    def empty(self) -> bool:
        return self.size == 0 and not self.torn


def scan_output(path: Path) -> OutputScan:
    """Read an output file (plain or OpenAI batch lines); a missing file is empty."""
    scan = OutputScan()
    try:
        file = path.open("rb")
    except FileNotFoundError:
        return scan
    with file:
        for n, raw in enumerate(file, start=1):
            if not raw.endswith(b"\n"):
                scan.torn = True
                break
            if raw.strip():
                rid, error = _parse_line(raw, path, n)
                if rid in scan.lines:
                    scan.duplicates.append((rid, scan.lines[rid], n))
                scan.lines.setdefault(rid, n)
                if error is None:
                    scan.ok.add(rid)
                    scan.errors.pop(rid, None)
                elif rid not in scan.ok:
                    scan.errors[rid] = error
            scan.size += len(raw)
    return scan


def cut_torn_line(path: Path, scan: OutputScan) -> None:
    """Drop the torn last line, if any, so that the next line starts on a line of its own."""
    if scan.torn:
        os.truncate(path, scan.size)
        scan.torn = False


def drop_error_lines(path: Path, scan: OutputScan) -> None:
    """Rewrite the file without its error lines, atomically (a new file renamed over it).

    Call `cut_torn_line` first.
    """
    with path.open("rb") as src, atomic_write(path) as dst:
        for n, raw in enumerate(src, start=1):
            if raw.strip() and _parse_line(raw, path, n)[1] is None:
                dst.write(raw)
    scan.size = path.stat().st_size
    scan.errors.clear()


def _parse_line(raw: bytes, path: Path, n: int) -> tuple[RecordId, dict[str, Any] | None]:
    """(record id, error object or None) of one output line."""
    try:
        line = loads(raw)
    except ValueError:  # not JSON, not UTF-8, or nested too deeply
        line = None
    rid = line.get("custom_id", line.get("id")) if isinstance(line, dict) else None
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise OutputFileError(
            f"{path}: line {n} is not a pagedbatch output line; the file was not written by "
            "pagedbatch or is damaged (start over with --overwrite, or fix the line)"
        )
    error = line.get("error")
    if error is not None and not isinstance(error, dict):
        error = {"message": str(error)}
    return rid, error
