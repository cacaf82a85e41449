"""The token ids of a whole job's prompts, compactly, and their depth-first order.

A job's prompts mostly start with the same instruction. `PromptStore` keeps each prompt
as the number of tokens it shares with a base prompt (an earlier one, stored whole) and
its own tail, in one flat array of 2-byte ids (4 when the vocabulary needs them): a
million 45-token prompts take about 90 MB; a million prompts of a 1,000-token
instruction and a 100-token text about 200 MB, not 4 GB. `depth_first_order` sorts the
prompts lexicographically (a prefix before its extensions), the order in which records
sharing a prefix run while it is cached, with numpy and a few bytes a prompt.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable

import numpy as np

MIN_SHARED = 16  # a prompt sharing fewer tokens with the base becomes the new base
_SORT_WIDTH = 8  # tokens compared a prompt per sorting round


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if a[:mid] == b[:mid] else (lo, mid)
    return lo


class PromptStore:
    """Prompts' token ids, appended one at a time and read by number."""

    def __init__(self, vocab_size: int) -> None:
        self._code = "H" if vocab_size <= 1 << 16 else "i"
        self._flat = array(self._code)  # every prompt's tail, one after another
        self._starts = array("q", [0])  # prompt k's tail: flat[starts[k]:starts[k + 1]]
        self._bases = array("q")  # prompt k's first shared[k] tokens are those of bases[k]
        self._shared = array("q")
        self._base: list[int] = []
        self._base_number = -1

    def __len__(self) -> int:
        return len(self._bases)

    @property
    def nbytes(self) -> int:
        arrays = (self._flat, self._starts, self._bases, self._shared)
        return sum(a.itemsize * len(a) for a in arrays)

    def append(self, ids: list[int]) -> None:
        """Store the next prompt (ids in [0, vocab_size))."""
        shared = common_prefix(ids, self._base) if self._base else 0
        if shared < MIN_SHARED:
            self._base, self._base_number, shared = ids, len(self), 0
        self._bases.append(self._base_number)
        self._shared.append(shared)
        self._flat.extend(ids[shared:])
        self._starts.append(len(self._flat))

    def tokens(self, k: int) -> array[int]:
        """Prompt k's token ids."""
        tail = self._flat[self._starts[k] : self._starts[k + 1]]
        if not (shared := self._shared[k]):
            return array("i", tail)
        head = self._starts[self._bases[k]]
        return array("i", self._flat[head : head + shared] + tail)

    def lengths(self) -> np.ndarray:
        """Every prompt's number of tokens (int64)."""
        return np.frombuffer(self._shared, dtype=np.int64) + np.diff(self._arrays()[1])

    def order(self) -> np.ndarray:
        """The prompts' numbers in depth-first order (see `depth_first_order`)."""
        lengths = self.lengths()

        def token_at(items: np.ndarray, depth: int) -> np.ndarray:
            inside = lengths[items] > depth
            column = np.full(len(inside), -1, dtype=np.int32)  # ids < 2**31
            items = items[inside]
            column[inside] = self._token_at(items, np.full(len(items), depth))
            return column

        return depth_first_order(lengths, token_at)

    def common_prefixes(self, order: np.ndarray) -> np.ndarray:
        """`lcps[i]`: the common prefix length of prompts `order[i - 1]` and `order[i]`
        (`lcps[0]` = 0), as `common_prefix` of their tokens, vectorized.

        Two prompts stored against the same base share at least the shorter of their
        parts stored as the base's (a base: all of itself); the rest is compared a token a
        round, for the pairs still equal.
        """
        lengths = self.lengths()
        _, _, bases, shared = self._arrays()
        from_base = np.where(bases == np.arange(len(self)), lengths, shared)
        a, b = order[:-1], order[1:]
        lcps = np.where(bases[a] == bases[b], np.minimum(from_base[a], from_base[b]), 0)
        limit = np.minimum(lengths[a], lengths[b])
        active = np.flatnonzero(lcps < limit)
        while len(active):
            depth = lcps[active]
            same = self._token_at(a[active], depth) == self._token_at(b[active], depth)
            active = active[same]
            lcps[active] += 1
            active = active[lcps[active] < limit[active]]
        return np.concatenate([np.zeros(min(len(order), 1), dtype=np.int64), lcps])

    def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """flat, starts, bases, shared as numpy views."""
        return (
            np.frombuffer(self._flat, dtype=np.uint16 if self._code == "H" else np.int32),
            np.frombuffer(self._starts, dtype=np.int64),
            np.frombuffer(self._bases, dtype=np.int64),
            np.frombuffer(self._shared, dtype=np.int64),
        )

    def _token_at(self, items: np.ndarray, depths: np.ndarray) -> np.ndarray:
        """Token `depths[i]` of prompt `items[i]` (each depth inside its prompt)."""
        flat, starts, bases, shared = self._arrays()
        own = shared[items] <= depths
        at = np.where(own, starts[items] + depths - shared[items], starts[bases[items]] + depths)
        return flat[at]


def shared_blocks(
    lengths: np.ndarray, order: np.ndarray, lcps: np.ndarray, block_size: int
) -> np.ndarray:
    """By prompt number, the whole blocks of each prompt that the prompt before it in
    `order` computed (`lcps`: `PromptStore.common_prefixes(order)`), capped so that its last
    token is computed: what prefix sharing saves it, with nothing evicted."""
    blocks = np.zeros(len(lengths), dtype=np.int64)
    blocks[order] = np.minimum(lcps, lengths[order] - 1) // block_size
    return blocks


def depth_first_order(
    lengths: np.ndarray, token_at: Callable[[np.ndarray, int], np.ndarray]
) -> np.ndarray:
    """The permutation that sorts sequences lexicographically, a prefix before its
    extensions and equal sequences in their given order (as sorting lists does).

    `lengths[i]` is sequence i's length; `token_at(items, depth)` its token at `depth`
    for each of `items`, -1 past its end. An MSD radix sort: each round sorts the
    sequences not yet told apart by their next `_SORT_WIDTH` tokens within their group
    (the run of sequences equal so far), so that memory is a few arrays of one entry per
    sequence, whatever the prompts' lengths.
    """
    n = len(lengths)
    order = np.arange(n, dtype=np.int64)
    group = np.zeros(n, dtype=np.int64)  # group[p]: the group of order[p]
    active = np.arange(n if n > 1 else 0)  # positions in `order` not yet told apart
    depth = 0
    while len(active):
        items = order[active]
        columns = [token_at(items, depth + j) for j in range(_SORT_WIDTH)]
        # np.lexsort sorts by its last key first: the group, then token by token.
        ranked = np.lexsort([*columns[::-1], group[active]])
        items, groups = items[ranked], group[active][ranked]
        order[active] = items  # a group's positions are a run: it stays in them
        new = np.ones(len(items), dtype=bool)
        new[1:] = groups[1:] != groups[:-1]
        while columns:
            column = columns.pop()[ranked]
            new[1:] |= column[1:] != column[:-1]
        labels = np.cumsum(new) - 1
        group[active] = labels
        sizes = np.bincount(labels)
        # Told apart: alone in its group, or ended before the last column compared (then
        # its group holds only sequences equal to it: the same -1 in the same column).
        left = (sizes[labels] > 1) & (lengths[items] >= depth + _SORT_WIDTH)
        active = active[left]
        depth += _SORT_WIDTH
    return order
