"""One input record, as read from a file, a dataset or a Python call."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pagedbatch.outputs import INVALID_RECORD, RecordError
from pagedbatch.sampling_params import OVERRIDABLE


@dataclass(frozen=True)
class FieldMap:
    """Which input fields hold the prompt, the chat messages and the id."""

    prompt: str = "prompt"
    messages: str = "messages"
    id: str = "id"


@dataclass(frozen=True)
class Record:
    """An input record before tokenization.

    Exactly one of `prompt` / `messages` / `prompt_token_ids` is set, unless `error`
    says why none is.
    `overrides` holds the per-record sampling fields as given (validated later, so that
    a bad value becomes an `invalid_params` error of this record only).
    """

    id: str | int
    prompt: str | None = None
    messages: tuple[Mapping[str, Any], ...] | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    error: RecordError | None = None


def parse_record(row: Mapping[str, Any], default_id: int, fields: FieldMap = FieldMap()) -> Record:
    """Turn one input row into a Record; problems become the record's `invalid_record` error."""
    rid = row.get(fields.id, default_id)
    if rid is None:
        rid = default_id
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        return Record(
            id=default_id, error=_invalid(f"'{fields.id}' must be a string or an integer")
        )
    overrides = {k: row[k] for k in OVERRIDABLE if row.get(k) is not None}
    prompt, messages = row.get(fields.prompt), row.get(fields.messages)
    if prompt is not None and messages is not None:
        return Record(id=rid, error=_invalid(f"has both '{fields.prompt}' and '{fields.messages}'"))
    if messages is not None:
        problem = _messages_problem(messages, fields.messages)
        if problem:
            return Record(id=rid, error=_invalid(problem))
        return Record(id=rid, messages=tuple(dict(m) for m in messages), overrides=overrides)
    if prompt is None:
        return Record(id=rid, error=_invalid(f"missing '{fields.prompt}' (or '{fields.messages}')"))
    if not isinstance(prompt, str):
        return Record(
            id=rid,
            error=_invalid(f"'{fields.prompt}' must be a string, got {type(prompt).__name__}"),
        )
    return Record(id=rid, prompt=prompt, overrides=overrides)


def _messages_problem(messages: Any, name: str) -> str | None:
    if not isinstance(messages, (list, tuple)) or not messages:
        return f"'{name}' must be a non-empty list of {{role, content}} objects"
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            return f"'{name}'[{i}] must be an object with a string 'role'"
        if not isinstance(m.get("content"), str):
            return f"'{name}'[{i}].content must be a string"
    return None


def _invalid(message: str) -> RecordError:
    return RecordError(INVALID_RECORD, message)
