"""BlockPool and BlockManager on tiny pools: exact block ids, refcounts, copy-on-write."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kv_counts import count_snapshot

from pagedbatch.engine.block_manager import BlockCopy, BlockManager
from pagedbatch.engine.block_pool import BlockPool
from pagedbatch.engine.memory import running_figures
from pagedbatch.engine.radix_cache import RadixCache
from pagedbatch.engine.sequence import Sequence
from pagedbatch.sampling_params import SamplingParams


def make_seq(seq_id: int, num_tokens: int) -> Sequence:
    tokens = list(range(num_tokens))
    return Sequence(seq_id, tokens, num_tokens, SamplingParams(), max_len=10_000)


def compute(manager: BlockManager, seq: Sequence, n: int) -> list[BlockCopy]:
    """What a step does to a sequence: make room, then commit the computed tokens."""
    copies = manager.append(seq, n)
    manager.commit(seq, n)
    return copies


def table_row(manager: BlockManager, seq: Sequence) -> list[int]:
    """The sequence's row of the manager's BlockTables, as long as its block table."""
    tables = manager.tables
    return tables.host[tables.row(seq.seq_id), : len(seq.block_table)].tolist()


def test_allocate_takes_lowest_ids_and_free_returns_them_to_the_back():
    pool = BlockPool(4)
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(1) == [2]
    pool.free([0])
    assert pool.num_free == 2
    assert pool.allocate(2) == [3, 0]
    assert pool.num_free == 0
    with pytest.raises(RuntimeError, match="only 0 free"):
        pool.allocate(1)
    pool.check_integrity()


def test_share_and_free_count_references():
    pool = BlockPool(3)
    blocks = pool.allocate(2)
    pool.share(blocks)
    assert [pool.refcount(b) for b in blocks] == [2, 2]
    pool.free(blocks)
    assert [pool.refcount(b) for b in blocks] == [1, 1]
    assert pool.num_free == 1
    pool.free(blocks)
    assert pool.num_free == 3
    with pytest.raises(RuntimeError, match="free block 0"):
        pool.free([0])
    pool.check_integrity()


def test_block_table_grows_one_block_per_block_size_tokens():
    manager = BlockManager(BlockPool(8), block_size=4)
    seq = make_seq(0, 10)
    assert manager.blocks_needed(seq, 10) == 3
    assert compute(manager, seq, 10) == []
    assert seq.block_table == [0, 1, 2]
    assert table_row(manager, seq) == [0, 1, 2]  # where the step reads its KV slots
    seq.token_ids += [7, 7]
    compute(manager, seq, 2)  # positions 10, 11 fill block 2
    assert seq.block_table == [0, 1, 2]
    seq.token_ids.append(7)
    compute(manager, seq, 1)  # position 12 opens block 3
    assert seq.block_table == [0, 1, 2, 3]
    assert table_row(manager, seq) == [0, 1, 2, 3]


def test_fork_shares_blocks_and_copy_on_write_hits_only_the_partial_last_block():
    pool = BlockPool(8)
    manager = BlockManager(pool, block_size=4)
    parent = make_seq(0, 6)  # blocks [0, 1]; block 1 holds 2 of 4 tokens
    compute(manager, parent, 6)
    child = make_seq(1, 6)
    manager.fork(parent, child)
    assert child.block_table == [0, 1]
    assert [pool.refcount(b) for b in (0, 1)] == [2, 2]

    parent.token_ids.append(9)
    assert manager.blocks_needed(parent, 1) == 1
    assert compute(manager, parent, 1) == [BlockCopy(src=1, dst=2)]
    assert parent.block_table == [0, 2]
    assert [pool.refcount(b) for b in (0, 1, 2)] == [2, 1, 1]

    # The child is now the only holder of block 1: it writes in place, no copy.
    child.token_ids.append(5)
    assert compute(manager, child, 1) == []
    assert child.block_table == [0, 1]
    pool.check_integrity()

    manager.free(parent)
    manager.free(child)
    assert pool.num_free == 8
    assert [pool.refcount(b) for b in range(8)] == [0] * 8


def test_fork_at_a_block_boundary_copies_nothing():
    pool = BlockPool(6)
    manager = BlockManager(pool, block_size=4)
    parent = make_seq(0, 8)
    compute(manager, parent, 8)
    child = make_seq(1, 8)
    manager.fork(parent, child)
    for seq in (parent, child):
        seq.token_ids.append(1)
        assert compute(manager, seq, 1) == []
    assert parent.block_table == [0, 1, 2]
    assert child.block_table == [0, 1, 3]
    assert [pool.refcount(b) for b in range(4)] == [2, 2, 1, 1]


def cached_blocks(cache: RadixCache | None) -> list[int]:
    """Every block the prefix tree holds a reference on."""
    blocks, stack = [], [cache.root] if cache is not None else []
    while stack:
        node = stack.pop()
        blocks += node.blocks
        stack.extend(node.children.values())
    return blocks


def check_cache_paths(manager: BlockManager, seqs: list[Sequence]) -> None:
    """Each sequence's locked path in the tree holds exactly its first inserted blocks, and
    each node is locked once per sequence whose path runs through it."""
    locks: dict[int, int] = {}
    for seq in seqs:
        node, path = manager.cache_node(seq), []
        if not seq.block_table:
            assert node is None and manager.num_inserted_blocks(seq) == 0
            continue
        while node is not None and node.parent is not None:
            path[:0] = node.blocks
            locks[id(node)] = locks.get(id(node), 0) + 1
            node = node.parent
        assert path == seq.block_table[: manager.num_inserted_blocks(seq)], seq.seq_id
    assert manager.prefix_cache is not None
    stack = list(manager.prefix_cache.root.children.values())
    while stack:
        node = stack.pop()
        assert node.lock_ref == locks.get(id(node), 0)
        stack.extend(node.children.values())


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from("nafx"), st.integers(0, 5), st.integers(1, 9)), max_size=40),
    st.booleans(),
)
def test_random_operations_keep_refcounts_and_usage_equal_to_a_recount(ops, sharing):
    # As the scheduler drives the manager: attach a new sequence's cached prefix, append
    # room, commit what was computed (caching the blocks that filled), fork, free. Tokens
    # repeat (two values), so prefixes are shared through the cache as well as by forks.
    pool = BlockPool(12)
    cache = RadixCache(pool, 4) if sharing else None
    manager = BlockManager(pool, block_size=4, prefix_cache=cache)
    seqs: list[Sequence] = []
    for op, pick, n in ops:
        live = [s for s in seqs if s.block_table]
        if op == "n":
            seq = Sequence(len(seqs), [pick % 2] * n, n, SamplingParams(), max_len=10_000)
            manager.attach_cached_prefix(seq)
            todo = seq.num_tokens - seq.num_computed_tokens
            if manager.can_append(seq, todo):
                compute(manager, seq, todo)
                seqs.append(seq)
            else:
                manager.free(seq)
        elif op == "a" and live:
            seq = live[pick % len(live)]
            seq.token_ids += [pick % 2] * n
            if manager.can_append(seq, n):
                compute(manager, seq, n)
            else:
                del seq.token_ids[-n:]
        elif op == "f" and live:
            parent = live[pick % len(live)]
            child = Sequence(len(seqs), list(parent.token_ids), parent.num_tokens,
                             SamplingParams(), max_len=10_000)  # fmt: skip
            manager.fork(parent, child)
            seqs.append(child)
        elif op == "x" and live:
            manager.free(live[pick % len(live)])
        pool.check_integrity()
        if cache is not None:
            cache.check_integrity()
            check_cache_paths(manager, seqs)
        live = [s for s in seqs if s.block_table]
        holders = [0] * pool.num_blocks
        for block in [b for s in live for b in s.block_table] + cached_blocks(cache):
            holders[block] += 1
        assert holders == [pool.refcount(b) for b in range(pool.num_blocks)]
        assert all(s.num_computed_tokens == s.num_tokens for s in live)
        assert all(table_row(manager, s) == s.block_table for s in live)
        now = manager.usage.snapshot(0, running_figures(live), pool.num_used, pool.num_free)
        assert now == count_snapshot(0, live, pool.num_used, pool.num_free, 4)
    for s in seqs:
        if s.block_table:
            manager.free(s)
    assert pool.num_free + len(cached_blocks(cache)) == pool.num_blocks
    assert manager.usage.in_use == manager.usage.logical == manager.usage.live_slots == 0
