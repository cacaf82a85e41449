"""The records of an input as a few bytes each, read again from their rows when needed.

`RecordIndex(rows, fields)` reads the input once, checking it as a whole (one kind of
row, unique ids, a prompt field some row has) and keeping per record its row's position
and locator, its id's key (id_keys.py) and its digest (digests.py): 40 bytes, where
a parsed record with its row is about 1-2 KB. `RecordView` is a sequence of some of the
records (what a job still has to do) that reads each record when it is asked for.

A record read again is proven to be the record read first (its digest), whatever the
input kind; one that is not raises InputError, so an input changed under a job (even in
place, at the same size) never puts one record's text under another's id.
"""

from __future__ import annotations

import json
from array import array
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, overload

import numpy as np

from pagedbatch.inputs.digests import record_digest
from pagedbatch.inputs.id_keys import id_key, key_array, repeated
from pagedbatch.inputs.jsonl import JsonlError
from pagedbatch.inputs.openai_batch import is_batch_request, parse_batch_request
from pagedbatch.inputs.rows import InputError, RowSource
from pagedbatch.requests.prompt_template import brace_hint
from pagedbatch.requests.records import FieldMap, Record, invalid, parse_record
from pagedbatch.sampling_params import short_repr

_FIELD_SAMPLE = 100  # rows whose field names a wrong-field error lists
_FIELDS_SHOWN = 10
_DENSE = 4  # read a view's records in file order when it holds over 1/_DENSE of them


class RecordIndex:
    """Every record of an input, as its row's place and the keys a job needs."""

    def __init__(
        self, rows: RowSource, fields: FieldMap, on_read: Callable[[int], None] | None = None
    ) -> None:
        self.rows = rows
        self.fields = fields
        self.batch = False  # the rows are OpenAI batch requests
        # With FieldMap.lenient: body field -> requests that run without it.
        self.ignored: Counter[str] = Counter()
        self._decided = False
        self._positions = array("q")
        self._locators = array("q")
        self._keys = bytearray()  # 16 bytes a record: id_key(record.id)
        self._digests = bytearray()  # 8 bytes a record: record_digest(record)
        self._sorted: tuple[np.ndarray, np.ndarray] | None = None  # keys sorted, their order
        self._read(on_read)

    def __len__(self) -> int:
        return len(self._positions)

    def _read(self, on_read: Callable[[int], None] | None) -> None:
        prompt_seen, sample = False, []
        template = self.fields.template
        unseen = set(template.fields) if template is not None else set()  # in no row yet
        for batch in self.rows.batches():
            for position, locator, row in batch:
                record = self._parse(position, row)
                self.ignored.update(record.ignored)
                self._positions.append(position)
                self._locators.append(locator)
                self._keys += id_key(record.id)
                self._digests += record_digest(record)
                if isinstance(row, Mapping):
                    if len(sample) < _FIELD_SAMPLE:
                        sample.append(row)
                    fields = self.fields
                    prompt_seen = prompt_seen or fields.prompt in row or fields.messages in row
                    if unseen:
                        unseen = {name for name in unseen if name not in row}
            if on_read is not None:
                on_read(len(self))
        self._check_unique()
        if not self.batch and self.fields.template is None and sample and not prompt_seen:
            raise InputError(fields_problem(sample, self.rows.name, self.fields))
        if not self.batch and template is not None and sample and unseen:
            missing = [name for name in template.fields if name in unseen]
            raise InputError(template_problem(sample, self.rows.name, missing))

    def _parse(self, position: int, row: Any) -> Record:
        if isinstance(row, JsonlError):
            return Record(id=position, error=invalid(str(row)), source={"raw_line": row.raw})
        if not self._decided:  # the first row decides how every row is read
            self._decided, self.batch = True, is_batch_request(row)
            fields = self.fields
            if self.batch and (fields.template is not None or fields.system is not None):
                raise InputError(
                    f"{self.rows.name}: is an OpenAI batch file: --template and --system "
                    "do not apply"
                )
        if self.batch:
            return parse_batch_request(row, default_id=position, lenient=self.fields.lenient)
        return parse_record(row, default_id=position, fields=self.fields)

    def record(self, k: int) -> Record:
        """The k-th record, read again from its row (InputError unless it is the record
        read first: `_same`)."""
        position = self._positions[k]
        return self._same(k, self._parse(position, self.rows.row_at(self._locators[k], position)))

    def records(self, ks: np.ndarray | None = None) -> Iterator[Record]:
        """The records numbered `ks` (ascending; all when None), read in file order when
        they are many, else one by one."""
        if ks is not None and len(ks) * _DENSE < len(self):
            return (self.record(int(k)) for k in ks)
        return self._scan(ks)

    def _scan(self, ks: np.ndarray | None) -> Iterator[Record]:
        wanted = None
        if ks is not None:
            wanted = np.zeros(len(self), dtype=bool)
            wanted[ks] = True
        k = 0
        for batch in self.rows.batches():
            for position, _, row in batch:
                if k >= len(self):
                    raise InputError(
                        f"{self.rows.name}: changed while the job ran (it has more rows)"
                    )
                if wanted is None or wanted[k]:
                    yield self._same(k, self._parse(position, row))
                k += 1
        if k != len(self):
            raise InputError(f"{self.rows.name}: changed while the job ran (it has fewer rows)")

    def _same(self, k: int, record: Record) -> Record:
        """`record`, read again as the k-th: InputError unless its digest is the one read
        first. Every record a job uses after the first pass (tokenized, admitted, written
        to the errors file) comes through here, so an input changed under the job (in
        place, at the same size) stops it before a line is written from another record."""
        if record_digest(record) != self.digest(k):
            unit, position = self.rows.unit, self._positions[k]
            raise InputError(
                f"{self.rows.name}: changed while the job ran ({unit} {position} is not the "
                "record read at the start)"
            )
        return record

    def position(self, k: int) -> int:
        return self._positions[k]

    def keys(self) -> np.ndarray:
        """The id key of every record, in order."""
        return key_array(bytes(self._keys))

    def find(self, rid: Any) -> int | None:
        """The number of the record with id `rid`, or None."""
        if self._sorted is None:
            keys = self.keys()
            order = np.argsort(keys, kind="stable")
            self._sorted = keys[order], order
        ranked, order = self._sorted
        key = key_array(id_key(rid))
        at = int(np.searchsorted(ranked, key)[0])
        if at < len(ranked) and ranked[at] == key[0]:
            return int(order[at])
        return None

    def digest(self, k: int) -> bytes:
        return bytes(self._digests[8 * k : 8 * k + 8])

    def sorted_digests(self) -> bytes:
        """Every record's digest, sorted (as the fingerprint stores them)."""
        return np.sort(np.frombuffer(bytes(self._digests), dtype="V8")).tobytes()

    def _check_unique(self) -> None:
        """Raise for the first id met a second time (ids that only share a key are told
        apart by reading them again)."""
        for first, again in repeated(self.keys()):
            one, other = self.record(first), self.record(again)
            if one.id != other.id or type(one.id) is not type(other.id):
                continue
            unit, where = self.rows.unit, self._positions[first]
            id_field = "custom_id" if self.batch else self.fields.id
            raise InputError(
                f"{self.rows.name}: {unit} {self._positions[again]}: duplicate id "
                f"{short_repr(other.id)} (first on {unit} {where}"
                f"{_numbered(one, where, unit, id_field)})"
            )


class RecordView(Sequence[Record]):
    """Some records of an index (numbers `ks`, ascending), each read when it is asked for."""

    def __init__(self, index: RecordIndex, ks: np.ndarray) -> None:
        self.index = index
        self.ks = ks

    def __len__(self) -> int:
        return len(self.ks)

    @overload
    def __getitem__(self, i: int) -> Record: ...
    @overload
    def __getitem__(self, i: slice) -> RecordView: ...
    def __getitem__(self, i: int | slice) -> Record | RecordView:
        if isinstance(i, slice):
            return RecordView(self.index, self.ks[i])
        return self.index.record(int(self.ks[i]))

    def __iter__(self) -> Iterator[Record]:
        return self.index.records(self.ks)


def fields_problem(rows: Sequence[Mapping[str, Any]], name: str, fields: FieldMap) -> str:
    """A file none of whose rows holds the prompt field is read with the wrong field names:
    one file-level error naming the fields it does have and the options that pick them."""
    seen = list(dict.fromkeys(key for row in rows for key in row))
    shown = ", ".join(map(repr, seen[:_FIELDS_SHOWN])) + (
        ", ..." if len(seen) > _FIELDS_SHOWN else ""
    )
    example = likely_text_field(rows, exclude=fields.id)
    return (
        f"{name}: no record has a '{fields.prompt}' or '{fields.messages}' field (fields: "
        f"{shown or 'none'}); name the prompt's field with --prompt-field {example}, chat "
        f"messages with --messages-field, or build prompts with --template '... {{{example}}}'"
    )


# Names a prompt's column often has, a tie-break when no value tells (columns known alone).
_TEXT_NAMES = (
    "text", "prompt", "content", "body", "review", "question", "input", "query", "instruction",
    "document", "sentence", "message", "comment", "description",
)  # fmt: skip


def likely_text_field(rows: Sequence[Mapping[str, Any]], exclude: str) -> str:
    """The field of `rows` most likely to hold the prompt: the one whose string values are
    longest in all, then one named like text (`_TEXT_NAMES`), then the first; 'text' when
    there is none but `exclude` (the id field)."""
    length: dict[str, int] = {}
    for row in rows:
        for key, value in row.items():
            if key != exclude:
                length[key] = length.get(key, 0) + (len(value) if isinstance(value, str) else 0)
    if not length:
        return "text"

    def named_like_text(key: str) -> int:
        words = key.lower().replace("-", "_").split("_")
        if "id" in words:  # review_id: an id, not the review
            return -100
        return -min((_TEXT_NAMES.index(w) for w in words if w in _TEXT_NAMES), default=99)

    return max(length, key=lambda key: (length[key], named_like_text(key)))


def template_problem(rows: Sequence[Mapping[str, Any]], name: str, missing: list[str]) -> str:
    """A `--template` field that no row has: every record would fail, so the file is refused,
    naming the fields it has (and how to write braces that are text, when the field looks
    like JSON)."""
    seen = list(dict.fromkeys(key for row in rows for key in row))
    shown = ", ".join(map(repr, seen[:_FIELDS_SHOWN])) + (
        ", ..." if len(seen) > _FIELDS_SHOWN else ""
    )
    plural = "s" if len(missing) > 1 else ""
    return (
        f"{name}: --template uses the field{plural} {', '.join(map(repr, missing))}, which no "
        f"record has (fields: {shown or 'none'}){brace_hint(missing)}"
    )


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
