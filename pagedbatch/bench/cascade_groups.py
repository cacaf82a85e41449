"""Is a cascade group worth it? Attention time per step by group shape, with and without.

`pagedbatch bench --cascade-groups` times the torch backend's attention of one engine
step (the cascade plan, then `PagedAttention` in every layer: the store, then cascade or
plain attention) on a batch of `seqs` sequences where groups of `members` sequences share
their first `prefix_blocks` blocks. Layouts: `all`, every sequence in such a group;
`one`, one such group among sequences that share nothing (each holds private copies of
the same number of blocks). Modes: `decode` (one new token, `own_tokens` of context
after the prefix) and `extend` (`own_tokens` new tokens right after a cached prefix).
Shapes default to SmolLM2-135M's attention (30 layers, 9 query and 3 KV heads, 64 wide),
block size 16, float32. Steps with and without cascade alternate; each figure is the
median of `repeats` steps' CPU time (`time.thread_time`: torch on one thread computes in
this thread, so a busy machine changes it little). docs/MEASUREMENTS.md ("Cascade
attention") quotes the measurement behind the torch backend's rule.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from pagedbatch.engine.attention import PagedAttention
from pagedbatch.engine.batch import Batch
from pagedbatch.engine.cascade import (
    ANY_GROUP,
    TORCH_RULE,
    CascadePlan,
    CascadeRule,
    make_plan,
    plan_cascade,
)
from pagedbatch.engine.kv_cache import KVCache, KVCacheSpec


@dataclass(frozen=True)
class GroupShape:
    """A step's batch: groups of `members` sequences sharing `prefix_blocks` blocks."""

    mode: str  # decode or extend
    layout: str  # all: every sequence grouped; one: one group among loners
    members: int
    prefix_blocks: int
    own_tokens: int  # decode: context after the prefix; extend: new tokens after it


@dataclass(frozen=True)
class GroupTiming:
    shape: GroupShape
    groups: int  # groups formed (every group of the layout)
    saved_token_reads: int  # per layer
    plain_ms: float  # median attention time of a step without cascade
    cascade_ms: float  # the same step with the plan (its making included)
    taken: bool  # whether the engine's torch rule (`cascade.TORCH_RULE`) keeps the groups

    @property
    def speedup(self) -> float:
        return self.plain_ms / self.cascade_ms

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self.shape), **{k: v for k, v in asdict(self).items() if k != "shape"},
                "speedup": self.speedup}  # fmt: skip


@dataclass(frozen=True)
class AttentionShape:
    layers: int = 30
    heads: int = 9
    kv_heads: int = 3
    head_dim: int = 64
    block_size: int = 16


def default_shapes() -> list[GroupShape]:
    """The grid docs/MEASUREMENTS.md quotes: decode over prefix and own lengths, one small group
    among loners, extend over prefix and new lengths."""
    shapes = [GroupShape("decode", "all", m, p, own)
              for m in (2, 8) for own in (16, 64, 256) for p in (4, 8, 16, 32)]  # fmt: skip
    shapes += [GroupShape("decode", "all", m, 1, 64) for m in (2, 8)]
    shapes += [GroupShape("decode", "one", 2, p, 64) for p in (1, 4, 16)]
    shapes += [GroupShape("extend", "all", m, p, 32) for m in (2, 8) for p in (4, 16, 40)]
    shapes += [GroupShape("extend", "all", m, 40, 8) for m in (2, 8)]
    return shapes


def measure_cascade_groups(
    shapes: list[GroupShape] | None = None,
    *,
    seqs: int = 32,
    repeats: int = 3,
    attention: AttentionShape = AttentionShape(),
    seed: int = 0,
    on_shape: Callable[[GroupTiming], None] | None = None,
) -> list[GroupTiming]:
    """Time every shape (default: `default_shapes()`); see the module docstring."""
    shapes = default_shapes() if shapes is None else shapes
    if seqs < max(s.members for s in shapes):
        raise ValueError(
            f"{seqs} sequences are fewer than a group of {max(s.members for s in shapes)}"
        )
    gen = torch.Generator().manual_seed(seed)
    timings = []
    for shape in shapes:
        timings.append(_measure(shape, seqs, repeats, attention, gen))
        if on_shape is not None:
            on_shape(timings[-1])
    return timings


class _Step:
    """One step's tables, batch and inputs for `shape` (block ids laid out in order)."""

    def __init__(
        self, shape: GroupShape, seqs: int, a: AttentionShape, gen: torch.Generator
    ) -> None:
        bs, own = a.block_size, shape.own_tokens
        new = 1 if shape.mode == "decode" else own
        own_blocks = -(-own // bs)
        width = shape.prefix_blocks + own_blocks
        grouped = seqs if shape.layout == "all" else shape.members
        rows = np.zeros((seqs, width), dtype=np.int64)
        next_block = 0
        for i in range(seqs):
            if i < grouped and i % shape.members:  # the group's first member holds the prefix
                rows[i, : shape.prefix_blocks] = rows[i - 1, : shape.prefix_blocks]
            else:
                rows[i, : shape.prefix_blocks] = np.arange(shape.prefix_blocks) + next_block
                next_block += shape.prefix_blocks
            rows[i, shape.prefix_blocks :] = np.arange(own_blocks) + next_block
            next_block += own_blocks
        context = shape.prefix_blocks * bs + own
        self.rows = rows
        self.ends = np.full(seqs, context)
        self.begins = self.ends - new
        starts = [i * new for i in range(seqs + 1)]
        positions = torch.from_numpy(np.repeat(self.begins, new) + np.tile(np.arange(new), seqs))
        slots = torch.from_numpy(rows[np.repeat(np.arange(seqs), new), positions // bs]) * bs
        self.batch = Batch(
            input_ids=torch.zeros(seqs * new, dtype=torch.int64),
            positions=positions,
            slot_mapping=slots + positions % bs,
            block_tables=torch.from_numpy(rows.astype(np.int32)),
            context_lens=torch.from_numpy(self.ends.astype(np.int32)),
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            logits_indices=torch.tensor(starts[1:]) - 1,
            context_lens_host=self.ends.tolist(),
            query_start_loc_host=starts,
        )
        spec = KVCacheSpec(a.layers, a.kv_heads, a.head_dim, bs, torch.float32)
        self.cache = KVCache(spec, next_block, torch.device("cpu"))
        for k, v in zip(self.cache.k, self.cache.v, strict=True):
            k.normal_(generator=gen)
            v.normal_(generator=gen)
        t = seqs * new
        self.q = torch.randn(t, a.heads, a.head_dim, generator=gen)
        self.k = torch.randn(t, a.kv_heads, a.head_dim, generator=gen)
        self.v = torch.randn(t, a.kv_heads, a.head_dim, generator=gen)
        self.scale = a.head_dim**-0.5

    def plan(self, rule: CascadeRule = ANY_GROUP) -> CascadePlan | None:
        bs = self.cache.spec.block_size
        decoding = self.ends - self.begins == 1
        groups = plan_cascade(self.rows, -(-self.ends // bs), self.begins, bs, rule, decoding)
        starts = self.batch.query_start_loc_host
        return make_plan(groups, self.rows, bs, starts, torch.device("cpu"))

    def run(self, cascade: bool) -> float:
        """Seconds of one step's attention (with cascade: its plan made first)."""
        attention = PagedAttention(self.cache)
        started = time.thread_time()
        batch = dataclasses.replace(self.batch, cascade=self.plan()) if cascade else self.batch
        for layer in range(self.cache.spec.num_layers):
            attention(layer, self.q, self.k, self.v, batch, self.scale, None)
        return time.thread_time() - started


def _measure(
    shape: GroupShape, seqs: int, repeats: int, a: AttentionShape, gen: torch.Generator
) -> GroupTiming:
    step = _Step(shape, seqs, a, gen)
    plan = step.plan()
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(repeats + 1):  # the first of each is a warm-up
        for cascade in (i % 2 == 0, i % 2 == 1):
            seconds = step.run(cascade)
            if i:
                times[cascade].append(seconds)
    return GroupTiming(
        shape,
        groups=len(plan.groups) if plan else 0,
        saved_token_reads=plan.saved_token_reads if plan else 0,
        plain_ms=1e3 * statistics.median(times[False]),
        cascade_ms=1e3 * statistics.median(times[True]),
        taken=step.plan(TORCH_RULE) is not None,
    )
