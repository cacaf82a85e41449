"""BlockPool and BlockManager on tiny pools: exact block ids, refcounts, copy-on-write."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedbatch.engine.block_manager import BlockCopy, BlockManager
from pagedbatch.engine.block_pool import BlockPool
from pagedbatch.engine.sequence import Sequence
from pagedbatch.sampling_params import SamplingParams


def make_seq(seq_id: int, num_tokens: int) -> Sequence:
    tokens = list(range(num_tokens))
    return Sequence(seq_id, tokens, num_tokens, SamplingParams(), max_len=10_000)


def compute(manager: BlockManager, seq: Sequence, n: int) -> list[BlockCopy]:
    """What a step does to a sequence: make room, then mark the tokens computed."""
    copies = manager.append(seq, n)
    seq.num_computed_tokens += n
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


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from("nafx"), st.integers(0, 5), st.integers(1, 9)), max_size=40)
)
def test_random_operations_keep_refcounts_equal_to_holders(ops):
    pool = BlockPool(12)
    manager = BlockManager(pool, block_size=4)
    seqs: list[Sequence] = []
    for op, pick, n in ops:
        live = [s for s in seqs if s.block_table]
        if op == "n":
            seq = make_seq(len(seqs), n)
            if manager.can_append(seq, n):
                compute(manager, seq, n)
                seqs.append(seq)
        elif op == "a" and live:
            seq = live[pick % len(live)]
            seq.token_ids += [0] * n
            if manager.can_append(seq, n):
                compute(manager, seq, n)
            else:
                del seq.token_ids[-n:]
        elif op == "f" and live:
            child = make_seq(len(seqs), 0)
            manager.fork(live[pick % len(live)], child)
            child.token_ids = list(range(child.num_computed_tokens))
            seqs.append(child)
        elif op == "x" and live:
            manager.free(live[pick % len(live)])
        pool.check_integrity()
        holders = [0] * pool.num_blocks
        for s in seqs:
            for b in s.block_table:
                holders[b] += 1
        assert holders == [pool.refcount(b) for b in range(pool.num_blocks)]
    for s in seqs:
        if s.block_table:
            manager.free(s)
    assert pool.num_free == pool.num_blocks
