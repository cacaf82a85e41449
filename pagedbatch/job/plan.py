"""A job's plan before any model runs: prefix sharing, hit rate, KV blocks it will need."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

from pagedbatch.engine.block_pool import blocks_for


class SharedPrefix(NamedTuple):
    """A prompt prefix of `tokens` tokens that `records` records start with."""

    tokens: int
    records: int


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

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["largest_shared_prefixes"] = [p._asdict() for p in self.largest_shared_prefixes]
        return data


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if a[:mid] == b[:mid] else (lo, mid)
    return lo


def make_plan(
    prompts: list[tuple[Any, list[int], int]],
    *,
    block_size: int,
    num_blocks: int,
    max_model_len: int,
    prefix_sharing: bool = True,
    top: int = 5,
) -> Plan:
    """Plan `prompts` = [(record id, prompt token ids, max_tokens)] as the engine runs them.

    Records run in sorted (depth-first) order; a record reuses the whole blocks it
    shares with the records before it, which in sorted order is the common prefix with
    its predecessor (capped so that its last token is computed). This assumes the cache
    keeps what a group needs while the group runs, which the engine's ordering aims at.
    """
    too_long = [rid for rid, ids, _ in prompts if len(ids) >= max_model_len]
    ok = sorted(((ids, n) for _, ids, n in prompts if len(ids) < max_model_len), key=lambda p: p[0])
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
        largest_shared_prefixes=_largest_groups(lcps, top, block_size) if prefix_sharing else [],
    )


def _largest_groups(lcps: list[int], top: int, min_extra: int) -> list[SharedPrefix]:
    """Shared prefixes from the neighbour LCPs of sorted prompts (LCP intervals).

    `lcps[i]` is the common prefix of sorted prompts i-1 and i. Each interval is a run
    of consecutive prompts whose common prefix is `tokens` long; a sub-group is listed
    only when it shares at least `min_extra` tokens more than the group around it.
    Ranked by the tokens that sharing saves, (records - 1) * tokens.
    """
    groups: list[SharedPrefix] = []
    stack: list[tuple[int, int]] = [(0, 0)]  # (common prefix, first prompt of the run)
    for i in range(1, len(lcps) + 1):
        lcp, left = (lcps[i] if i < len(lcps) else 0), i - 1
        while stack[-1][0] > lcp:
            value, left = stack.pop()
            if value - max(lcp, stack[-1][0]) >= min_extra or stack[-1][0] == 0 == lcp:
                groups.append(SharedPrefix(value, i - left))
        if stack[-1][0] < lcp:
            stack.append((lcp, left))
    groups.sort(key=lambda g: (g.records - 1) * g.tokens, reverse=True)
    return groups[:top]
