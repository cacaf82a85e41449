"""What an existing output file holds: the records done, the errors, a torn last line."""

from __future__ import annotations

import json
import os
from array import array
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pagedbatch.files import atomic_write
from pagedbatch.inputs.id_keys import IdSet, id_key, key_array, repeated
from pagedbatch.inputs.jsonl import loads

RecordId = str | int
LINE_START = b'{"id": '  # how every line pagedbatch writes begins (plain and OpenAI batch)
QUARANTINE_KEY = "pagedbatch_error"  # the field every line of an errors file holds
_DUPLICATES_NAMED = 3


class OutputFileError(ValueError):
    """An output file that pagedbatch did not write (or that was damaged); one line."""


@dataclass
class OutputScan:
    """The whole lines of an output file: the ids done (as keys, id_keys.py), the errors.

    `size` is the byte length of the whole lines; a torn last line (no newline: the
    process died while writing it) follows them when `torn`. Held per line: 16 bytes of
    key, and the error object of a record whose line is an error.
    """

    ok: IdSet = field(default_factory=IdSet)  # ids with an ok line
    errors: dict[RecordId, dict[str, Any]] = field(default_factory=dict)  # the others' errors
    size: int = 0
    torn: bool = False
    lines: int = 0  # whole non-blank lines
    duplicates: list[tuple[RecordId, int, int]] = field(default_factory=list)  # id, first, again
    duplicate_count: int = 0  # ids on more than one line (`duplicates` names a few)

    @property
    def done(self) -> IdSet:
        return self.ok.union(IdSet.of(self.errors))

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
    keys, ok_keys, numbers = bytearray(), bytearray(), array("q")
    with file:
        for n, raw in enumerate(file, start=1):
            if not raw.endswith(b"\n"):
                _check_torn(raw, path, n)
                scan.torn = True
                break
            if raw.strip():
                rid, error = _parse_line(raw, path, n)
                key = id_key(rid)
                keys += key
                numbers.append(n)
                if error is None:
                    ok_keys += key
                else:
                    scan.errors[rid] = error
            scan.size += len(raw)
    scan.lines = len(numbers)
    scan.ok = IdSet(ok_keys)
    scan.errors = {rid: e for rid, e in scan.errors.items() if rid not in scan.ok}
    again = repeated(key_array(keys))
    scan.duplicate_count = len(again)
    shown = [(numbers[first], numbers[second]) for first, second in again[:_DUPLICATES_NAMED]]
    ids = _ids_on_lines(path, {n for pair in shown for n in pair})
    scan.duplicates = [(ids[a], a, b) for a, b in shown]
    return scan


def output_ids(path: Path) -> Iterator[RecordId]:
    """The id of every whole line of an output that `scan_output` accepted, in order."""
    with path.open("rb") as file:
        for n, raw in enumerate(file, start=1):
            if not raw.endswith(b"\n"):
                return
            if raw.strip():
                yield _parse_line(raw, path, n)[0]


def _ids_on_lines(path: Path, numbers: set[int]) -> dict[int, RecordId]:
    found: dict[int, RecordId] = {}
    if not numbers:
        return found
    with path.open("rb") as file:
        for n, raw in enumerate(file, start=1):
            if n in numbers:
                found[n] = _parse_line(raw, path, n)[0]
                if len(found) == len(numbers):
                    break
    return found


def check_errors_file(path: Path) -> None:
    """Raise OutputFileError unless every line of `path` (when it exists) is a failed record's
    line, as `--errors` writes them: a resume rebuilds the errors file, and must not
    replace a file pagedbatch did not write. A last line without its newline (a killed
    writer's) need only start as a JSON object."""
    try:
        file = path.open("rb")
    except FileNotFoundError:
        return
    with file:
        for n, raw in enumerate(file, start=1):
            if not raw.strip() or (not raw.endswith(b"\n") and raw.startswith(b"{")):
                continue
            try:
                line = loads(raw)
            except ValueError:
                line = None
            if not isinstance(line, dict) or QUARANTINE_KEY not in line:
                raise OutputFileError(
                    f"{path}: line {n} is not a failed record's line (each holds "
                    f"'{QUARANTINE_KEY}'), so it is not this job's errors file and a resume "
                    "would replace it; give another --errors path, or --overwrite to start over"
                )


def edited_line(path: Path, written: Mapping[str, str], id_fields: tuple[str, ...]) -> int | None:
    """The number of the first whole line of errors file `path` that a resume would
    rebuild otherwise: its id (the first of `id_fields` it holds) is one the rebuild writes
    a line for (`written`: id -> line, each as `canonical` gives it), and the line is not
    that one (edited by hand). None when there is none."""
    try:
        file = path.open("rb")
    except FileNotFoundError:
        return None
    with file:
        for n, raw in enumerate(file, start=1):
            if not raw.strip() or not raw.endswith(b"\n"):
                continue
            line = loads(raw)
            rid = next((line[f] for f in id_fields if f in line), None)
            if (expected := written.get(canonical(rid))) is not None and expected != canonical(
                line
            ):
                return n
    return None


def canonical(line: Any) -> str:
    """A line's JSON with its keys sorted: equal for lines that hold the same values."""
    return json.dumps(line, sort_keys=True, ensure_ascii=True)


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


def _check_torn(raw: bytes, path: Path, n: int) -> None:
    """A last line without its newline is what a killed writer leaves, and a resume cuts it
    off: it must be the start of an output line (every one starts `{"id": `), not the
    bytes of a file pagedbatch did not write."""
    if not (raw.startswith(LINE_START) or LINE_START.startswith(raw)):
        raise OutputFileError(
            f"{path}: line {n} (the last, without a newline) is not the start of a pagedbatch "
            "output line; the file was not written by pagedbatch or is damaged (fix the line, "
            "or give another output path; pagedbatch does not replace it, even with --overwrite)"
        )


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
            "pagedbatch or is damaged (fix the line, or give another output path; pagedbatch "
            "does not replace it, even with --overwrite)"
        )
    error = line.get("error")
    if error is not None and not isinstance(error, dict):
        error = {"message": str(error)}
    return rid, error
