"""Digests of what an input held as the job read it: a record's (8 bytes, compared on resume),
a JSONL file's bytes as they were read, and the input's identity for the fingerprint."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pagedbatch.requests.records import Record

RECORD_DIGEST_BYTES = 8


def record_digest(record: Record) -> bytes:
    row = json.dumps(record.source, sort_keys=True, ensure_ascii=False, default=str)
    text = f"{record.id!r}\0{row}"
    h = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=RECORD_DIGEST_BYTES)
    return h.digest()


def content_hasher(split: str | None, size: int) -> Any:
    """The hash of an input file's `size` bytes, before they are fed to it (`update`): its
    `hexdigest()` is the file's `input_identity`."""
    h = hashlib.blake2b(f"split:{split}".encode(), digest_size=8)
    h.update(f"{size}\0".encode())
    return h


def input_identity(
    source: str, split: str | None, content_digest: str | None = None, rows: bytes | None = None
) -> str:
    """A digest of the input's content as the job read it: `content_digest` when the reader
    hashed the file's bytes as it read them (JSONL: see `content_hasher`), else of `rows`,
    the records' digests sorted (a table, or a hub dataset, is never read a second time to
    hash it: a file changed in between would be described by bytes the job never read).
    Without either (no job to read it), of the name."""
    if content_digest is not None:
        return content_digest
    h = hashlib.blake2b(f"split:{split}".encode(), digest_size=8)
    if rows is not None:
        h.update(b"rows\0" + rows)
    else:
        h.update(f"name:{source}".encode())
    return h.hexdigest()
