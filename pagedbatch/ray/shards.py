"""A job cut into shards for the replicas: depth-first order, cut where prompts share least.

The engine runs records in sorted order of their prompt token ids (depth-first in the
prefix tree), so records that share a prefix run together while it is cached. A shard is a
run of that order; cutting the order where neighbouring prompts share the fewest leading
tokens keeps each group of shared prefixes on one replica, so prefix sharing loses at most
one copy of the short prefix at each cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pagedbatch.job.prompt_store import common_prefix
from pagedbatch.job.records import Record


@dataclass
class Shard:
    """Records one replica runs as one `LLM.generate` call, in depth-first order."""

    index: int
    records: list[Record]
    attempts: int = 0  # times it was handed to a replica
    done: set[Any] = field(default_factory=set)  # ids whose output the driver has

    def remaining(self) -> list[Record]:
        """The records whose output has not come back yet (to run again elsewhere)."""
        return [r for r in self.records if r.id not in self.done]


def depth_first(keys: Sequence[Sequence[int]]) -> list[int]:
    """Positions of `keys` in sorted (depth-first) order; equal keys keep their order."""
    return sorted(range(len(keys)), key=lambda i: tuple(keys[i]))


def cut_points(keys: Sequence[Sequence[int]], num_shards: int) -> list[int]:
    """Where to cut `keys` (already in depth-first order) into at most `num_shards` runs.

    Each cut `c` (the start of a run) is searched for within half a shard of the even
    split, at the position whose neighbours share the fewest leading tokens (the nearest
    to the even split among equals); cuts are strictly increasing and no run is empty.
    """
    n = len(keys)
    k = max(1, min(num_shards, n))
    reach = n // (2 * k)
    cuts: list[int] = []
    for j in range(1, k):
        ideal = round(j * n / k)
        lo = max((cuts[-1] if cuts else 0) + 1, ideal - reach)
        hi = max(lo, min(n - (k - j), ideal + reach))
        cuts.append(min(range(lo, hi + 1), key=lambda c: (_shared(keys, c), abs(c - ideal))))
    return cuts


def make_shards(
    records: Sequence[Record], keys: Sequence[Sequence[int]], num_shards: int
) -> list[Shard]:
    """`records` in depth-first order of their `keys` (prompt token ids), cut into shards."""
    order = depth_first(keys)
    ordered_keys = [keys[i] for i in order]
    bounds = [0, *cut_points(ordered_keys, num_shards), len(order)]
    return [
        Shard(index, [records[i] for i in order[start:end]])
        for index, (start, end) in enumerate(zip(bounds, bounds[1:]))
        if end > start
    ]


def _shared(keys: Sequence[Sequence[int]], cut: int) -> int:
    """Leading tokens shared by the prompts on either side of a cut before `cut`."""
    return common_prefix(list(keys[cut - 1]), list(keys[cut]))
