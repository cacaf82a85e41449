"""Cascade attention's plan: which sequences of a step read the same prefix pages.

Sequences whose block tables start with the same physical blocks (a prefix from the radix
cache, or a fork's prompt) hold the same keys and values there. Attention for such a
group is computed in two parts, merged by log-sum-exp: every query token of the group
against the shared prefix at once (its pages read once per step, not once per
sequence), and each sequence against its own remaining pages
(`kernels.reference.cascade_attention`).

A block shared by two tables is full and was computed before this step (the prefix
cache holds only full blocks; a step copies a shared partial block before writing it),
so every query of the group sees every key of the prefix: no causal mask there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from pagedbatch.kernels.cascade_attention import DecodeCascade
    from pagedbatch.kernels.prefill_attention import ExtendCascade

MIN_GROUP_SEQS = 2  # a group of one would only split its attention in two
MIN_PREFIX_BLOCKS = 1


@dataclass(frozen=True)
class CascadeRule:
    """Which groups are worth forming (docs/MEASUREMENTS.md, "Cascade attention", has the
    measurement behind `TORCH_RULE`: `pagedbatch bench --cascade-groups`)."""

    min_prefix_tokens: int  # a group's shared prefix is at least this long (whole blocks)
    extends: bool  # members computing more than one new token may join a group

    def min_blocks(self, block_size: int) -> int:
        return max(MIN_PREFIX_BLOCKS, -(-self.min_prefix_tokens // block_size))


# Any two sequences sharing a whole block (the Triton backend's rule: not measured on a GPU).
ANY_GROUP = CascadeRule(min_prefix_tokens=1, extends=True)
# The torch backend's: decoding and extending members behind a prefix of at least 256
# tokens (with its fused attention; the float32 matmul path before it needed 512, decodes only).
TORCH_RULE = CascadeRule(min_prefix_tokens=256, extends=True)


@dataclass(frozen=True)
class CascadeGroup:
    """Sequences (indices in the step's batch) sharing their first `num_prefix_blocks`."""

    seqs: tuple[int, ...]
    num_prefix_blocks: int


@dataclass(frozen=True)
class CascadePlan:
    """The groups of one step, with the device index tensors every layer reuses."""

    groups: tuple[CascadeGroup, ...]
    block_size: int
    query_start_loc: tuple[int, ...]
    prefix_host: tuple[tuple[int, ...], ...]  # per group: its prefix's block ids
    upload: Callable[[np.ndarray], torch.Tensor]  # an array on the device (the step's uploads)

    @cached_property
    def prefix_blocks(self) -> tuple[torch.Tensor, ...]:
        """`prefix_host` on the device (the torch backend's gathers), uploaded on first use."""
        return tuple(self.upload(np.array(p, dtype=np.int64)) for p in self.prefix_host)

    @property
    def saved_token_reads(self) -> int:
        """Key/value tokens per layer and KV head not read this step thanks to the plan."""
        return sum((len(g.seqs) - 1) * g.num_prefix_blocks for g in self.groups) * (self.block_size)

    @cached_property
    def decode_groups(self) -> list[tuple[list[int], tuple[int, ...]]]:
        """Each group's decoding members (one new token) and its prefix blocks; a group
        left with fewer than MIN_GROUP_SEQS of them is dropped (the Triton backend runs
        decode and extend tokens in kernels of their own, each cascading its part)."""
        return self._members(decoding=True)

    @cached_property
    def extend_groups(self) -> list[tuple[list[int], tuple[int, ...]]]:
        """`decode_groups` for the members with more than one new token."""
        return self._members(decoding=False)

    def _members(self, decoding: bool) -> list[tuple[list[int], tuple[int, ...]]]:
        q = self.query_start_loc
        kept = []
        for group, blocks in zip(self.groups, self.prefix_host, strict=True):
            members = [i for i in group.seqs if (q[i + 1] - q[i] == 1) == decoding]
            if len(members) >= MIN_GROUP_SEQS:
                kept.append((members, blocks))
        return kept

    @property
    def triton_saved_token_reads(self) -> int:
        """`saved_token_reads` of `decode_groups` and `extend_groups`."""
        kept = self.decode_groups + self.extend_groups
        return sum((len(m) - 1) * len(b) for m, b in kept) * self.block_size

    @cached_property
    def decode_part(self) -> DecodeCascade | None:
        """`decode_groups` as the Triton decode kernel takes them, uploaded once per step."""
        return self._upload(self.decode_groups, by_token=False)

    @cached_property
    def extend_part(self) -> ExtendCascade | None:
        """`extend_groups` as the Triton prefill kernel takes them (members: token rows)."""
        from pagedbatch.kernels.prefill_attention import ExtendCascade

        groups = self._upload(self.extend_groups, by_token=True)
        if groups is None:
            return None
        seqs = [i for members, _ in self.extend_groups for i in members]
        return ExtendCascade(groups, self.upload(np.array(self.rows(seqs), dtype=np.int64)))

    def _upload(
        self, kept: list[tuple[list[int], tuple[int, ...]]], by_token: bool
    ) -> DecodeCascade | None:
        from pagedbatch.kernels.cascade_attention import DecodeCascade

        if not kept:
            return None
        members = [self.rows(m) if by_token else m for m, _ in kept]
        starts = np.zeros(len(self.query_start_loc) - 1, dtype=np.int32)
        width = max(len(b) for _, b in kept)
        most = max(map(len, members))
        tables = np.zeros((len(kept), width), dtype=np.int32)
        rows = np.zeros((len(kept), most), dtype=np.int32)
        for row, ((seqs, blocks), ids) in enumerate(zip(kept, members)):
            tables[row, : len(blocks)] = blocks
            rows[row, : len(ids)] = ids
            starts[seqs] = len(blocks) * self.block_size
        lens = np.array([len(b) * self.block_size for _, b in kept], dtype=np.int32)
        counts = np.array([len(ids) for ids in members], dtype=np.int32)

        up = self.upload
        return DecodeCascade(up(starts), up(tables), up(lens), up(rows), up(counts), most)

    def rows(self, seqs: list[int] | tuple[int, ...]) -> list[int]:
        """The query rows (flat token indices) of `seqs`, in order."""
        q = self.query_start_loc
        return [r for i in seqs for r in range(q[i], q[i + 1])]


def plan_cascade(
    rows: np.ndarray,  # [num_seqs, width] int32: each scheduled sequence's block table row
    num_blocks: np.ndarray,  # [num_seqs] blocks each sequence holds after this step
    begins: np.ndarray,  # [num_seqs] each sequence's first new position (KV before it cached)
    block_size: int,
    rule: CascadeRule = ANY_GROUP,
    decoding: np.ndarray | None = None,  # [num_seqs] bool: one new token (needed unless
    # the rule takes extends)
) -> list[CascadeGroup]:
    """Groups of sequences that start with the same physical blocks.

    Sequences are grouped by their first block, and each group keeps the members and
    prefix that save the most reads: with `l_i` the blocks member i shares with the
    member that has the most whole blocks before its new tokens (never reaching i's own
    first new token), the prefix is the `t` among them that maximises the reads saved,
    (number of members with l_i >= t, less one) x t, the longer on a tie; members with
    l_i < t run without cascade. So one member that shares only a block does not cut
    the whole group's prefix to one block. Only prefixes of `rule.min_blocks` count;
    groups of fewer than MIN_GROUP_SEQS are dropped; unless `rule.extends`, only the
    `decoding` sequences are candidates.
    """
    if len(rows) < MIN_GROUP_SEQS:
        return []
    least = rule.min_blocks(block_size)
    usable = np.minimum(num_blocks, begins // block_size)  # whole blocks before new tokens
    eligible = usable >= least
    if not rule.extends:
        if decoding is None:
            raise ValueError("a rule without extends needs `decoding`")
        eligible &= decoding
    candidates = np.flatnonzero(eligible)
    if len(candidates) < MIN_GROUP_SEQS:
        return []
    first = rows[candidates, 0]
    order = np.argsort(first, kind="stable")
    first = first[order]
    bounds = np.flatnonzero(first[1:] != first[:-1]) + 1
    starts, ends = np.concatenate([[0], bounds]), np.concatenate([bounds, [len(first)]])
    big = np.flatnonzero(ends - starts >= MIN_GROUP_SEQS)  # groups of one are never kept
    ordered_candidates = candidates[order]
    groups = []
    for begin, end in zip(starts[big].tolist(), ends[big].tolist()):
        members = ordered_candidates[begin:end]
        shared = _shared_blocks(rows[members], usable[members])
        ordered = np.sort(shared)
        counts = len(shared) - np.searchsorted(ordered, shared)  # members sharing >= l_i
        saved = np.where(shared >= least, (counts - 1) * shared, 0)
        if saved.max() == 0:
            continue
        prefix = int(shared[saved == saved.max()].max())
        kept = members[shared >= prefix]
        if len(kept) >= MIN_GROUP_SEQS:
            groups.append(CascadeGroup(tuple(np.sort(kept).tolist()), prefix))
    return groups


def _shared_blocks(rows: np.ndarray, usable: np.ndarray) -> np.ndarray:
    """Per member: how many leading blocks it shares with the member of most `usable`
    blocks, at most its own `usable`."""
    ref = int(np.argmax(usable))
    width = int(usable[ref])
    equal = np.empty((len(rows), width + 1), dtype=bool)  # [members, width + 1]
    equal[:, :width] = rows[:, :width] == rows[ref, :width]
    equal[:, width] = False  # ends every run
    return np.minimum(equal.argmin(axis=1), usable)


def make_plan(
    groups: list[CascadeGroup],
    rows: np.ndarray,
    block_size: int,
    query_start_loc: list[int],
    device: torch.device,
    upload: Callable[[np.ndarray], torch.Tensor] | None = None,
) -> CascadePlan | None:
    """The plan of `groups` (None when there is none); its index arrays go to `device`
    through `upload` (the engine's pinned staging) or a plain copy."""
    if not groups:
        return None
    if upload is None:

        def upload(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a).to(device)

    prefix = tuple(tuple(rows[g.seqs[0], : g.num_prefix_blocks].tolist()) for g in groups)
    return CascadePlan(tuple(groups), block_size, tuple(query_start_loc), prefix, upload)
