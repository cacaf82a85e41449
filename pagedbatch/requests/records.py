"""One input record, as read from a file, a dataset or a Python call."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pagedbatch.engine.config import check_template_kwargs
from pagedbatch.outputs import INVALID_RECORD, RecordError
from pagedbatch.requests.prompt_template import PromptTemplate, TemplateError
from pagedbatch.sampling_params import OVERRIDABLE, not_text, short_repr

_OVERRIDABLE = frozenset(OVERRIDABLE)
TEMPLATE_KWARGS = "chat_template_kwargs"  # a record's field: its chat template variables


@dataclass(frozen=True)
class FieldMap:
    """How a row becomes a record: the fields holding prompt, messages and id.

    With a `template`, the prompt is the template filled from the row's fields
    instead. With a `system` message, the record is a chat: [system, user prompt], or
    its messages with the system message first (unless they start with one already).
    `lenient` runs an OpenAI batch request without the body fields pagedbatch does not
    support, instead of making it an error (inputs/batch_fields.py).
    """

    prompt: str = "prompt"
    messages: str = "messages"
    id: str = "id"
    template: PromptTemplate | None = None
    system: str | None = None
    lenient: bool = False  # an OpenAI batch body's unsupported fields: ignored, not an error


@dataclass(frozen=True)
class Record:
    """An input record before tokenization.

    Exactly one of `prompt` / `messages` / `prompt_token_ids` is set, unless `error`
    says why none is.
    `overrides` holds the per-record sampling fields as given (validated later, so that
    a bad value becomes an `invalid_params` error of this record only).
    `chat_template_kwargs` are the record's own chat template variables (over the job's).
    `endpoint` is the OpenAI batch `url` the record came with (None for plain input);
    `ignored` names the fields of its body that it runs without (`--lenient`).
    `source` is the input row as read, kept to quarantine the record when it fails.
    """

    id: str | int
    prompt: str | None = None
    messages: tuple[Mapping[str, Any], ...] | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    chat_template_kwargs: Mapping[str, Any] | None = None
    error: RecordError | None = None
    endpoint: str | None = None
    ignored: tuple[str, ...] = ()
    source: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)


def parse_record(row: Mapping[str, Any], default_id: int, fields: FieldMap = FieldMap()) -> Record:
    """Turn one input row into a Record; problems become the record's `invalid_record` error."""
    rid = row.get(fields.id, default_id)
    if rid is None:
        rid = default_id
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        problem = f"'{fields.id}' must be a string or an integer"
        return Record(id=default_id, error=invalid(problem), source=row)
    if fields.template is not None:
        try:
            prompt, messages = fields.template.fill(row), None
        except TemplateError as e:
            return Record(id=rid, error=invalid(str(e)), source=row)
    else:
        prompt, messages = row.get(fields.prompt), row.get(fields.messages)
        problem = _prompt_problem(prompt, messages, fields)
        if problem:
            return Record(id=rid, error=invalid(problem), source=row)
    if fields.system is not None:
        prompt, messages = None, with_system(fields.system, prompt, messages)
    kwargs = row.get(TEMPLATE_KWARGS)
    try:
        check_template_kwargs(kwargs, TEMPLATE_KWARGS)
    except ValueError as e:
        return Record(id=rid, error=invalid(str(e)), source=row)
    overrides = {k: v for k, v in row.items() if k in _OVERRIDABLE and v is not None}
    return Record(
        id=rid,
        prompt=prompt,
        messages=None if messages is None else tuple(dict(m) for m in messages),
        overrides=overrides,
        chat_template_kwargs=kwargs,
        source=row,
    )


def text_problem(record: Record) -> str | None:
    """Why a record's text is not text, if it is not: its prompt (a template's fields
    included), messages, stop strings or choices hold a lone surrogate."""
    parts = (
        ("prompt", record.prompt), ("message", record.messages),
        ("stop string", record.overrides.get("stop")),
        ("choice", record.overrides.get("choices")),
    )  # fmt: skip
    for what, value in parts:
        if (found := not_text(value)) is not None:
            return f"{what} {short_repr(found)} holds a lone surrogate, which is not text"
    return None


def with_system(system: str, prompt: str | None, messages: Any) -> list[Mapping[str, Any]]:
    """The chat of a record with a system message first (a record's own system message wins)."""
    if messages is None:
        return [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    if messages[0]["role"] == "system":
        return list(messages)
    return [{"role": "system", "content": system}, *messages]


def invalid(message: str) -> RecordError:
    return RecordError(INVALID_RECORD, message)


def _prompt_problem(prompt: Any, messages: Any, fields: FieldMap) -> str | None:
    if prompt is not None and messages is not None:
        return f"has both '{fields.prompt}' and '{fields.messages}'"
    if messages is not None:
        return messages_problem(messages, fields.messages)
    if prompt is None:
        return f"missing '{fields.prompt}' (or '{fields.messages}')"
    if not isinstance(prompt, str):
        return f"'{fields.prompt}' must be a string, got {type(prompt).__name__}"
    return None


def messages_problem(messages: Any, name: str) -> str | None:
    if not isinstance(messages, (list, tuple)) or not messages:
        return f"'{name}' must be a non-empty list of {{role, content}} objects"
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            return f"'{name}'[{i}] must be an object with a string 'role'"
        if not isinstance(m.get("content"), str):
            return f"'{name}'[{i}].content must be a string"
    return None


Input = str | Mapping[str, Any] | Record | list[int]


def to_record(item: Input, index: int) -> Record:
    """A Record from a prompt string, a JSONL-style dict, token ids, or a Record."""
    if isinstance(item, Record):
        return item
    if isinstance(item, str):
        return Record(id=index, prompt=item)
    if isinstance(item, Mapping):
        return parse_record(item, default_id=index)
    if isinstance(item, (list, tuple)) and all(isinstance(t, int) for t in item):
        return Record(id=index, prompt_token_ids=tuple(item))
    raise TypeError(f"input {index}: expected a string, a dict, token ids or a Record")


def record_batches(items: Sequence[Input], size: int) -> Iterator[tuple[int, list[Record]]]:
    """(number of the first, records) of `items`, `size` at a time, in order."""
    inputs = iter(items)
    for start in range(0, len(items), size):
        batch = itertools.islice(inputs, size)
        yield start, [to_record(x, start + j) for j, x in enumerate(batch)]
