"""What a record's output must match: a JSON schema, any JSON object, a regex or a grammar.

A `Constraint` is a kind and its canonical text: a schema's JSON without spaces, its keys
in the order given (the order the output's properties follow); a regex or an EBNF grammar
as given. The same constraint written twice is one entry of the job fingerprint and one
compiled grammar (engine/constraints.py compiles it for the model's tokenizer). The grammar
library, xgrammar, checks it here without a tokenizer, so that a constraint it cannot use
is a ValueError naming the problem before any model loads.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

JSON_SCHEMA, JSON_OBJECT, REGEX, GRAMMAR = "json_schema", "json_object", "regex", "grammar"
KINDS = (JSON_SCHEMA, JSON_OBJECT, REGEX, GRAMMAR)
# A record's own constraint, as its input line spells it (at most one of them).
RECORD_FIELDS = ("response_format", "regex", "grammar")
INSTALL = "structured output needs xgrammar: pip install xgrammar (or pagedbatch[structured])"
_NAMES = {
    JSON_SCHEMA: "JSON schema", JSON_OBJECT: "JSON grammar", REGEX: "regex", GRAMMAR: "grammar",
}  # fmt: skip
# The source position xgrammar puts before its messages: "[12:00:00] /path/file.cc:42: ".
_LOCATION = re.compile(r"^\[[0-9:]+\] \S+:\d+: ")


@dataclass(frozen=True)
class Constraint:
    """A kind (one of KINDS) and its canonical text ('' for json_object); build one with
    `json_schema`, `json_object`, `regex` or `grammar`. Raises ValueError when xgrammar
    cannot use it (or is not installed)."""

    kind: str
    text: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"a constraint's kind is one of {', '.join(KINDS)}, not {self.kind!r}")
        if not isinstance(self.text, str) or (self.kind != JSON_OBJECT and not self.text):
            raise ValueError(f"a {self.kind} constraint needs a non-empty text")
        problem = grammar_problem(self.kind, self.text)
        if problem is not None:
            raise ValueError(problem)

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | str) -> Constraint:
        """Output that is JSON valid under `schema` (a dict, or its JSON text)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise ValueError(f"the JSON schema is not JSON ({e})") from None
        if not isinstance(schema, Mapping):
            raise ValueError(f"a JSON schema must be an object, got {type(schema).__name__}")
        return cls(JSON_SCHEMA, json.dumps(schema, separators=(",", ":"), ensure_ascii=False))

    @classmethod
    def json_object(cls) -> Constraint:
        """Output that is any JSON object."""
        return cls(JSON_OBJECT)

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        """Output that matches `pattern` whole."""
        if not isinstance(pattern, str):
            raise ValueError(f"a regex must be a string, got {type(pattern).__name__}")
        return cls(REGEX, pattern)

    @classmethod
    def grammar(cls, ebnf: str) -> Constraint:
        """Output that `ebnf` (GBNF / xgrammar's EBNF, with a `root` rule) derives."""
        if not isinstance(ebnf, str):
            raise ValueError(f"a grammar must be a string, got {type(ebnf).__name__}")
        return cls(GRAMMAR, ebnf)

    @property
    def is_json(self) -> bool:
        """Its output is one JSON value, which the output line carries parsed."""
        return self.kind in (JSON_SCHEMA, JSON_OBJECT)


def record_constraint(fields: Mapping[str, Any]) -> Constraint | None:
    """The constraint a record's own fields set (at most one of RECORD_FIELDS):
    `response_format` in OpenAI's shapes, `regex` or `grammar`; None for `{"type":
    "text"}`, which runs the record unconstrained whatever the job's flag. Raises
    ValueError naming the field."""
    given = [name for name in RECORD_FIELDS if fields.get(name) is not None]
    if len(given) > 1:
        raise ValueError(f"give one of {', '.join(given)}, not several")
    if not given:
        return None
    name = given[0]
    value = fields[name]
    try:
        if name == "response_format":
            return response_format(value)
        return Constraint.regex(value) if name == "regex" else Constraint.grammar(value)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def response_format(value: Any) -> Constraint | None:
    """The constraint of an OpenAI `response_format`: `{"type": "text"}` (none),
    `{"type": "json_object"}`, `{"type": "json_schema", "json_schema": {"name", "schema",
    "strict"}}`. `strict` is accepted as given: the output always follows the schema."""
    kind = value.get("type") if isinstance(value, Mapping) else None
    if kind == "text":
        return None
    if kind == JSON_OBJECT:
        return Constraint.json_object()
    if kind == JSON_SCHEMA:
        spec = value.get("json_schema")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("schema"), Mapping):
            raise ValueError('json_schema must be an object with a "schema" object')
        return Constraint.json_schema(spec["schema"])
    raise ValueError(
        'must be {"type": "json_schema", "json_schema": {"schema": {...}}}, '
        '{"type": "json_object"} or {"type": "text"}'
    )


def build_grammar(kind: str, text: str) -> Any:
    """The xgrammar Grammar of a constraint; raises ImportError without xgrammar, and
    xgrammar's RuntimeError for a constraint it cannot use. JSON is compact (`{"a": 1,
    "b": [2, 3]}`: no line breaks, one space after `:` and `,`), and a schema's objects have
    the properties it lists and no others unless it allows them (xgrammar's strict mode)."""
    import xgrammar

    if kind == JSON_SCHEMA:
        return xgrammar.Grammar.from_json_schema(text, any_whitespace=False)
    if kind == JSON_OBJECT:
        return xgrammar.Grammar.from_json_schema(
            '{"type": "object"}', any_whitespace=False, strict_mode=False
        )
    if kind == REGEX:
        return xgrammar.Grammar.from_regex(text)
    return xgrammar.Grammar.from_ebnf(text)


@functools.lru_cache(maxsize=1024)
def grammar_problem(kind: str, text: str) -> str | None:
    """Why xgrammar cannot use this constraint (None: it can); each distinct constraint is
    built once per process."""
    try:
        build_grammar(kind, text)
    except ImportError:
        return INSTALL
    except (RuntimeError, ValueError) as e:
        return f"the {_NAMES[kind]} cannot be used: {library_message(e)}"
    return None


def library_message(error: BaseException) -> str:
    """xgrammar's message of `error` on one line, without its source position."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = _LOCATION.sub("", lines[0]) if lines else type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."
