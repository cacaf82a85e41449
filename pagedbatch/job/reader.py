"""The input edge of pagedbatch: files, datasets and hub names in, records out.

JSON Lines files are read strictly by our own reader (jsonl.py), so that a broken file
is reported with its line number before any work starts. Everything else goes through
the Hugging Face `datasets` library, imported only when it is needed. Rows shaped like
OpenAI batch requests are read as such (openai_batch.py). Output lines go out through
`OutputWriter` (output_writer.py).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pagedbatch.job.guard import file_kind
from pagedbatch.job.jsonl import JsonlError, jsonl_rows, loads
from pagedbatch.job.openai_batch import is_batch_request, parse_batch_request
from pagedbatch.job.output_writer import OutputWriter
from pagedbatch.job.records import FieldMap, Record, invalid, parse_record

__all__ = ["InputData", "InputError", "OutputWriter", "read_input", "read_records"]

# Files read by our strict JSON Lines reader (a .json file only if it is JSON Lines).
_JSON_SUFFIXES = (".jsonl", ".json")
# Local data files read by `datasets`; the builder is named by the suffix without its dot.
_DATA_FILE_SUFFIXES = (".csv", ".parquet", ".arrow")
# A local file has one split, as `datasets` names it.
_FILE_SPLIT = "train"
_DEFAULT_FIELDS = FieldMap()
_MAX_REASON_CHARS = 200
_FIELD_SAMPLE = 100  # rows whose field names a wrong-field error lists
_FIELDS_SHOWN = 10


class InputError(Exception):
    """A problem with the input as a whole; `str()` is one line naming the file (and line)."""


@dataclass(frozen=True)
class InputData:
    """The records of an input, and the bytes of a JSON Lines file as they were read (the
    fingerprint hashes these: the file is read once, whatever happens to it after)."""

    records: list[Record]
    content: bytes | None = None


def read_records(
    source: str | os.PathLike[str],
    *,
    split: str | None = None,
    fields: FieldMap = _DEFAULT_FIELDS,
    skip_invalid: bool = False,
) -> list[Record]:
    """The records of `source`: `read_input(...).records`."""
    return read_input(source, split=split, fields=fields, skip_invalid=skip_invalid).records


def read_input(
    source: str | os.PathLike[str],
    *,
    split: str | None = None,
    fields: FieldMap = _DEFAULT_FIELDS,
    skip_invalid: bool = False,
) -> InputData:
    """Read every record of a JSONL file, a local data file, a dataset directory or a hub name.

    Raises InputError, before any record is used, for a problem with the input as a
    whole (unreadable, broken JSON, duplicate ids, unknown split). A problem with one
    record only is left on that record's `error`; with `skip_invalid`, so is a JSONL
    line that is not a JSON object. Records without an id get their 1-based line number
    (JSONL) or 0-based row index (datasets). When the first row is an OpenAI batch
    request, every row is read as one (their records have an `endpoint`). Anything but a
    regular file or a directory (a FIFO, a device) is refused.
    """
    name = os.fspath(source)
    path = Path(name)
    mode = _stat_mode(name)
    if mode is not None and stat.S_ISDIR(mode):
        return InputData(_dataset_records(_load_directory(path, name), name, split, fields))
    if mode is not None and not stat.S_ISREG(mode):
        raise InputError(f"{name}: is {file_kind(mode)}, not a regular file")
    if mode is not None:
        return _file_records(path, name, split, fields, skip_invalid)
    if path.suffix.lower() in _JSON_SUFFIXES + _DATA_FILE_SUFFIXES or _looks_like_path(name):
        raise InputError(f"{name}: no such file")
    return InputData(_hub_records(name, split, fields))


def _file_records(
    path: Path, name: str, split: str | None, fields: FieldMap, skip_invalid: bool
) -> InputData:
    suffix = path.suffix.lower()
    if suffix in _JSON_SUFFIXES:
        data = _read_bytes(path, name)
        return InputData(_json_records(data, name, suffix, split, fields, skip_invalid), data)
    if suffix not in _DATA_FILE_SUFFIXES:
        kinds = ", ".join(_JSON_SUFFIXES + _DATA_FILE_SUFFIXES)
        raise InputError(
            f"{name}: unsupported file type '{suffix}' (use {kinds} or a dataset directory)"
        )
    data = _load(name, lambda ds: ds.load_dataset(suffix[1:], data_files=name), "cannot read")
    return InputData(_dataset_records(data, name, split, fields))


def _json_records(
    data: bytes, name: str, suffix: str, split: str | None, fields: FieldMap, skip_invalid: bool
) -> list[Record]:
    """JSON Lines, strictly; a .json file that is one JSON document goes to `datasets`."""
    try:
        rows = jsonl_rows(data)
    except JsonlError as e:
        if suffix == ".json" and _is_one_json_document(data):
            loaded = _load(name, lambda ds: ds.load_dataset("json", data_files=name), "cannot read")
            return _dataset_records(loaded, name, split, fields)
        if not skip_invalid:
            raise InputError(f"{name}: {e}") from None
        rows = jsonl_rows(data, keep_going=True)
    _check_file_split(name, split)
    return _records(rows, name, fields, "line")


def _is_one_json_document(data: bytes) -> bool:
    try:
        return isinstance(loads(data), (list, dict))
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both are ValueErrors
        return False


def _check_file_split(name: str, split: str | None) -> None:
    if split is not None and split != _FILE_SPLIT:
        raise InputError(f"{name}: no split '{split}' (available: {_FILE_SPLIT})")


def _load_directory(path: Path, name: str) -> Any:
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        return _load(name, lambda ds: ds.load_from_disk(name), "cannot load saved dataset")
    return _load(name, lambda ds: ds.load_dataset(name), "not a dataset directory")


def _hub_records(name: str, split: str | None, fields: FieldMap) -> list[Record]:
    failure = "not a file, directory or reachable Hugging Face dataset"
    data = _load(name, lambda ds: ds.load_dataset(name, split=split), failure)
    return _dataset_records(data, name, None, fields)  # `datasets` chose the split given


def _load(name: str, load: Callable[[Any], Any], failure: str) -> Any:
    """`load(datasets_module)`; any failure becomes the InputError `{name}: {failure} (reason)`."""
    try:
        import datasets
    except ImportError:
        raise InputError(
            f"{name}: reading this input needs the 'datasets' package (pip install datasets)"
        ) from None
    datasets.utils.logging.set_verbosity_error()  # the library reads; it does not print
    datasets.disable_progress_bars()
    try:
        return load(datasets)
    # `datasets` raises many unrelated types for a bad input; all are the user's to fix.
    except Exception as e:
        raise InputError(f"{name}: {failure} ({_short_reason(e)})") from e


def _dataset_records(data: Any, name: str, split: str | None, fields: FieldMap) -> list[Record]:
    rows = _select_split(data, name, split).with_format(None)
    return _records(
        [(i, _plain_row(row, fields)) for i, row in enumerate(rows)], name, fields, "row"
    )


def _records(rows: list[tuple[int, Any]], name: str, fields: FieldMap, unit: str) -> list[Record]:
    """The record of every (position, row or JsonlError); `unit` is 'line' or 'row'."""
    first = next((row for _, row in rows if isinstance(row, Mapping)), None)
    batch = first is not None and is_batch_request(first)
    if batch and (fields.template is not None or fields.system is not None):
        raise InputError(f"{name}: is an OpenAI batch file: --template and --system do not apply")
    numbered = []
    for position, row in rows:
        if isinstance(row, JsonlError):
            record = Record(id=position, error=invalid(str(row)), source={"raw_line": row.raw})
        elif batch:
            record = parse_batch_request(row, default_id=position)
        else:
            record = parse_record(row, default_id=position, fields=fields)
        numbered.append((position, record))
    records = _unique(numbered, name, unit, "custom_id" if batch else fields.id)
    if not batch and fields.template is None:
        _check_prompt_fields([row for _, row in rows if isinstance(row, Mapping)], name, fields)
    return records


def _check_prompt_fields(rows: list[Mapping[str, Any]], name: str, fields: FieldMap) -> None:
    """A file none of whose rows holds the prompt field is read with the wrong field names:
    one file-level error naming the fields it does have and the options that pick them."""
    if not rows or any(fields.prompt in row or fields.messages in row for row in rows):
        return
    seen = list(dict.fromkeys(key for row in rows[:_FIELD_SAMPLE] for key in row))
    shown = ", ".join(map(repr, seen[:_FIELDS_SHOWN])) + (
        ", ..." if len(seen) > _FIELDS_SHOWN else ""
    )
    example = next((key for key in seen if key != fields.id), "text")
    raise InputError(
        f"{name}: no record has a '{fields.prompt}' or '{fields.messages}' field (fields: "
        f"{shown or 'none'}); name the prompt's field with --prompt-field {example}, chat "
        f"messages with --messages-field, or build prompts with --template '... {{{example}}}'"
    )


def _select_split(data: Any, name: str, split: str | None) -> Any:
    if not isinstance(data, Mapping):  # a single Dataset
        if split is not None:
            raise InputError(f"{name}: has no splits, so there is no split '{split}'")
        return data
    if split is not None:
        if split not in data:
            raise InputError(f"{name}: no split '{split}' (available: {', '.join(data)})")
        return data[split]
    if "train" in data:
        return data["train"]
    if len(data) == 1:
        return next(iter(data.values()))
    raise InputError(f"{name}: has splits {', '.join(data)}; choose one with --split")


def _plain_row(row: dict[str, Any], fields: FieldMap) -> dict[str, Any]:
    """The row with its messages as a list of dicts, as they were before Arrow stored them."""
    messages = row.get(fields.messages)
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
    return {**row, fields.messages: plain}


def _unique(
    numbered: list[tuple[int, Record]], name: str, unit: str, id_field: str
) -> list[Record]:
    """The records, after checking that no id repeats; `unit` is 'line' or 'row'."""
    first: dict[str | int, tuple[int, Record]] = {}
    for position, record in numbered:
        if record.id in first:
            where, other = first[record.id]
            raise InputError(
                f"{name}: {unit} {position}: duplicate id {record.id!r} (first on {unit} {where}"
                f"{_numbered(other, where, unit, id_field)})"
            )
        first[record.id] = (position, record)
    return [record for _, record in numbered]


def _numbered(record: Record, position: int, unit: str, id_field: str) -> str:
    """Why `record` holds its position as id, when it was not given that id ('' if it was)."""
    source = record.source or {}
    if "raw_line" in source and record.error is not None:
        return f", which is not a JSON object and so is numbered by its {unit}"
    given = source.get(id_field)
    if given is None:
        return f", which has no '{id_field}' and so is numbered by its {unit}"
    if given != record.id or type(given) is not type(record.id):
        return (
            f", whose '{id_field}' {_short_value(given)} is not a string or an integer, "
            f"so it is numbered by its {unit}; fix that {unit}'s '{id_field}'"
        )
    return ""


def _short_value(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _stat_mode(name: str) -> int | None:
    """The st_mode of `name`, or None when nothing is there."""
    try:
        return os.stat(name).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise _os_error(name, e) from None


def _read_bytes(path: Path, name: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise _os_error(name, e) from None


def _os_error(name: str, e: OSError) -> InputError:
    if isinstance(e, FileNotFoundError):
        return InputError(f"{name}: no such file")
    if isinstance(e, PermissionError):
        return InputError(f"{name}: permission denied")
    return InputError(f"{name}: cannot read ({e.strerror or e})")


def _looks_like_path(name: str) -> bool:
    """True for names that cannot be a hub dataset id ('name' or 'owner/name')."""
    return Path(name).is_absolute() or name.startswith((".", "~")) or name.count("/") > 1


def _short_reason(e: BaseException) -> str:
    """The first line of the error, at most _MAX_REASON_CHARS long."""
    lines = (line.strip() for line in str(e).splitlines())
    reason = next((line for line in lines if line), type(e).__name__)
    return reason if len(reason) <= _MAX_REASON_CHARS else reason[: _MAX_REASON_CHARS - 3] + "..."
