"""Where the KV blocks are, step by step, and the memory report built from that."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np

from pagedbatch.engine.sequence import Sequence


@dataclass(frozen=True)
class KVSnapshot:
    """The KV blocks after one step's tokens are computed (before finished sequences free).

    private/shared: blocks held by one / several running sequences; cached: blocks only
    the prefix cache holds (freed on demand); free: on the free list. `live_slots` are
    slots of in-use blocks that hold a computed token. `reserved_tokens` is what a
    contiguous cache would reserve for the running sequences (each its full maximum
    length); `padded_tokens` what one padded static batch of them would (all at the
    longest maximum length).
    """

    step: int
    running: int
    private: int
    shared: int
    cached: int
    free: int
    logical: int
    live_slots: int
    reserved_tokens: int
    padded_tokens: int
    kv_waste: float  # 1 - live slots / slots of the in-use blocks

    @property
    def in_use(self) -> int:
        return self.private + self.shared


class RunningFigures(NamedTuple):
    """What a KVSnapshot needs of the running sequences (kept as they join and leave:
    `scheduler.RunningSet.figures`)."""

    count: int
    max_len_sum: int  # tokens a contiguous cache would reserve for them
    longest: int  # the largest max_len (0: none)


def running_figures(running: Collection[Sequence]) -> RunningFigures:
    """The RunningFigures of `running`, counted."""
    return RunningFigures(
        len(running), sum(s.max_len for s in running), max((s.max_len for s in running), default=0)
    )


class KVUsage:
    """Counters of the blocks that block tables hold, kept as blocks move.

    The BlockManager calls `hold` / `release` for every block-table entry it adds or
    drops and `fill` as tokens are computed, so reading the figures costs O(1) per step
    (tests/test_step_state.py recounts them from the tables after every step). A block's `filled`
    slots only grow while it is held (no block is written while shared, and tables are
    append-only); a block starts empty when it is allocated.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.holders = [0] * num_blocks  # block tables holding each block
        # Computed slots of each block (an array: a decode step writes them at once).
        self.filled = np.zeros(num_blocks, dtype=np.int32)
        self.in_use = 0  # blocks held by at least one table
        self.shared = 0  # blocks held by two or more tables
        self.logical = 0  # block-table entries
        self.live_slots = 0  # computed slots of the blocks in use

    def allocated(self, block: int, filled: int = 0) -> None:
        """`block` came off the free list (holding `filled` copied slots)."""
        self.filled[block] = filled

    def hold(self, block: int) -> None:
        n = self.holders[block]
        self.holders[block] = n + 1
        self.logical += 1
        if n == 0:
            self.in_use += 1
            self.live_slots += int(self.filled[block])
        elif n == 1:
            self.shared += 1

    def release(self, block: int) -> None:
        n = self.holders[block] - 1
        self.holders[block] = n
        self.logical -= 1
        if n == 0:
            self.in_use -= 1
            self.live_slots -= int(self.filled[block])
        elif n == 1:
            self.shared -= 1

    def fill(self, block: int, slots: int) -> None:
        """`block` now holds `slots` computed slots (never fewer than before)."""
        grown = slots - int(self.filled[block])
        if grown > 0:
            self.filled[block] = slots
            if self.holders[block]:
                self.live_slots += grown

    def write_each(self, blocks: np.ndarray, slots: np.ndarray) -> None:
        """`fill(blocks[i], slots[i])` for blocks that a step wrote: each held by the
        sequence that wrote it, which holds more computed slots there than before (no
        block is written while shared), so each grows and counts."""
        self.live_slots += int((slots - self.filled[blocks]).sum())
        self.filled[blocks] = slots

    def snapshot(
        self, step: int, running: RunningFigures, num_used: int, num_free: int
    ) -> KVSnapshot:
        """The KVSnapshot of now, from the counters (O(1))."""
        in_use, block_size = self.in_use, self.block_size
        return KVSnapshot(
            step=step,
            running=running.count,
            private=in_use - self.shared,
            shared=self.shared,
            cached=num_used - in_use,
            free=num_free,
            logical=self.logical,
            live_slots=self.live_slots,
            reserved_tokens=running.max_len_sum,
            padded_tokens=running.longest * running.count,
            kv_waste=1 - self.live_slots / (in_use * block_size) if in_use else 0.0,
        )

    @property
    def kv_waste(self) -> float:
        """1 - live slots / slots of the blocks in use (0 with none in use)."""
        slots = self.in_use * self.block_size
        return 1 - self.live_slots / slots if slots else 0.0


def memory_report(
    peak: KVSnapshot | None,
    kv_waste_mean: float,
    timeline: list[KVSnapshot],
    *,
    dtype: str,
    block_size: int,
    num_blocks: int,
    kv_bytes_per_token: int,
    model_bytes: int,
    weights: str = "full precision",
    kv_dtype: str = "",
    kv_scales: str | None = None,
    prefix_hit_rate: float,
    preemptions: int,
    recomputed_tokens: int,
    evictions: int,
    cascade_saved_token_reads: int,
) -> dict[str, Any]:
    """The figures of `--memory-report`, as plain JSON-ready data.

    `peak` is the step with the most KV blocks in use; `timeline` may be empty; `dtype`
    is the one the model ran in. `model_bytes` counts the weights as loaded (quantized
    ones as stored), `weights` says how they are quantized; `kv_bytes_per_token` is in
    the cache's `kv_dtype`, and `kv_scales` says where an fp8 cache's scales came from
    (None for other dtypes).
    """
    block_bytes = kv_bytes_per_token * block_size
    return {
        "dtype": dtype,
        "model_bytes": model_bytes,
        "weights": weights,
        "kv_dtype": kv_dtype,
        "kv_scales": kv_scales,
        "num_blocks": num_blocks,
        "block_size": block_size,
        "kv_bytes_per_token": kv_bytes_per_token,
        "kv_pool_bytes": num_blocks * block_bytes,
        "peak_blocks": peak.in_use if peak else 0,
        "peak_step": peak.step if peak else None,
        "peak_running_seqs": peak.running if peak else 0,
        "paged_peak_bytes": peak.in_use * block_bytes if peak else 0,
        "kv_waste_peak": peak.kv_waste if peak else 0.0,
        "kv_waste_mean": kv_waste_mean,
        "sharing_saving": 1 - peak.in_use / peak.logical if peak and peak.logical else 0.0,
        "prefix_hit_rate": prefix_hit_rate,
        "preemptions": preemptions,
        "recomputed_tokens": recomputed_tokens,
        "evictions": evictions,
        "cascade_saved_token_reads": cascade_saved_token_reads,
        "naive_contiguous_bytes": peak.reserved_tokens * kv_bytes_per_token if peak else 0,
        "padded_batch_bytes": peak.padded_tokens * kv_bytes_per_token if peak else 0,
        "timeline": [asdict(s) for s in timeline],
    }
