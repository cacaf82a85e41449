"""Strict JSON Lines: one JSON object per line, every problem named by its line number."""

from __future__ import annotations

import codecs
import json
from typing import Any, NamedTuple


class JsonlError(ValueError):
    """A line that is not a JSON object; `str()` is `line N: reason`."""

    def __init__(self, line: int, reason: str, raw: str) -> None:
        super().__init__(f"line {line}: {reason}")
        self.line = line
        self.raw = raw  # the line's text (bad UTF-8 replaced), for the errors file


class JsonlRow(NamedTuple):
    line: int  # 1-based, blank lines counted
    value: dict[str, Any] | JsonlError


def jsonl_rows(data: bytes, *, keep_going: bool = False) -> list[JsonlRow]:
    """The object of every non-blank line.

    A line that is not valid UTF-8, not valid JSON, cut off (the last line, without
    its newline) or not an object raises JsonlError; with `keep_going` the error takes
    the line's place instead.
    """
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    lines = data.split(b"\n")
    rows = []
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            # Only the last piece can lack a trailing newline; it is b"" when the file ends in one.
            rows.append(JsonlRow(n, _parse_object(raw, n, cut_off=n == len(lines))))
        except JsonlError as e:
            if not keep_going:
                raise
            rows.append(JsonlRow(n, e))
    return rows


def _parse_object(raw: bytes, n: int, *, cut_off: bool) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise JsonlError(n, "not valid UTF-8", raw.decode("utf-8", "replace")) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        reason = f"invalid JSON: {e.msg}: column {e.colno}"
        if cut_off:
            reason = "cut off (incomplete JSON at end of file)"
        raise JsonlError(n, reason, text) from None
    if not isinstance(value, dict):
        raise JsonlError(n, f"expected a JSON object, got {json_type_name(value)}", text)
    return value


def json_type_name(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean"}
    return "null" if value is None else names.get(type(value), "number")
