"""What an input holds, read before `datasets` is imported (about a second of CPU), so
that a table without the prompt field is refused at once: a CSV header and first rows, a
Parquet file's first rows, a JSON list's keys and first objects, a saved dataset's split
and features (None: not known that cheaply); a hub
dataset name that is neither cached nor reachable; and the split a job reads."""

from __future__ import annotations

import csv
import itertools
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pagedbatch.inputs.record_index import fields_problem, template_problem
from pagedbatch.inputs.rows import InputError
from pagedbatch.requests.records import FieldMap

_HEAD_ROWS = 20  # rows read to tell which column holds text, for the missing-field hint


Head = list[Mapping[str, Any]]  # a table's first rows; only its columns (values None) at least


def check_columns(name: str, head: Head | None, fields: FieldMap) -> None:
    """The file-level error of a table none of whose columns is the prompt field, or that
    lacks a field the template uses (as the record index raises them after reading every
    row). `head`: a few rows of the table, or None when its columns are not known cheaply."""
    if not head:
        return
    columns = list(dict.fromkeys(key for row in head for key in row))
    if "custom_id" in columns:
        return
    if fields.template is not None:
        missing = [field for field in fields.template.fields if field not in columns]
        if missing:
            raise InputError(template_problem(head, name, missing))
        return
    if fields.prompt not in columns and fields.messages not in columns:
        raise InputError(fields_problem(head, name, fields))


def document_head(document: list | dict) -> Head | None:
    """A JSON list of objects: every key its objects have (`datasets` makes them columns),
    and its first objects."""
    if not isinstance(document, list) or not document:
        return None
    if not all(isinstance(row, dict) for row in document):
        return None
    columns = dict.fromkeys(key for row in document for key in row)
    return [columns, *document[:_HEAD_ROWS]]


def data_file_head(path: Path, suffix: str) -> Head | None:
    """A CSV file's header and first rows (when a row follows it), a Parquet file's first
    rows (when it has rows)."""
    try:
        if suffix == ".csv":
            with path.open(newline="", encoding="utf-8-sig") as f:
                reader = csv.reader(f)
                header = next(reader, None)
                rows = (row for row in reader if any(cell.strip() for cell in row))
                head = [dict(zip(header or [], row)) for row in itertools.islice(rows, _HEAD_ROWS)]
            return [dict.fromkeys(header), *head] if header and head else None
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.ParquetFile(path)
            if not table.metadata.num_rows:
                return None
            names = table.schema_arrow.names
            first = next(table.iter_batches(batch_size=_HEAD_ROWS), None)
            return [dict.fromkeys(names), *(first.to_pylist() if first is not None else [])]
    except Exception:  # noqa: BLE001 - `datasets` will read it, and say what is wrong
        return None
    return None


def saved_split(path: Path, name: str, split: str | None) -> Path | None:
    """The directory of the split a job reads of a dataset saved with `save_to_disk`,
    chosen as `select_split` chooses it (whose errors it raises); None when `path` is not
    such a dataset."""
    if (path / "dataset_dict.json").is_file():
        try:
            splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
            directories = {str(s): path / str(s) for s in splits}
        except (OSError, ValueError, KeyError, TypeError) as e:
            problem = e.strerror if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
            raise InputError(
                f"{name}: cannot load saved dataset (dataset_dict.json: {problem})"
            ) from None
        return select_split(directories, name, split)
    if (path / "state.json").is_file():
        return select_split(path, name, split)  # one Dataset: no splits
    return None


def saved_dataset_head(directory: Path) -> Head | None:
    """The features of a split saved with `save_to_disk` (as a row of None), from its
    dataset_info.json."""
    try:
        return [
            dict.fromkeys(json.loads((directory / "dataset_info.json").read_text())["features"])
        ]
    except Exception:  # noqa: BLE001 - `datasets` will load it, and say what is wrong
        return None


def check_hub_dataset(name: str) -> None:
    """A hub dataset name that is not cached here, with the hub unreachable: one error at
    once, instead of the hub client's retries."""
    from pagedbatch.models.names import hub_unreachable

    problem = hub_unreachable()
    if problem is not None and not _hub_dataset_cached(name):
        raise InputError(
            f"{name}: no such file or directory, and not a Hugging Face dataset cached here "
            f"({problem}); pass a JSONL, JSON, CSV or Parquet file, or a directory saved "
            "with save_to_disk"
        )


def _hub_dataset_cached(name: str) -> bool:
    """Whether the hub client's cache or the `datasets` cache holds something of `name`."""
    from pagedbatch.models.names import hf_home, hub_cache_dir

    hub = hub_cache_dir() / ("datasets--" + name.replace("/", "--"))
    built = Path(os.environ.get("HF_DATASETS_CACHE") or hf_home() / "datasets").expanduser()
    return hub.is_dir() or any(built.glob(name.replace("/", "___") + "*"))


def select_split(data: Any, name: str, split: str | None) -> Any:
    """The split of `data` (a Dataset, or a mapping of split names to datasets or to
    directories) to read: `split`, else "train", else the only one."""
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
