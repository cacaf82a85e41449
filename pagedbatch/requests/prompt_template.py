"""`--template "Classify the review: {text}"`: a prompt filled from the fields of a row."""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any

_FORMATTER = string.Formatter()


class TemplateError(ValueError):
    """A row the template cannot be filled from; the message names the field."""


class PromptTemplate:
    """A `str.format` template whose fields are named after the fields of a row.

    `{text}` takes the row's `text` field; format specs and conversions work as in
    `str.format` (`{score:.2f}`, `{title!r}`), and so do `{meta[lang]}` and `{a.b}`.
    A field that the row lacks, or holds null, is an error naming it.
    """

    def __init__(self, template: str) -> None:
        try:
            parsed = list(_FORMATTER.parse(template))
        except ValueError as e:
            raise ValueError(f"--template {template!r}: {e}") from None
        names = [_root(field) for _, field, _, _ in parsed if field is not None]
        if not names:
            raise ValueError(f"--template {template!r} has no {{field}} to fill")
        if any(not name or name.isdigit() for name in names):
            raise ValueError(
                f"--template {template!r}: every {{}} needs a field name, like {{text}}"
            )
        self.template = template
        self.fields = tuple(dict.fromkeys(names))  # in order of first use

    def fill(self, row: Mapping[str, Any]) -> str:
        """The prompt for `row`; raises TemplateError naming a missing field."""
        for name in self.fields:
            if row.get(name) is None:
                raise TemplateError(
                    f"missing field '{name}' that the template uses{brace_hint([name])}"
                )
        try:
            return self.template.format_map(row)
        except (LookupError, AttributeError, ValueError, TypeError) as e:
            raise TemplateError(f"cannot fill the template: {type(e).__name__}: {e}") from None

    def __repr__(self) -> str:
        return f"PromptTemplate({self.template!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PromptTemplate) and other.template == self.template

    def __hash__(self) -> int:
        return hash(self.template)


def brace_hint(missing: list[str]) -> str:
    """'; ... write {{ and }}' when a missing field's name looks like JSON (`{"label": ...}`
    in a template is a replacement field named '"label"'), else ''."""
    if not any(_looks_like_json(name) for name in missing):
        return ""
    return "; braces that are text (JSON in the prompt) must be doubled: write {{ and }}"


def _looks_like_json(name: str) -> bool:
    return any(quote in name for quote in "\"'") or name != name.strip()


def _root(field: str) -> str:
    """The row field a replacement field reads: 'meta' for '{meta[lang]}' or '{meta.lang}'."""
    for i, char in enumerate(field):
        if char in ".[":
            return field[:i]
    return field
