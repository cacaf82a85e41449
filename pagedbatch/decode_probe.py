"""Decode-step timing of an engine, and the memory-bandwidth floor it is measured against.

DESIGN.md: a decode step must read every weight once and the K and V of every context
token of every sequence it decodes, so it cannot take less than
`(weight bytes + KV bytes read) / copy bandwidth`, the bandwidth measured by a large
device-to-device copy (bytes read + written per second). The fraction
`floor / measured step time` is how close a step comes to what the memory allows.

Only `copy_bandwidth` touches CUDA; the probe itself reads host clocks and the
scheduler's host-side lists (a step ends when its sampled tokens reach the host, so the
host clock sees the whole step).
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch

from pagedbatch.engine import Engine
from pagedbatch.scheduler import SchedulerOutput
from pagedbatch.stats import EngineStats


class DecodeTiming(NamedTuple):
    """The decode-only steps of a run (every scheduled sequence computes one token)."""

    steps: int
    seconds: float
    sequences: int  # summed over the steps
    context_tokens: int  # summed over the steps: K/V tokens the attention reads

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.seconds / self.steps if self.steps else 0.0

    @property
    def mean_batch(self) -> float:
        return self.sequences / self.steps if self.steps else 0.0

    def floor_seconds(self, weight_bytes: int, kv_bytes_per_token: int, copy_bw: float) -> float:
        """The least time these steps could take at copy bandwidth (bytes/s)."""
        read = self.steps * weight_bytes + self.context_tokens * kv_bytes_per_token
        return read / copy_bw


class DecodeProbe:
    """Times an engine's decode-only steps while in its `with` block.

    It wraps the scheduler's `schedule` (to see each step's sequences before they run)
    and needs `on_step` passed to `LLM.generate(on_step=...)`, which the engine calls
    right after each step. Leaving the block restores the scheduler.
    """

    def __init__(self, engine: Engine) -> None:
        self.scheduler = engine.scheduler
        self._started = 0.0
        self._step: tuple[int, int] | None = None  # (sequences, context tokens) if decode
        self._timing = DecodeTiming(0, 0.0, 0, 0)

    def __enter__(self) -> DecodeProbe:
        schedule = self.scheduler.schedule

        def timed_schedule() -> SchedulerOutput:
            self._started = time.perf_counter()
            out = schedule()
            self._step = _decode_shape(out)
            return out

        self.scheduler.schedule = timed_schedule  # an instance attribute over the method
        return self

    def __exit__(self, *exc: object) -> None:
        del self.scheduler.schedule

    def on_step(self, stats: EngineStats) -> None:
        if self._step is None:
            return
        seconds = time.perf_counter() - self._started
        steps, total, seqs, context = self._timing
        self._timing = DecodeTiming(
            steps + 1, total + seconds, seqs + self._step[0], context + self._step[1]
        )
        self._step = None

    def timing(self) -> DecodeTiming:
        return self._timing


def _decode_shape(out: SchedulerOutput) -> tuple[int, int] | None:
    """(sequences, context tokens) of a decode-only step; None for any other step."""
    if not out.scheduled or any(s.num_new_tokens != 1 or not s.samples for s in out.scheduled):
        return None
    return len(out.scheduled), sum(s.seq.num_computed_tokens + 1 for s in out.scheduled)


def weight_bytes(model: torch.nn.Module) -> int:
    """Weight bytes one decode step reads: every parameter once (tied ones once), except an
    input embedding that is not also the LM head, of which a step reads only a few rows."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if head is None or head.weight is not embedding:
        total -= embedding.numel() * embedding.element_size()
    return total


def copy_bandwidth(device: torch.device) -> float:
    """Bytes read + written per second by a large device-to-device copy (CUDA only)."""
    if device.type != "cuda":
        raise ValueError(f"copy bandwidth is measured on CUDA devices, not {device}")
    from pagedbatch.kernels.bench import copy_bandwidth as measure

    bandwidth = measure(device)
    torch.cuda.empty_cache()  # the copy's buffers: give them back before the KV cache
    return bandwidth
