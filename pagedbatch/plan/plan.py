"""A job's plan before any model runs: prefix sharing, hit rate, KV blocks it will need."""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import numpy as np

from pagedbatch.engine.job_pool import PoolFit, job_num_blocks, record_blocks
from pagedbatch.plan.estimate import Estimate
from pagedbatch.plan.plan_prompts import PlanPrompt, PlanPrompts
from pagedbatch.requests.prompt_store import shared_blocks

__all__ = ["Plan", "PlanPrompt", "PlanPrompts", "SharedPrefix", "make_plan"]


class SharedPrefix(NamedTuple):
    """A group of near-duplicate shared prefixes (see `shared_prefix_groups`): `records`
    records start with the same `tokens` tokens, and some of them share up to
    `longest_tokens` (a longer prefix that differs from `tokens` by only a few tokens)."""

    tokens: int
    records: int
    longest_tokens: int


@dataclass(frozen=True)
class Plan:
    records: int  # every record read: those that would run, too long, invalid
    would_run: int  # records that fit the context and are valid
    invalid: dict[str, int]  # records `run` writes an error line for, by error code
    prompt_tokens: int
    tokens_to_compute: int
    predicted_hit_rate: float
    too_long: list[Any]
    blocks_needed: int  # every record's prompt + max_tokens, all at once, no sharing
    blocks_needed_shared: int  # the same, each shared prefix block counted once
    num_blocks: int  # the pool `run` allocates
    concurrent_sequences: int
    largest_shared_prefixes: list[SharedPrefix] = field(default_factory=list)
    output_tokens: int = 0  # the most the records can generate: max_tokens x n each
    max_model_len: int = 0  # the cap on prompt + output tokens planned with
    estimate: Estimate | None = None  # the job's time, when rates were measured or stored
    weight_bytes: int = 0  # the model's weights as loaded (quantized ones as stored)
    weights: str = ""  # how the weights are quantized, or "full precision"
    kv_dtype: str = ""  # the KV cache's element type
    kv_bytes_per_token: int = 0  # K and V of one token, all layers, in kv_dtype
    constrained_records: int = 0  # records whose output a constraint shapes
    # (id, why) of records whose own constraint cannot be used (their line is an error)
    constraint_problems: list[tuple[Any, str]] = field(default_factory=list)
    tensor_parallel: int = 1  # ranks; with more than one, what the fullest rank holds:
    rank_weight_bytes: int | None = None  # its shard of the weights
    rank_kv_bytes: int | None = None  # its KV heads' part of the pool
    pool_from_job: bool = False  # num_blocks sized from the job (engine/job_pool.py)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["largest_shared_prefixes"] = [p._asdict() for p in self.largest_shared_prefixes]
        data["estimate"] = self.estimate.to_json() if self.estimate else None
        data["constraint_problems"] = [
            {"id": rid, "problem": why} for rid, why in self.constraint_problems
        ]
        return data


def make_plan(
    prompts: PlanPrompts | Sequence[tuple[Any, ...]],
    *,
    block_size: int,
    num_blocks: int,
    max_model_len: int,
    prefix_sharing: bool = True,
    top: int = 5,
    fit_pool: PoolFit | None = None,
) -> Plan:
    """Plan `prompts` (`PlanPrompts`, or [PlanPrompt (id, token ids, max_tokens[, n])]) as
    the engine runs them.

    Records run in sorted (depth-first) order; a record reuses the whole blocks it
    shares with the records before it, which in sorted order is the common prefix with
    its predecessor (capped so that its last token is computed). This assumes the cache
    keeps what a group needs while the group runs, which the engine's ordering aims at.

    With `fit_pool` (a CPU pool of the default size), `num_blocks` is the default's and the
    plan's pool is sized from the job as `run` sizes it (engine/job_pool.py).
    """
    if not isinstance(prompts, PlanPrompts):
        prompts = PlanPrompts.of(prompts, max_model_len)
    elif prompts.max_model_len != max_model_len:
        raise ValueError(
            f"the prompts were sorted out for a context of {prompts.max_model_len} tokens, "
            f"not {max_model_len}"
        )
    lengths = prompts.store.lengths()
    max_tokens = np.frombuffer(prompts.max_tokens, dtype=np.int32).astype(np.int64)
    n = np.frombuffer(prompts.n, dtype=np.int32).astype(np.int64)
    outputs = int((np.minimum(max_tokens, max_model_len - lengths) * n).sum())
    needed = -(-np.minimum(lengths + max_tokens, max_model_len) // block_size)
    held = needed.copy()  # the same with the engine's sharing of a record's own prompt
    extra = _score_choices(prompts, lengths, block_size, needed, held, prefix_sharing)
    cached, groups = np.zeros(len(lengths), dtype=np.int64), []
    if prefix_sharing and len(lengths):
        order = prompts.order()
        lcps = prompts.store.common_prefixes(order)
        cached = shared_blocks(lengths, order, lcps, block_size) * block_size
        groups = shared_prefix_groups(lcps, block_size)
    total, saved = int(lengths.sum()), int(cached.sum())
    private = int(held.sum()) - saved // block_size
    if fit_pool is not None:
        held_all = _record_blocks(prompts, lengths, block_size, max_model_len)
        num_blocks = job_num_blocks(num_blocks, held_all, saved // block_size, fit_pool, block_size)
    mean_private = max(private / len(lengths), 1) if len(lengths) else 0
    return Plan(
        records=prompts.records,
        would_run=len(lengths),
        invalid=dict(sorted(prompts.invalid.items())),
        prompt_tokens=total,
        tokens_to_compute=total - saved + extra,
        predicted_hit_rate=saved / total if total else 0.0,
        too_long=list(prompts.too_long),
        blocks_needed=int(needed.sum()),
        blocks_needed_shared=private,
        num_blocks=num_blocks,
        concurrent_sequences=int(num_blocks // mean_private) if mean_private else 0,
        largest_shared_prefixes=groups[:top],
        output_tokens=outputs,
        max_model_len=max_model_len,
        constrained_records=prompts.constrained,
        constraint_problems=list(prompts.constraint_problems),
        pool_from_job=fit_pool is not None,
    )


def _record_blocks(
    prompts: PlanPrompts, lengths: np.ndarray, block_size: int, max_model_len: int
) -> int:
    """`record_blocks` summed over the prompts, as `Preparer.check` sums them for `run`."""
    ends = prompts.choice_ends
    return sum(
        record_blocks(
            int(lengths[k]),
            prompts.max_tokens[k],
            prompts.n[k],
            prompts.choice_tokens[ends[k - 1] if k else 0 : ends[k]],
            block_size,
            max_model_len,
        )  # fmt: skip
        for k in range(len(lengths))
    )


def _score_choices(
    prompts: PlanPrompts,
    lengths: np.ndarray,
    block_size: int,
    needed: np.ndarray,
    held: np.ndarray,
    prefix_sharing: bool,
) -> int:
    """Count the records that score choices, as the engine runs them: each choice is a
    sequence of the prompt and its tokens but the last. Sets their `needed` blocks (every
    choice holding its own copy of the prompt) and `held` blocks (with sharing: the
    prompt's whole blocks once, each choice its own from the partial one on), and returns
    the tokens they compute beyond their prompts (with sharing: each choice's tokens but
    the last; without: each choice computes the prompt again)."""
    counts = np.diff(np.frombuffer(prompts.choice_ends, dtype=np.int64), prepend=0)
    if not counts.any():
        return 0
    owner = np.repeat(np.arange(len(lengths)), counts)  # the prompt of each choice
    tokens = np.frombuffer(prompts.choice_tokens, dtype=np.int32).astype(np.int64)
    prompt = lengths[owner]
    whole = prompt // block_size
    copies = -(-(prompt + tokens - 1) // block_size)  # a choice's blocks, unshared
    scoring = counts > 0
    needed[scoring] = np.bincount(owner, copies, len(lengths)).astype(np.int64)[scoring]
    if not prefix_sharing:
        held[scoring] = needed[scoring]
        return int((prompt + tokens - 1).sum() - lengths[scoring].sum())
    own = np.bincount(owner, copies - whole, len(lengths)).astype(np.int64)
    held[scoring] = (lengths[scoring] // block_size) + own[scoring]
    return int((tokens - 1).sum())


def near_duplicate_tokens(tokens: int, block_size: int) -> int:
    """How many tokens a longer shared prefix may add to a group's `tokens` and still be
    the same shared instruction: two blocks, or an eighth of the prefix if that is more."""
    return max(2 * block_size, tokens // 8)


class _Intervals(NamedTuple):
    """The LCP interval tree of sorted prompts, interval j: prompts `first[j]`.. (`count[j]`
    of them) share `tokens[j]` tokens; `parent[j]` is the interval it is inside (-1 for the
    root, interval 0, which shares 0 tokens and holds every prompt). `closed` lists the
    intervals children first (post-order, left to right), so reversed, parents first."""

    tokens: array[int]
    first: array[int]
    count: array[int]
    parent: array[int]
    closed: array[int]


def _intervals(lcps: np.ndarray, block_size: int) -> _Intervals:
    """The intervals of at least `block_size` tokens (and the root) of sorted prompts;
    `lcps[i]` is the common prefix of prompts i-1 and i (`lcps[0]` = 0). Shorter intervals
    are left out, their children lifted to the nearest interval kept: they share no KV
    block. Only the places where the LCP changes are visited (in between, nothing opens
    or closes)."""
    lcps = np.where(lcps >= block_size, lcps, 0)
    t = _Intervals(array("q", [0]), array("q", [0]), array("q", [0]), array("q", [-1]), array("q"))
    stack = [0]
    changes = np.flatnonzero(np.diff(lcps)) + 1
    steps = zip([*changes.tolist(), len(lcps)], [*lcps[changes].tolist(), 0])
    for i, lcp in steps:
        first, closed = i - 1, -1
        while t.tokens[stack[-1]] > lcp:
            closed = stack.pop()
            t.count[closed], first = i - t.first[closed], t.first[closed]
            t.closed.append(closed)
            if t.tokens[stack[-1]] >= lcp:
                t.parent[closed], closed = stack[-1], -1
        if t.tokens[stack[-1]] < lcp:
            stack.append(len(t.tokens))
            for column, value in zip(t[:4], (lcp, first, 0, -1)):
                column.append(value)
            if closed >= 0:
                t.parent[closed] = stack[-1]
    t.count[0] = len(lcps)
    t.closed.append(0)
    return t


def shared_prefix_groups(lcps: Sequence[int] | np.ndarray, block_size: int) -> list[SharedPrefix]:
    """The distinct shared prefixes of sorted prompts, near-duplicates grouped.

    The prefixes shared by two or more prompts nest (an LCP interval tree: 621 tokens
    shared by 120 records, inside it 645 by two of them, ...). A shared prefix of at least
    one block (shorter ones share no KV block) starts a group, unless it is inside a group
    whose `tokens` it exceeds by at most `near_duplicate_tokens`: then it belongs to that
    group (one instruction whose records go on alike for a few tokens, or two instructions
    that differ only in their last few tokens), which reports its `records`, the prefix
    they all share, and the longest prefix of the group. Largest saving first:
    (records - 1) x tokens; ties in the order of a depth-first walk, last child first.
    """
    t = _intervals(np.asarray(lcps, dtype=np.int64), block_size)
    groups: list[list[int]] = []  # [tokens, records, longest tokens]
    group_of = [-1] * len(t.tokens)  # the group an interval's nested prefixes compare to
    for j in reversed(t.closed):
        g, tokens = group_of[t.parent[j]] if j else -1, t.tokens[j]
        if g >= 0 and tokens - groups[g][0] <= near_duplicate_tokens(groups[g][0], block_size):
            groups[g][2] = max(groups[g][2], tokens)
        elif tokens >= block_size:
            g = len(groups)
            groups.append([tokens, t.count[j], tokens])
        group_of[j] = g
    groups.sort(key=lambda g: ((g[1] - 1) * g[0], g[0]), reverse=True)
    return [SharedPrefix(*g) for g in groups]
