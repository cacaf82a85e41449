"""The input edge of pagedbatch: files, datasets and hub names in, records out.

JSON Lines files are read strictly by our own reader (jsonl.py), so that a broken file
is reported with its line number before any work starts. Everything else goes through
the Hugging Face `datasets` library, imported only when it is needed, and read in Arrow
batches, never from a file the user can change under the job: local data files are
converted again for every job (`_FRESH`), a saved dataset is read from a private copy
(`_load_saved`). Either way the rows are a stream (rows.py) that a `RecordIndex`
(record_index.py) reads once and keeps a few bytes of per record. Rows shaped like
OpenAI batch requests are read as such (openai_batch.py).
"""

from __future__ import annotations

import codecs
import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pagedbatch.files import file_kind
from pagedbatch.inputs.columns import (
    check_columns,
    check_hub_dataset,
    data_file_head,
    document_head,
    saved_dataset_head,
    saved_split,
    select_split,
)
from pagedbatch.inputs.jsonl import loads
from pagedbatch.inputs.record_index import RecordIndex
from pagedbatch.inputs.rows import DatasetRows, InputError, JsonlRows
from pagedbatch.requests.records import FieldMap, Record

__all__ = ["InputError", "open_rows", "read_index", "read_records"]

# Files read by our strict JSON Lines reader (a .json file only if it is JSON Lines).
_JSON_SUFFIXES = (".jsonl", ".json")
# Local data files read by `datasets`; the builder is named by the suffix without its dot.
_DATA_FILE_SUFFIXES = (".csv", ".parquet", ".arrow")
# A local file has one split, as `datasets` names it.
_FILE_SPLIT = "train"
_DEFAULT_FIELDS = FieldMap()
# Local files are converted by `datasets` into its cache, which knows a file by its path
# and modification time: a file replaced with its time kept (cp -p, rsync -t, touch -r)
# would be read as its old version. A job converts the bytes on disk now, every time (the
# old conversion is replaced: a job still reading it keeps the file it mapped). The split
# sizes recorded with the old conversion are not the new file's: not checked.
_FRESH = {"download_mode": "force_redownload", "verification_mode": "no_checks"}
_MAX_REASON_CHARS = 200


def read_records(
    source: str | os.PathLike[str],
    *,
    split: str | None = None,
    fields: FieldMap = _DEFAULT_FIELDS,
    skip_invalid: bool = False,
) -> list[Record]:
    """Every record of `source`, in a list (a job reads them through `read_index`)."""
    index = read_index(source, split=split, fields=fields, skip_invalid=skip_invalid)
    try:
        return list(index.records())
    finally:
        index.rows.close()


def read_index(
    source: str | os.PathLike[str],
    *,
    split: str | None = None,
    fields: FieldMap = _DEFAULT_FIELDS,
    skip_invalid: bool = False,
    on_read: Callable[[int], None] | None = None,
) -> RecordIndex:
    """Read the input once and index its records (record_index.py); the index's rows stay
    open to read the records again (`index.rows.close()` when done).

    Raises InputError, before any record is used, for a problem with the input as a
    whole (unreadable, broken JSON, duplicate ids, unknown split). A problem with one
    record only is left on that record's `error`; with `skip_invalid`, so is a JSONL
    line that is not a JSON object. Records without an id get their 1-based line number
    (JSONL) or 0-based row index (datasets). When the first row is an OpenAI batch
    request, every row is read as one (their records have an `endpoint`). Anything but a
    regular file or a directory (a FIFO, a device) is refused. `on_read(n)` is told how
    many records are read, as they are.
    """
    rows = open_rows(source, split=split, fields=fields, skip_invalid=skip_invalid)
    try:
        return RecordIndex(rows, fields, on_read)
    except BaseException:
        rows.close()
        raise


def open_rows(
    source: str | os.PathLike[str], *, split: str | None, fields: FieldMap, skip_invalid: bool
) -> JsonlRows | DatasetRows:
    """The rows of a JSONL file, a local data file, a dataset directory or a hub name."""
    name = os.fspath(source)
    path = Path(name)
    mode = _stat_mode(name)
    if mode is not None and stat.S_ISDIR(mode):
        saved = saved_split(path, name, split)
        if saved is not None:
            check_columns(name, saved_dataset_head(saved), fields)
            return DatasetRows(_load_saved(saved, name), name, fields.messages)
        data = _load(name, lambda ds: ds.load_dataset(name, **_FRESH), "not a dataset directory")
        return _dataset_rows(data, name, split, fields)
    if mode is not None and not stat.S_ISREG(mode):
        raise InputError(f"{name}: is {file_kind(mode)}, not a regular file")
    if mode is not None:
        return _file_rows(path, name, split, fields, skip_invalid)
    if path.suffix.lower() in _JSON_SUFFIXES + _DATA_FILE_SUFFIXES or _looks_like_path(name):
        raise InputError(f"{name}: no such file")
    failure = "not a file, directory or reachable Hugging Face dataset"
    check_hub_dataset(name)
    data = _load(name, lambda ds: ds.load_dataset(name, split=split), failure)
    return _dataset_rows(data, name, None, fields)  # `datasets` chose the split given


def _file_rows(
    path: Path, name: str, split: str | None, fields: FieldMap, skip_invalid: bool
) -> JsonlRows | DatasetRows:
    suffix = path.suffix.lower()
    if suffix in _JSON_SUFFIXES:
        document = _json_document(path, name) if suffix == ".json" else None
        if document is not None:
            _check_file_split(name, split)
            check_columns(name, document_head(document), fields)
            loaded = _load(
                name, lambda ds: ds.load_dataset("json", data_files=name, **_FRESH), "cannot read"
            )
            return _dataset_rows(loaded, name, split, fields)
        _check_file_split(name, split)
        try:
            return JsonlRows(path, name, split, skip_invalid)
        except OSError as e:
            raise _os_error(name, e) from None
    if suffix not in _DATA_FILE_SUFFIXES:
        kinds = ", ".join(_JSON_SUFFIXES + _DATA_FILE_SUFFIXES)
        raise InputError(
            f"{name}: unsupported file type '{suffix}' (use {kinds} or a dataset directory)"
        )
    _check_file_split(name, split)
    check_columns(name, data_file_head(path, suffix), fields)
    data = _load(
        name, lambda ds: ds.load_dataset(suffix[1:], data_files=name, **_FRESH), "cannot read"
    )
    return _dataset_rows(data, name, split, fields)


def _json_document(path: Path, name: str) -> list | dict | None:
    """A .json file that is one JSON document (a list or an object over several lines),
    not JSON Lines (its first non-blank line is not an object of its own); else None."""
    try:
        with path.open("rb") as f:
            first = next((line for line in f if line.strip()), b"")
    except OSError as e:
        raise _os_error(name, e) from None
    try:
        if isinstance(loads(first.removeprefix(codecs.BOM_UTF8)), dict):
            return None
    except ValueError:
        pass
    try:
        document = loads(_read_bytes(path, name))
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both are ValueErrors
        return None
    return document if isinstance(document, (list, dict)) else None


def _check_file_split(name: str, split: str | None) -> None:
    if split is not None and split != _FILE_SPLIT:
        raise InputError(f"{name}: no split '{split}' (available: {_FILE_SPLIT})")


def _load_saved(directory: Path, name: str) -> Any:
    """A split saved with `save_to_disk`, loaded from a private copy of its files.

    `load_from_disk` maps the Arrow files, and the job reads its rows again from the map:
    a file rewritten in place would change rows under the job, and one truncated would
    kill it (SIGBUS). The copy, in the `datasets` cache (where every other data file's
    converted copy goes), is unlinked once mapped: no other process can change it, and its
    space is freed when the job ends.
    """

    def load(ds: Any) -> Any:
        with _private_copy(directory, Path(ds.config.HF_DATASETS_CACHE), name) as copy:
            return ds.load_from_disk(copy)

    return _load(name, load, "cannot load saved dataset")


@contextlib.contextmanager
def _private_copy(directory: Path, root: Path, name: str) -> Iterator[Path]:
    """A new directory in `root` holding a copy of the regular files of `directory`,
    removed on exit (a file still mapped or open lives on until it is closed)."""
    copy = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        copy = Path(tempfile.mkdtemp(prefix="pagedbatch-", dir=root))
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.is_file():
                    shutil.copyfile(entry.path, copy / entry.name)  # a kernel copy
    except OSError as e:
        if copy is not None:
            shutil.rmtree(copy, ignore_errors=True)
        where = e.filename or root
        raise InputError(
            f"{name}: cannot copy it into the datasets cache to read it ({where}: "
            f"{e.strerror or e})"
        ) from None
    try:
        yield copy
    finally:
        shutil.rmtree(copy, ignore_errors=True)


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
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{name}: {failure} ({_short_reason(e)})") from e


def _dataset_rows(data: Any, name: str, split: str | None, fields: FieldMap) -> DatasetRows:
    return DatasetRows(select_split(data, name, split), name, fields.messages)


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
