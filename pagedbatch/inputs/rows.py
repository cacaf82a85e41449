"""The rows of an input as a stream, each readable again by its locator.

A job of millions of rows cannot hold them: it reads them in batches, keeps a locator
per record (8 bytes: a JSON Lines file's byte offset, a dataset's row index) and reads
a record's row again when the record is run. JSON Lines files are read strictly
(jsonl.py), every problem named by its line; `datasets` tables are read in Arrow
batches (`DatasetRows`).
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from pagedbatch.inputs.digests import content_hasher
from pagedbatch.inputs.jsonl import JsonlError, parse_object

# (position, locator, row): the line number or row index, where to read the row again,
# and the row (a dict; a JsonlError for a bad line read with skip_invalid).
Row = tuple[int, int, Any]
BATCH_ROWS = 1024
_CHUNK = 1 << 20  # bytes read at a time
_ROW_CHUNK = 4096  # bytes read first for one row


class InputError(Exception):
    """A problem with the input as a whole; `str()` is one line naming the file (and line)."""


class RowSource(Protocol):
    name: str
    unit: str  # "line" or "row", as a message names a position
    identity: str | None  # digest of the content, once read in full (None: not hashed here)

    def batches(self, size: int = BATCH_ROWS) -> Iterator[list[Row]]: ...

    def row_at(self, locator: int, position: int) -> Any: ...


class JsonlRows:
    """The non-blank lines of a JSON Lines file. The file stays open while the job runs,
    so a row read again comes from the file that was read, not from a file renamed over
    it; the first full read hashes the content (`identity`)."""

    unit = "line"

    def __init__(self, path: Path, name: str, split: str | None, skip_invalid: bool) -> None:
        self.name = name
        self.identity: str | None = None
        self._split = split
        self._skip_invalid = skip_invalid
        self._file = path.open("rb")  # an OSError is the reader's to report
        self._size = os.fstat(self._file.fileno()).st_size

    def close(self) -> None:
        self._file.close()

    def batches(self, size: int = BATCH_ROWS) -> Iterator[list[Row]]:
        """Every non-blank line from the start, `size` at a time."""
        self._check_unchanged()
        hasher = content_hasher(self._split, self._size) if self.identity is None else None
        offset, batch = 0, []
        for n, raw in enumerate(self._lines(), start=1):
            start, offset = offset, offset + len(raw)
            if hasher is not None:
                hasher.update(raw)
            if n == 1 and raw.startswith(codecs.BOM_UTF8):
                start += len(codecs.BOM_UTF8)
                raw = raw[len(codecs.BOM_UTF8) :]
            if not raw.strip():
                continue
            batch.append((n, start, self._parse(raw, n)))
            if len(batch) >= size:
                yield batch
                batch = []
        if batch:
            yield batch
        if offset != self._size:
            raise InputError(f"{self.name}: changed while it was read; run the job again")
        if hasher is not None:
            self.identity = hasher.hexdigest()

    def row_at(self, locator: int, position: int) -> Any:
        self._check_unchanged()
        return self._parse(next(self._lines(locator, _ROW_CHUNK)), position)

    def _lines(self, offset: int = 0, chunk: int = _CHUNK) -> Iterator[bytes]:
        """The lines from `offset` on, each with its newline (the last may lack it), read
        `chunk` bytes at a time (more while a line does not end). Read with pread, so that
        any number of readers share the descriptor without a seek."""
        fd, rest = self._file.fileno(), b""
        while data := os.pread(fd, chunk, offset):
            offset += len(data)
            lines = (rest + data).split(b"\n")
            rest = lines.pop()
            if not lines:
                chunk = min(2 * chunk, _CHUNK)
            for line in lines:
                yield line + b"\n"
        if rest:
            yield rest

    def _parse(self, raw: bytes, n: int) -> dict[str, Any] | JsonlError:
        cut_off = not raw.endswith(b"\n")
        try:
            return parse_object(raw if cut_off else raw[:-1], n, cut_off=cut_off)
        except JsonlError as e:
            if not self._skip_invalid:
                raise InputError(f"{self.name}: {e}") from None
            return e

    def _check_unchanged(self) -> None:
        if os.fstat(self._file.fileno()).st_size != self._size:
            raise InputError(
                f"{self.name}: changed while the job ran (its size is not what was read)"
            )


class DatasetRows:
    """The rows of a `datasets` table, converted from Arrow a batch at a time (a saved
    dataset is a private copy: reader._load_saved)."""

    unit = "row"
    identity = None  # a table is hashed by its records' digests (fingerprint.input_identity)

    def __init__(self, data: Any, name: str, messages_field: str) -> None:
        self.name = name
        self._data = data.with_format(None)
        self._messages = messages_field

    def close(self) -> None:
        pass

    def batches(self, size: int = BATCH_ROWS) -> Iterator[list[Row]]:
        for start in range(0, len(self._data), size):
            columns = self._data[start : start + size]
            names = list(columns)
            rows = (dict(zip(names, values, strict=True)) for values in zip(*columns.values()))
            yield [(start + i, start + i, self._plain(row)) for i, row in enumerate(rows)]

    def row_at(self, locator: int, position: int) -> Any:
        return self._plain(self._data[locator])

    def _plain(self, row: dict[str, Any]) -> dict[str, Any]:
        """The row with its messages as a list of dicts, as they were before Arrow stored
        them."""
        messages = row.get(self._messages)
        if isinstance(messages, dict) and all(isinstance(v, list) for v in messages.values()):
            # A legacy `Sequence` of structs comes back as a dict of equal-length lists.
            messages = [
                dict(zip(messages, values, strict=True))
                for values in zip(*messages.values(), strict=True)
            ]
        if not isinstance(messages, list):
            return row
        # Arrow gives every struct all keys of its column; a key one message lacked is None.
        plain = [
            {k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m
            for m in messages
        ]
        return {**row, self._messages: plain}
