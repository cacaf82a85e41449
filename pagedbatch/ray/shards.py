"""A job cut into shards for the replicas: depth-first order, cut where prompts share least.

The engine runs records in sorted order of their prompt token ids (depth-first in the
prefix tree), so records that share a prefix run together while it is cached. A shard is a
run of that order; cutting the order where neighbouring prompts share the fewest leading
tokens keeps each group of shared prefixes on one replica, so prefix sharing loses at most
one copy of the short prefix at each cut. A shard holds the numbers of its records in the
input (8 bytes each); the driver reads the records when it hands the shard out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pagedbatch.requests.prompt_store import PromptStore


@dataclass
class Shard:
    """Records one replica runs as one `LLM.generate` call, in depth-first order."""

    index: int
    numbers: np.ndarray  # the records' numbers in the input, in depth-first order
    attempts: int = 0  # times it was handed to a replica
    done: set[Any] = field(default_factory=set)  # ids whose output the driver has


def cut_points(lcps: np.ndarray, num_shards: int) -> list[int]:
    """Where to cut prompts in depth-first order into at most `num_shards` runs; `lcps[i]`
    is the number of leading tokens prompts i - 1 and i share.

    Each cut `c` (the start of a run) is searched for within half a shard of the even
    split, at the position whose neighbours share the fewest leading tokens (the nearest
    to the even split among equals); cuts are strictly increasing and no run is empty.
    """
    n = len(lcps)
    k = max(1, min(num_shards, n))
    reach = n // (2 * k)
    cuts: list[int] = []
    for j in range(1, k):
        ideal = round(j * n / k)
        lo = max((cuts[-1] if cuts else 0) + 1, ideal - reach)
        hi = max(lo, min(n - (k - j), ideal + reach))
        window = np.arange(lo, hi + 1)
        best = np.lexsort((np.abs(window - ideal), lcps[lo : hi + 1]))[0]
        cuts.append(int(window[best]))
    return cuts


def make_shards(store: PromptStore, num_shards: int) -> list[Shard]:
    """The prompts of `store` (numbered as the records) in depth-first order, cut into
    shards."""
    order = store.order()
    bounds = [0, *cut_points(store.common_prefixes(order), num_shards), len(order)]
    return [
        Shard(index, order[start:end])
        for index, (start, end) in enumerate(zip(bounds, bounds[1:]))
        if end > start
    ]
