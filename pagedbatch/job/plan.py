"""A job's plan before any model runs: prefix sharing, hit rate, KV blocks it will need."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

from pagedbatch.engine.block_pool import blocks_for
from pagedbatch.job.estimate import Estimate
from pagedbatch.job.prompt_store import common_prefix


class PlanPrompt(NamedTuple):
    """One record to plan: its prompt's token ids, max_tokens and samples (`n`)."""

    id: Any
    token_ids: list[int]
    max_tokens: int
    n: int = 1


class SharedPrefix(NamedTuple):
    """A group of near-duplicate shared prefixes (see `shared_prefix_groups`): `records`
    records start with the same `tokens` tokens, and some of them share up to
    `longest_tokens` (a longer prefix that differs from `tokens` by only a few tokens)."""

    tokens: int
    records: int
    longest_tokens: int


@dataclass(frozen=True)
class Plan:
    records: int
    prompt_tokens: int
    tokens_to_compute: int
    predicted_hit_rate: float
    too_long: list[Any]
    blocks_needed: int  # every record's prompt + max_tokens, all at once, no sharing
    blocks_needed_shared: int  # the same, each shared prefix block counted once
    num_blocks: int
    concurrent_sequences: int
    largest_shared_prefixes: list[SharedPrefix] = field(default_factory=list)
    output_tokens: int = 0  # the most the records can generate: max_tokens x n each
    max_model_len: int = 0  # the cap on prompt + output tokens planned with
    estimate: Estimate | None = None  # the job's time, when rates were measured or stored

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["largest_shared_prefixes"] = [p._asdict() for p in self.largest_shared_prefixes]
        data["estimate"] = self.estimate.to_json() if self.estimate else None
        return data


def make_plan(
    prompts: Sequence[tuple[Any, ...]],
    *,
    block_size: int,
    num_blocks: int,
    max_model_len: int,
    prefix_sharing: bool = True,
    top: int = 5,
) -> Plan:
    """Plan `prompts` = [PlanPrompt (id, token ids, max_tokens[, n])] as the engine runs them.

    Records run in sorted (depth-first) order; a record reuses the whole blocks it
    shares with the records before it, which in sorted order is the common prefix with
    its predecessor (capped so that its last token is computed). This assumes the cache
    keeps what a group needs while the group runs, which the engine's ordering aims at.
    """
    planned = [PlanPrompt(*p) for p in prompts]
    too_long = [p.id for p in planned if len(p.token_ids) >= max_model_len]
    runs = sorted((p for p in planned if len(p.token_ids) < max_model_len), key=lambda p: p[1])
    ok = [(p.token_ids, p.max_tokens) for p in runs]
    outputs = sum(min(p.max_tokens, max_model_len - len(p.token_ids)) * p.n for p in runs)
    lcps = [0] + [common_prefix(a[0], b[0]) for a, b in zip(ok, ok[1:])]
    cached = [0] * len(ok)
    if prefix_sharing:
        cached = [
            min(lcp, len(ids) - 1) // block_size * block_size for lcp, (ids, _) in zip(lcps, ok)
        ]
    total = sum(len(ids) for ids, _ in ok)
    needed = [blocks_for(min(len(ids) + n, max_model_len), block_size) for ids, n in ok]
    private = [blocks - c // block_size for blocks, c in zip(needed, cached)]
    mean_private = sum(private) / len(private) if private else 1
    groups = shared_prefix_groups(lcps, block_size) if prefix_sharing else []
    return Plan(
        records=len(prompts),
        prompt_tokens=total,
        tokens_to_compute=total - sum(cached),
        predicted_hit_rate=sum(cached) / total if total else 0.0,
        too_long=too_long,
        blocks_needed=sum(needed),
        blocks_needed_shared=sum(private),
        num_blocks=num_blocks,
        concurrent_sequences=int(num_blocks // max(mean_private, 1)),
        largest_shared_prefixes=groups[:top],
        output_tokens=outputs,
        max_model_len=max_model_len,
    )


def near_duplicate_tokens(tokens: int, block_size: int) -> int:
    """How many tokens a longer shared prefix may add to a group's `tokens` and still be
    the same shared instruction: two blocks, or an eighth of the prefix if that is more."""
    return max(2 * block_size, tokens // 8)


class _Interval:
    """An LCP interval of the sorted prompts: prompts `first`.. (`count` of them) share
    `tokens` tokens, and `children` are the intervals inside it that share more."""

    def __init__(self, tokens: int, first: int) -> None:
        self.tokens, self.first, self.count = tokens, first, 0
        self.children: list[_Interval] = []


def _intervals(lcps: list[int]) -> _Interval:
    """The LCP interval tree of sorted prompts; `lcps[i]` is the common prefix of prompts
    i-1 and i (`lcps[0]` = 0). The root shares 0 tokens and holds every prompt."""
    stack = [_Interval(0, 0)]
    for i in range(1, len(lcps) + 1):
        lcp, first, closed = (lcps[i] if i < len(lcps) else 0), i - 1, None
        while stack[-1].tokens > lcp:
            closed = stack.pop()
            closed.count, first = i - closed.first, closed.first
            if stack[-1].tokens >= lcp:
                stack[-1].children.append(closed)
                closed = None
        if stack[-1].tokens < lcp:
            stack.append(_Interval(lcp, first))
            stack[-1].children += [closed] if closed else []
    stack[0].count = len(lcps)
    return stack[0]


def shared_prefix_groups(lcps: list[int], block_size: int) -> list[SharedPrefix]:
    """The distinct shared prefixes of sorted prompts, near-duplicates grouped.

    The prefixes shared by two or more prompts nest (an LCP interval tree: 621 tokens
    shared by 120 records, inside it 645 by two of them, ...). A shared prefix of at least
    one block (shorter ones share no KV block) starts a group, unless it is inside a group
    whose `tokens` it exceeds by at most `near_duplicate_tokens`: then it belongs to that
    group (one instruction whose records go on alike for a few tokens, or two instructions
    that differ only in their last few tokens), which reports its `records`, the prefix
    they all share, and the longest prefix of the group. Largest saving first:
    (records - 1) x tokens.
    """
    groups: list[list[int]] = []  # [tokens, records, longest tokens]
    todo: list[tuple[_Interval, list[int] | None]] = [(_intervals(lcps), None)]
    while todo:
        node, group = todo.pop()
        if group is not None and node.tokens - group[0] <= near_duplicate_tokens(
            group[0], block_size
        ):
            group[2] = max(group[2], node.tokens)
        elif node.tokens >= block_size:
            group = [node.tokens, node.count, node.tokens]
            groups.append(group)
        todo += [(child, group) for child in node.children]
    groups.sort(key=lambda g: ((g[1] - 1) * g[0], g[0]), reverse=True)
    return [SharedPrefix(*g) for g in groups]
