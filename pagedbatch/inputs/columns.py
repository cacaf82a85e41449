"""What an input holds, read before `datasets` is imported (about a second of CPU), so
that a table without the prompt field is refused at once: a CSV header, a Parquet schema,
a JSON list's keys, a saved dataset's split and features (None: not known that cheaply); a hub
dataset name that is neither cached nor reachable; and the split a job reads."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pagedbatch.inputs.record_index import fields_problem
from pagedbatch.inputs.rows import InputError
from pagedbatch.requests.records import FieldMap


def check_columns(name: str, columns: list[str] | None, fields: FieldMap) -> None:
    """The file-level error of a table none of whose columns is the prompt field (as the
    record index raises it after reading every row)."""
    if columns is None or fields.template is not None or "custom_id" in columns:
        return
    if fields.prompt not in columns and fields.messages not in columns:
        raise InputError(fields_problem([dict.fromkeys(columns)], name, fields))


def document_columns(document: list | dict) -> list[str] | None:
    """A JSON list of objects: the keys its objects have (`datasets` makes them columns)."""
    if not isinstance(document, list) or not document:
        return None
    if not all(isinstance(row, dict) for row in document):
        return None
    return list(dict.fromkeys(key for row in document for key in row))


def data_file_columns(path: Path, suffix: str) -> list[str] | None:
    """A CSV file's header (when a row follows it), a Parquet file's schema (when it has
    rows)."""
    try:
        if suffix == ".csv":
            with path.open(newline="", encoding="utf-8-sig") as f:
                reader = csv.reader(f)
                header = next(reader, None)
                has_row = any(any(cell.strip() for cell in row) for row in reader)
            return header if header and has_row else None
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            metadata = pq.read_metadata(path)
            return metadata.schema.to_arrow_schema().names if metadata.num_rows else None
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


def saved_dataset_columns(directory: Path) -> list[str] | None:
    """The features of a split saved with `save_to_disk`, from its dataset_info.json."""
    try:
        return list(json.loads((directory / "dataset_info.json").read_text())["features"])
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
