"""The statistics of several replicas as one: counters summed, rates recomputed."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from pagedbatch.engine.stats import EngineStats

# Memory report figures that add up over replicas (each replica has its own KV pool).
_SUMMED = (
    "num_blocks", "kv_pool_bytes", "peak_blocks", "peak_running_seqs", "paged_peak_bytes",
    "preemptions", "recomputed_tokens", "evictions", "cascade_saved_token_reads",
    "naive_contiguous_bytes", "padded_batch_bytes",
)  # fmt: skip


def merge_stats(stats: Sequence[EngineStats]) -> EngineStats:
    """Every counter summed over `stats` (the hit rate follows from the summed tokens).

    Peaks are the sum of each replica's own peak: an upper bound of what was in use at once.
    """
    names = [f.name for f in dataclasses.fields(EngineStats)]
    if not stats:
        return EngineStats(**{name: 0 for name in names})
    return EngineStats(**{name: sum(getattr(s, name) for s in stats) for name in names})


def merge_memory_reports(
    reports: Sequence[Mapping[str, Any]], stats: EngineStats
) -> dict[str, Any]:
    """One `--memory-report` for all replicas: pools and peaks summed, the hit rate from
    the summed tokens, waste and sharing averaged, and each replica's own report (without
    its timeline) under `replicas`. The merged timeline is empty: replicas' steps do not
    line up."""
    if not reports:
        return {"replicas": [], "timeline": [], "prefix_hit_rate": stats.prefix_hit_rate}
    merged = {k: v for k, v in reports[0].items() if k not in ("timeline", "peak_step")}
    for name in _SUMMED:
        merged[name] = sum(r.get(name) or 0 for r in reports)
    for name in ("kv_waste_peak", "kv_waste_mean", "sharing_saving"):
        merged[name] = sum(r.get(name) or 0.0 for r in reports) / len(reports)
    merged["prefix_hit_rate"] = stats.prefix_hit_rate
    merged["peak_step"] = None
    merged["timeline"] = []
    merged["replicas"] = [{k: v for k, v in r.items() if k != "timeline"} for r in reports]
    return merged
