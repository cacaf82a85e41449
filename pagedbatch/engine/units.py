"""Memory sizes as users write them: '2GiB', '512MB', or a fraction of free memory."""

from __future__ import annotations

import re

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_memory(text: str | float | int) -> int | float:
    """'2GiB' -> bytes (int); '0.5' or 0.5 -> a fraction (float) of free memory."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(
                f"kv_memory must look like '2GiB', '512MB' or a fraction like 0.5, got {text!r}"
            )
        number, unit = float(m.group(1)), m.group(2).lower()
        if unit or number > 1:
            return int(number * _UNITS[unit])
        value = number
    if 0 < value <= 1:
        return float(value)
    if value > 1:
        return int(value)
    raise ValueError(f"kv_memory must be positive, got {text!r}")
