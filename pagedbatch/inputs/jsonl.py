"""Strict JSON Lines: one JSON object per line, every problem named by its line number."""

from __future__ import annotations

import json
from typing import Any

# Deepest nesting of arrays and objects a line may have. Records need a handful of levels;
# the limit keeps every later step (parsing, templates, writing the errors file) far from
# Python's recursion limit, and makes a hostile line a `line N` error, not a crash.
MAX_DEPTH = 64


class JsonlError(ValueError):
    """A line that is not a JSON object; `str()` is `line N: reason`."""

    def __init__(self, line: int, reason: str, raw: str) -> None:
        super().__init__(f"line {line}: {reason}")
        self.line = line
        self.raw = raw  # the line's text (bad UTF-8 replaced), for the errors file


class JsonLimitError(ValueError):
    """Valid JSON beyond what is read: nested deeper than MAX_DEPTH, or a number with more
    digits than Python converts."""


def parse_object(raw: bytes, n: int, *, cut_off: bool) -> dict[str, Any]:
    """The object on line `n` (`raw`, without its newline); `cut_off`: the file's last
    line, without a newline. Raises JsonlError."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise JsonlError(n, "not valid UTF-8", raw.decode("utf-8", "replace")) from None
    try:
        value = loads(text)
    except json.JSONDecodeError as e:
        reason = f"invalid JSON: {e.msg}: column {e.colno}"
        if cut_off:
            reason = "cut off (incomplete JSON at end of file)"
        raise JsonlError(n, reason, text) from None
    except JsonLimitError as e:
        raise JsonlError(n, f"invalid JSON: {e}", text) from None
    if not isinstance(value, dict):
        raise JsonlError(n, f"expected a JSON object, got {json_type_name(value)}", text)
    return value


def json_type_name(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean"}
    return "null" if value is None else names.get(type(value), "number")


def loads(data: str | bytes) -> Any:
    """`json.loads`; JSON beyond the limits raises JsonLimitError (a ValueError, as is
    json.JSONDecodeError for invalid JSON)."""
    too_deep = JsonLimitError(f"nested deeper than {MAX_DEPTH} levels")
    try:
        value = json.loads(data)
    except RecursionError:
        raise too_deep from None
    except json.JSONDecodeError:
        raise
    except ValueError:  # int(): a number of more than sys.get_int_max_str_digits() digits
        raise JsonLimitError("a number with too many digits") from None
    if _brackets(data) > MAX_DEPTH and _depth(value) > MAX_DEPTH:
        raise too_deep
    return value


def _brackets(data: str | bytes) -> int:
    """An upper bound of the nesting depth of the JSON text `data`."""
    if isinstance(data, str):
        return data.count("[") + data.count("{")
    return data.count(b"[") + data.count(b"{")


def _depth(value: Any) -> int:
    """The nesting depth of a parsed JSON value (a scalar: 0), without recursion."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_DEPTH:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest
