"""Engine statistics: plain data for progress displays and memory reports."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from pagedbatch.engine.memory import KVSnapshot, KVUsage
from pagedbatch.engine.sequence import Sequence


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's counters.

    Blocks "in use" are the distinct blocks held by running sequences; "logical" blocks
    count every block-table entry, so a block shared by three sequences is one in use
    and three logical. Cached blocks are held only by the prefix cache.
    """

    steps: int
    prompt_tokens: int  # of the finished records, each prompt once
    prefix_hit_tokens: int  # of those, taken from the prefix cache
    computed_tokens: int
    generated_tokens: int
    finished_seqs: int
    running_seqs: int
    waiting_seqs: int
    preemptions: int
    recomputed_tokens: int
    num_blocks: int
    blocks_in_use: int
    cached_blocks: int
    free_blocks: int
    peak_blocks_in_use: int
    peak_logical_blocks: int
    evicted_blocks: int
    graph_steps: int  # decode steps replayed from a CUDA graph
    # K/V tokens not read thanks to cascade attention, summed over layers (per KV head)
    cascade_saved_token_reads: int
    # Wall time of the steps that computed prompt tokens (tokens: every token they
    # computed), and of the decode-only steps (tokens: one per sequence): the job's rates.
    prefill_step_seconds: float = 0.0
    prefill_step_tokens: int = 0
    decode_step_seconds: float = 0.0
    decode_step_tokens: int = 0
    decode_steps: int = 0
    # Structured output: host time filling and applying token masks, and the steps that
    # masked some row (engine/constraints.py).
    mask_seconds: float = 0.0
    masked_steps: int = 0

    @property
    def prefix_hit_rate(self) -> float:
        """Prompt tokens taken from the prefix cache / prompt tokens, each record's prompt
        counted once (its samples and choices share it): the output lines' summed
        `usage.cached_tokens` / `usage.prompt_tokens`, what `plan` predicts."""
        return self.prefix_hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def sharing_saving(self) -> float:
        """1 - physical / logical blocks, at the peak of blocks in use."""
        if not self.peak_logical_blocks:
            return 0.0
        return 1 - self.peak_blocks_in_use / self.peak_logical_blocks


class StepTrace(NamedTuple):
    """What the last step ran, and how long it took (host clock, sampled tokens on host)."""

    seconds: float
    forward_seconds: float  # the model forward (block copies and input upload included)
    sample_seconds: float  # sampling, the device-to-host copy of the tokens included
    num_seqs: int
    num_tokens: int
    context_tokens: int  # K/V tokens its attention read, the new ones included
    decode_only: bool  # every sequence computed exactly one token and sampled


@dataclass
class StatsCounter:
    """Accumulates what each step did; the engine turns it into EngineStats.

    With `keep_timeline`, every step's KVSnapshot is kept (for the memory report).
    """

    keep_timeline: bool = False
    steps: int = 0
    prompt_tokens: int = 0
    prefix_hit_tokens: int = 0
    computed_tokens: int = 0
    generated_tokens: int = 0
    finished_seqs: int = 0
    peak: KVSnapshot | None = None
    timeline: list[KVSnapshot] = field(default_factory=list)
    waste_sum: float = 0.0
    waste_steps: int = 0
    prefill_step_seconds: float = 0.0
    prefill_step_tokens: int = 0
    decode_step_seconds: float = 0.0
    decode_step_tokens: int = 0
    decode_steps: int = 0

    def step(
        self, num_tokens: int, num_sampled: int, usage: KVUsage, snapshot: Callable[[], KVSnapshot]
    ) -> None:
        """Count a step from the usage counters (O(1)); `snapshot()` is taken only for a new
        peak of blocks in use and, with `keep_timeline`, every step."""
        self.steps += 1
        self.computed_tokens += num_tokens
        self.generated_tokens += num_sampled
        kv = snapshot() if self.keep_timeline else None
        if self.peak is None or usage.in_use > self.peak.in_use:
            self.peak = kv or snapshot()
        if usage.in_use:
            self.waste_sum += usage.kv_waste
            self.waste_steps += 1
        if kv is not None:
            self.timeline.append(kv)

    def timed(self, trace: StepTrace) -> None:
        """Add a finished step's time to the prefill or the decode totals."""
        if trace.decode_only:
            self.decode_step_seconds += trace.seconds
            self.decode_step_tokens += trace.num_tokens
            self.decode_steps += 1
        else:
            self.prefill_step_seconds += trace.seconds
            self.prefill_step_tokens += trace.num_tokens

    @property
    def kv_waste_mean(self) -> float:
        """Mean over steps (with blocks in use) of the KV waste."""
        return self.waste_sum / self.waste_steps if self.waste_steps else 0.0

    def finished(self, seq: Sequence) -> None:
        """Count a finished sequence; a record's prompt once, with its first sequence (the
        samples and choices forked from it share that prompt): the prefix hit rate is the
        lines' `usage.cached_tokens` / `usage.prompt_tokens`, as `plan` predicts it."""
        self.finished_seqs += 1
        if not seq.forked:
            self.prompt_tokens += seq.num_prompt_tokens
            self.prefix_hit_tokens += seq.num_prefix_hit_tokens
