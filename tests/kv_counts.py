"""The KV figures of the running sequences counted from their block tables (O(blocks)):
the oracle that the engine's incremental `KVUsage` counters must always agree with."""

from __future__ import annotations

from collections import Counter

from pagedbatch.engine.memory import KVSnapshot
from pagedbatch.engine.sequence import Sequence


def count_snapshot(
    step: int, running: list[Sequence], num_used: int, num_free: int, block_size: int
) -> KVSnapshot:
    """What `KVUsage.snapshot` must say of `running`, counted from their block tables."""
    holders = Counter(b for seq in running for b in seq.block_table)
    shared = sum(1 for n in holders.values() if n > 1)
    partial: dict[int, int] = {}  # last block -> empty slots in it
    for seq in running:
        empty = len(seq.block_table) * block_size - seq.num_computed_tokens
        if empty > 0:
            partial[seq.block_table[-1]] = min(partial.get(seq.block_table[-1], block_size), empty)
    longest = max((s.max_len for s in running), default=0)
    live = len(holders) * block_size - sum(partial.values())
    return KVSnapshot(
        step=step,
        running=len(running),
        private=len(holders) - shared,
        shared=shared,
        cached=num_used - len(holders),
        free=num_free,
        logical=sum(holders.values()),
        live_slots=live,
        reserved_tokens=sum(s.max_len for s in running),
        padded_tokens=longest * len(running),
        kv_waste=1 - live / (len(holders) * block_size) if holders else 0.0,
    )
