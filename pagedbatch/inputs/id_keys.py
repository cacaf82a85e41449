"""Record ids as 16-byte keys, and sets of them in sorted arrays (16 bytes an id).

A million-record job cannot keep its ids as a Python set (about 90 bytes an id); the
input's index, the resume scan of an output and the duplicate checks keep these keys
instead. Keys are 128-bit hashes of the id and its type (`1` and `"1"` differ), so two
ids share a key with a probability of about n^2 / 2^129: never, for any job that fits on
a disk. Where a message names ids, they are read again from their lines.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import numpy as np

KEY_BYTES = 16
KEY_DTYPE = np.dtype(f"V{KEY_BYTES}")  # compared bytewise, sorts and searches as such


def id_key(rid: Any) -> bytes:
    """The key of one record id (a string or an integer)."""
    tag = b"s" if isinstance(rid, str) else b"i"
    text = rid if isinstance(rid, str) else str(rid)
    data = tag + text.encode("utf-8", "surrogatepass")
    return hashlib.blake2b(data, digest_size=KEY_BYTES).digest()


def key_array(keys: bytes | bytearray) -> np.ndarray:
    """The keys packed in `keys` (16 bytes each) as an array (a view, no copy)."""
    return np.frombuffer(keys, dtype=KEY_DTYPE)


class IdSet:
    """A set of record ids held as their sorted keys."""

    def __init__(self, keys: bytes | bytearray | np.ndarray = b"") -> None:
        array = keys if isinstance(keys, np.ndarray) else key_array(keys)
        self._keys = np.unique(array)  # sorted

    @classmethod
    def of(cls, ids: Iterable[Any]) -> IdSet:
        return cls(b"".join(id_key(rid) for rid in ids))

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, rid: Any) -> bool:
        return bool(self.contains(key_array(id_key(rid)))[0])

    def contains(self, keys: np.ndarray) -> np.ndarray:
        """A bool per key of `keys` (an array of KEY_DTYPE): whether it is in the set."""
        if not len(self._keys):
            return np.zeros(len(keys), dtype=bool)
        at = np.minimum(np.searchsorted(self._keys, keys), len(self._keys) - 1)
        return self._keys[at] == keys

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, IdSet):
            return NotImplemented
        return bool(np.array_equal(self._keys, other._keys))

    __hash__ = None  # type: ignore[assignment]  # compared by value

    def union(self, other: IdSet) -> IdSet:
        return IdSet(np.concatenate([self._keys, other._keys]))


def repeated(keys: np.ndarray) -> list[tuple[int, int]]:
    """(first, again) index pairs of keys that occur more than once: for each repeated
    key, its first index and its second; sorted by the second (the first repeat met when
    reading in order comes first)."""
    if len(keys) < 2:
        return []
    order = np.argsort(keys, kind="stable")  # equal keys keep their index order
    ranked = keys[order]
    same = np.flatnonzero(ranked[1:] == ranked[:-1])  # ranked[i] == ranked[i + 1]
    if not len(same):
        return []
    starts = same[np.r_[True, ranked[same[1:]] != ranked[same[:-1]]]]  # first pair of a run
    pairs = sorted((int(order[i + 1]), int(order[i])) for i in starts)
    return [(first, again) for again, first in pairs]
