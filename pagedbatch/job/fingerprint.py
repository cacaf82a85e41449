"""A job's identity, stored beside its output so that `--resume` can refuse another job.

The fingerprint holds what decides the text of every line: the model and tokenizer
files, the prompt shaping (template, system message, chat, field names, context cap),
the sampling defaults with the job seed, and the input's content; and the order of the
lines (`--order input`). Device, dtype and
KV cache size are left out: a job may resume on another machine.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from pagedbatch.files import atomic_write
from pagedbatch.inputs.digests import RECORD_DIGEST_BYTES, input_identity, record_digest
from pagedbatch.inputs.jsonl import loads
from pagedbatch.job.settings import DEFAULT_ORDER, RunSettings
from pagedbatch.models.names import ALIASES, alias_gguf_path
from pagedbatch.requests.records import Record
from pagedbatch.sampling_params import CONTROLS, SamplingParams, not_text

SUFFIX = ".job.json"
# A digest of every record (id and row), so that a resume on a changed input can tell
# which records changed: see `record_changes`.
RECORDS_KEY = "record_digests"
# Stored for people to read, not compared: a moved input or model is the same job. The
# record digests are compared record by record (`record_changes`), not as a whole.
_INFO_KEYS = ("model_name", "input_path", RECORDS_KEY)
_TOKENIZER_PREFIXES = (
    "tokenizer", "vocab", "merges", "special_tokens_map", "added_tokens", "chat_template",
)  # fmt: skip
_WHOLE_FILE_BYTES = 16 * 2**20  # bigger files (weights) are hashed by size, head and tail
_HEAD_TAIL_BYTES = 4 * 2**20
_CHUNK = 2**20

Fingerprint = dict[str, Any]
# Keys stored only when not their default (so the job digest of every other job, and a
# fingerprint written before the key existed, stay as they were): their value when absent.
_ABSENT_MEANS = {"order": DEFAULT_ORDER}
_SAMPLING_DEFAULTS = json.loads(json.dumps(dataclasses.asdict(SamplingParams())))


def fingerprint_path(output: Path) -> Path:
    return output.with_name(output.name + SUFFIX)


def job_fingerprint(
    source: str,
    settings: RunSettings,
    content_digest: str | None = None,
    records: Iterable[Record] | bytes | None = None,
) -> Fingerprint:
    """The fingerprint of running `settings` over `source` (`content_digest`: the input's
    content hashed as the reader read it, so the file is not read again; `records` adds
    the records' digests: the records, or their digests sorted and joined); raises
    ModelLoadError for an alias whose package is missing."""
    engine = settings.engine
    model, tokenizer = model_identity(engine.model)
    # As JSON stores it (tuples as lists), so that a resume compares equal; the controls
    # added after jobs were fingerprinted without them are left out at their defaults.
    sampling = json.loads(json.dumps(dataclasses.asdict(settings.sampling)))
    for name in CONTROLS:
        if sampling[name] == _SAMPLING_DEFAULTS[name]:
            del sampling[name]
    if records is not None and not isinstance(records, bytes):
        records = b"".join(sorted(record_digest(r) for r in records))
    return {
        "model": model,
        "tokenizer": tokenizer,
        "max_model_len": settings.engine.max_model_len,
        "chat": settings.engine.chat,
        **_given(
            chat_template_kwargs=settings.engine.chat_template_kwargs,
            reasoning_parser=None if engine.reasoning_parser == "auto" else engine.reasoning_parser,
        ),
        "template": settings.template,
        "system": settings.system,
        "fields": [settings.prompt_field, settings.messages_field, settings.id_field],
        **sampling,
        # The order of the lines: a file started in one order and resumed in the other
        # would be in neither. Stored only when not the default (see _ABSENT_MEANS).
        **({"order": settings.order} if settings.order != DEFAULT_ORDER else {}),
        "input": input_identity(source, settings.split, content_digest, records),
        "model_name": settings.engine.model,
        "input_path": os.path.abspath(source) if os.path.exists(source) else source,
        **({RECORDS_KEY: base64.b64encode(records).decode()} if records is not None else {}),
    }


def _given(**settings: Any) -> dict[str, Any]:
    """The settings given (not None; a default is given as None): settings added after jobs
    were fingerprinted without them, so that such a job still resumes when it leaves them
    at their default."""
    return {k: v for k, v in settings.items() if v is not None}


def changes(stored: Fingerprint, current: Fingerprint) -> list[str]:
    """`key (old -> new)` for every compared key that differs."""
    keys = sorted((stored.keys() | current.keys()) - set(_INFO_KEYS))

    def value(fingerprint: Fingerprint, key: str) -> Any:
        return fingerprint.get(key, _ABSENT_MEANS.get(key))

    return [
        f"{k} ({_short(value(stored, k))} -> {_short(value(current, k))})"
        for k in keys
        if value(stored, k) != value(current, k)
    ]


def record_changes(
    stored: Fingerprint, digest_of: Callable[[Any], bytes | None], done: Iterable[Any]
) -> tuple[list[Any], list[Any]] | None:
    """(ids of done records whose id or row is not as stored, ids done but no longer in the
    input), each in the order of `done`; `digest_of(id)` is the input's digest of that
    record (None: not in the input). None when `stored` holds no record digests."""
    text = stored.get(RECORDS_KEY)
    if not isinstance(text, str):
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        return None
    known = np.frombuffer(raw[: len(raw) // RECORD_DIGEST_BYTES * RECORD_DIGEST_BYTES], "V8")
    changed, removed = [], []
    for rid in done:
        digest = digest_of(rid)
        if digest is None:
            removed.append(rid)
        else:
            at = min(int(np.searchsorted(known, np.frombuffer(digest, "V8"))[0]), len(known) - 1)
            if not len(known) or known[at].tobytes() != digest:
                changed.append(rid)
    return changed, removed


def job_digest(fingerprint: Fingerprint) -> str:
    """A short id of the job (of the compared keys): 16 hex digits."""
    compared = {k: v for k, v in fingerprint.items() if k not in _INFO_KEYS}
    text = json.dumps(compared, sort_keys=True, ensure_ascii=False)
    # surrogatepass: a name from the command line that is not UTF-8 (surrogate-escaped)
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def load_fingerprint(path: Path) -> Fingerprint | None:
    """The stored fingerprint; None when there is none, {} when it cannot be read."""
    try:
        value = loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def save_fingerprint(path: Path, fingerprint: Fingerprint) -> None:
    """Write the fingerprint atomically (beside, then renamed into place)."""
    text = json.dumps(fingerprint, indent=1, ensure_ascii=False)
    if not_text(text) is not None:  # a path that is not UTF-8: written as JSON escapes
        text = json.dumps(fingerprint, indent=1)
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def model_identity(model: str) -> tuple[str, str]:
    """(model digest, tokenizer digest) of an alias, a .gguf file, a directory or a hub id."""
    path = alias_gguf_path(model) if model in ALIASES else Path(model).expanduser()
    if path.is_file():  # a GGUF file holds its tokenizer
        digest = _digest([path])
        return digest, digest
    if not path.is_dir():
        return f"hub:{model}", f"hub:{model}"
    files = sorted(f for f in path.iterdir() if f.is_file() and not f.name.startswith("."))
    tokenizer = [f for f in files if f.name.startswith(_TOKENIZER_PREFIXES)]
    return _digest([f for f in files if f not in tokenizer]), _digest(tokenizer)


def _digest(files: list[Path]) -> str:
    h = hashlib.blake2b(digest_size=8)
    for file in files:
        h.update(f"\0{file.name}\0".encode())
        _hash_file(h, file)
    return h.hexdigest()


def _hash_file(h: Any, path: Path) -> None:
    size = path.stat().st_size
    h.update(f"{size}\0".encode())
    with path.open("rb") as f:
        if size <= _WHOLE_FILE_BYTES:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
            return
        h.update(f.read(_HEAD_TAIL_BYTES))
        f.seek(size - _HEAD_TAIL_BYTES)
        h.update(f.read(_HEAD_TAIL_BYTES))


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."
