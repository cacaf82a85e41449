"""Decode-step timing of an engine, and the memory-bandwidth floor it is measured against.

docs/MEASUREMENTS.md: a decode step must read every weight once and the K and V of every context
token of every sequence it decodes (a cascade group's shared prefix once for the group),
so it cannot take less than
`(weight bytes + KV bytes read) / copy bandwidth`, the bandwidth measured by a large
device-to-device copy (bytes read + written per second). The fraction
`floor / measured step time` is how close a step comes to what the memory allows.

Only `copy_bandwidth` touches CUDA; the probe reads the engine's own step trace (host
clock: a step ends when its sampled tokens reach the host, so it sees the whole step).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from pagedbatch.engine.engine import Engine
from pagedbatch.engine.stats import EngineStats


class DecodeTiming(NamedTuple):
    """The decode-only steps of a run (every scheduled sequence computes one token)."""

    steps: int
    seconds: float
    sequences: int  # summed over the steps
    context_tokens: int  # summed over the steps: K/V tokens the attention reads
    saved_token_reads: int = 0  # summed over the steps and layers: what cascade did not read

    def kv_bytes(self, bytes_per_token: int, num_layers: int) -> int:
        """K/V bytes these steps read (`bytes_per_token`: one token's, all layers)."""
        return self.context_tokens * bytes_per_token - (
            self.saved_token_reads * bytes_per_token // num_layers
        )

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.seconds / self.steps if self.steps else 0.0

    @property
    def mean_batch(self) -> float:
        return self.sequences / self.steps if self.steps else 0.0

    def floor_seconds(self, weight_bytes: int, kv_bytes: int, copy_bw: float) -> float:
        """The least time these steps could take at copy bandwidth (bytes/s), reading
        `kv_bytes` of K/V (`kv_bytes()`)."""
        return (self.steps * weight_bytes + kv_bytes) / copy_bw


class DecodeProbe:
    """Accumulates the timing of an engine's decode-only steps.

    Pass its `on_step` to `LLM.generate(on_step=...)`: the engine calls it right after
    each step, with `engine.last_step` describing that step.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._timing = DecodeTiming(0, 0.0, 0, 0, 0)
        self._saved = engine.attention.cascade_saved_token_reads

    def on_step(self, stats: EngineStats) -> None:
        step = self.engine.last_step
        total = stats.cascade_saved_token_reads
        saved, self._saved = total - self._saved, total
        if step is None or not step.decode_only:
            return
        t = self._timing
        self._timing = DecodeTiming(
            t.steps + 1, t.seconds + step.seconds, t.sequences + step.num_seqs,
            t.context_tokens + step.context_tokens, t.saved_token_reads + saved,
        )  # fmt: skip

    def timing(self) -> DecodeTiming:
        return self._timing


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
