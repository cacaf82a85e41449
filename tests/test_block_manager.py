"""BlockManager with a RadixCache on tiny pools, no model: exact block ids, refcounts, locks.

Every test drives the manager the way the engine does (`append` before a step, `commit`
after it) and checks the pool, the tree and the block tables after every operation.
"""

from __future__ import annotations

from collections import Counter

from pagedbatch.engine.block_manager import BlockCopy, BlockManager
from pagedbatch.engine.block_pool import BlockPool
from pagedbatch.engine.radix_cache import Node, RadixCache
from pagedbatch.engine.scheduler import Scheduler
from pagedbatch.engine.sequence import Sequence
from pagedbatch.sampling_params import SamplingParams

BS = 4  # tokens per block


def make(num_blocks: int = 8) -> BlockManager:
    pool = BlockPool(num_blocks)
    return BlockManager(pool, BS, RadixCache(pool, BS))


def make_seq(seq_id: int, tokens: list[int], max_new: int = 100) -> Sequence:
    return Sequence(seq_id, list(tokens), len(tokens), SamplingParams(), len(tokens) + max_new)


def run(manager: BlockManager, seq: Sequence, n: int) -> list[BlockCopy]:
    """One step of `seq` computing its next `n` tokens: make room, then commit them."""
    copies = manager.append(seq, n)
    manager.commit(seq, n)
    return copies


def nodes(cache: RadixCache) -> list[Node]:
    """Every node of the tree but the root."""
    found, stack = [], list(cache.root.children.values())
    while stack:
        node = stack.pop()
        found.append(node)
        stack.extend(node.children.values())
    return found


def path(cache: RadixCache, node: Node | None) -> list[Node]:
    """The nodes from `node` up to (not including) the root."""
    up = []
    while node is not None and node is not cache.root:
        up.append(node)
        node = node.parent
    return up


def refcounts(manager: BlockManager) -> list[int]:
    return [manager.pool.refcount(b) for b in range(manager.pool.num_blocks)]


def check(manager: BlockManager, *seqs: Sequence) -> None:
    """The invariants of docs/ARCHITECTURE.md, for a manager whose only sequences are `seqs`.

    Every block is free with refcount 0, or held with refcount = tables + radix nodes
    holding it; a node's lock count is the number of sequences whose cached path runs
    through it; a block of an unlocked node is held by the tree alone.
    """
    pool, cache = manager.pool, manager.prefix_cache
    cache.check_integrity()
    pool.check_integrity()
    tree = nodes(cache)
    holders = Counter(b for s in seqs for b in s.block_table)
    holders.update(b for node in tree for b in node.blocks)
    assert refcounts(manager) == [holders[b] for b in range(pool.num_blocks)]
    assert pool.num_free == sum(holders[b] == 0 for b in range(pool.num_blocks))
    for node in tree:
        users = [s.seq_id for s in seqs if node in path(cache, manager.cache_node(s))]
        assert node.lock_ref == len(users), (node.tokens, node.lock_ref, users)
        if node.lock_ref == 0:
            assert [pool.refcount(b) for b in node.blocks] == [1] * len(node.blocks)
    for s in seqs:  # a sequence locks the path of its own cached tokens
        locked = [t for node in reversed(path(cache, manager.cache_node(s))) for t in node.tokens]
        assert locked == s.token_ids[: len(locked)]
        assert manager.num_inserted_blocks(s) * BS == len(locked)
        assert manager.num_inserted_blocks(s) == s.num_computed_tokens // BS


def test_attach_takes_whole_cached_blocks_but_never_the_last_token():
    manager = make()
    first = make_seq(0, list(range(8)))  # two full blocks
    assert run(manager, first, 8) == []
    assert first.block_table == [0, 1]
    check(manager, first)
    manager.free(first)
    check(manager, first)
    assert refcounts(manager)[:2] == [1, 1]  # the tree's own references

    # The same 8 tokens again: block 1 holds the last token, whose logits are needed.
    again = make_seq(1, list(range(8)))
    manager.attach_cached_prefix(again)
    assert again.block_table == [0]
    assert again.num_computed_tokens == again.num_prefix_hit_tokens == 4
    check(manager, first, again)
    assert run(manager, again, 4) == []
    # Block 1 was recomputed into block 2; the tree has those tokens, so `again` holds
    # the tree's block 1 from then on and gives block 2 back.
    assert again.block_table == [0, 1]
    assert refcounts(manager)[:3] == [2, 2, 0]
    check(manager, first, again)

    # One token more than the cached blocks: both blocks are reused.
    longer = make_seq(2, list(range(9)))
    manager.attach_cached_prefix(longer)
    assert longer.block_table == [0, 1]
    assert longer.num_computed_tokens == longer.num_prefix_hit_tokens == 8
    assert manager.blocks_needed(longer, 1) == 1
    check(manager, first, again, longer)
    assert run(manager, longer, 1) == []
    assert longer.block_table == [0, 1, 3]
    assert refcounts(manager)[:4] == [3, 3, 0, 1]
    check(manager, first, again, longer)

    for seq in (again, longer):
        manager.free(seq)
        check(manager, first, again, longer)
    assert refcounts(manager) == [1, 1, 0, 0, 0, 0, 0, 0]
    assert manager.pool.num_free == 6


def test_attach_does_nothing_to_a_sequence_that_already_holds_blocks():
    manager = make()
    first = make_seq(0, list(range(9)))
    run(manager, first, 9)
    manager.attach_cached_prefix(first)
    assert first.block_table == [0, 1, 2] and first.num_computed_tokens == 9
    check(manager, first)


def test_commit_caches_blocks_as_they_fill_and_moves_the_lock_to_the_deepest_node():
    manager = make()
    cache = manager.prefix_cache
    seq = make_seq(0, list(range(10)))
    run(manager, seq, 6)  # a first prompt chunk: block 0 full, block 1 half
    assert seq.block_table == [0, 1]
    top = manager.cache_node(seq)
    assert (list(top.tokens), top.blocks, top.lock_ref) == ([0, 1, 2, 3], [0], 1)
    assert manager.num_inserted_blocks(seq) == 1 and cache.num_cached_blocks == 1
    assert refcounts(manager)[:2] == [2, 1]
    check(manager, seq)

    run(manager, seq, 4)  # the rest: block 1 full, block 2 has 2 tokens
    middle = manager.cache_node(seq)
    assert (middle.blocks, middle.parent, middle.lock_ref, top.lock_ref) == ([1], top, 1, 1)
    assert seq.block_table == [0, 1, 2] and refcounts(manager)[:3] == [2, 2, 1]
    assert cache.num_evictable_blocks == 0
    check(manager, seq)

    seq.token_ids.append(50)
    run(manager, seq, 1)  # 11 tokens: no block became full, nothing inserted
    assert manager.cache_node(seq) is middle and cache.num_cached_blocks == 2
    check(manager, seq)
    seq.token_ids.append(51)
    run(manager, seq, 1)  # 12 tokens: block 2 is full
    assert manager.cache_node(seq).blocks == [2] and manager.cache_node(seq).parent is middle
    assert [n.lock_ref for n in path(cache, manager.cache_node(seq))] == [1, 1, 1]
    assert manager.num_inserted_blocks(seq) == 3
    check(manager, seq)

    manager.free(seq)
    assert seq.block_table == [] and manager.cache_node(seq) is None
    assert refcounts(manager) == [1, 1, 1, 0, 0, 0, 0, 0]
    assert cache.num_evictable_blocks == cache.num_cached_blocks == 3
    check(manager, seq)


def test_two_sequences_sharing_a_prefix_lock_and_unlock_their_own_paths():
    manager = make()
    cache = manager.prefix_cache
    prefix = [7, 7, 7, 7, 8, 8, 8, 8]
    a = make_seq(0, prefix + [1, 1, 1, 1])
    b = make_seq(1, prefix + [2, 2, 2, 2])
    run(manager, a, 12)
    a_leaf = manager.cache_node(a)
    assert a.block_table == [0, 1, 2] and a_leaf.blocks == [0, 1, 2]
    check(manager, a, b)

    # b's match ends inside a's node: it splits, the upper part carries both locks.
    manager.attach_cached_prefix(b)
    shared = manager.cache_node(b)
    assert b.block_table == [0, 1] and b.num_computed_tokens == 8
    assert (shared.blocks, shared.lock_ref) == ([0, 1], 2)
    assert (a_leaf.blocks, a_leaf.parent, a_leaf.lock_ref) == ([2], shared, 1)
    assert manager.cache_node(a) is a_leaf
    check(manager, a, b)

    run(manager, b, 4)
    b_leaf = manager.cache_node(b)
    assert b.block_table == [0, 1, 3]
    assert (b_leaf.blocks, b_leaf.parent, b_leaf.lock_ref) == ([3], shared, 1)
    assert shared.lock_ref == 2 and cache.num_evictable_blocks == 0
    check(manager, a, b)

    manager.free(a)  # only a's own leaf becomes evictable
    assert (shared.lock_ref, a_leaf.lock_ref, b_leaf.lock_ref) == (1, 0, 1)
    assert cache.num_evictable_blocks == 1
    check(manager, a, b)
    assert cache.evict(4) == 1  # the shared blocks are b's prefix: not evictable
    assert cache.match(a.token_ids).blocks == [0, 1]
    assert refcounts(manager) == [2, 2, 0, 2, 0, 0, 0, 0]
    check(manager, a, b)

    manager.free(b)
    assert shared.lock_ref == b_leaf.lock_ref == 0 and cache.num_evictable_blocks == 3
    check(manager, a, b)


def test_allocation_evicts_least_recently_used_cached_blocks():
    manager = make(8)
    cache = manager.prefix_cache
    x, y, z = (make_seq(i, [t] * 8) for i, t in enumerate((10, 11, 12)))
    for seq in (x, y, z):  # cached in blocks [0, 1], [2, 3], [4, 5]; free list [6, 7]
        run(manager, seq, 8)
        manager.free(seq)
    reader = make_seq(3, [10] * 9)  # uses x's blocks: x is now the most recently used
    manager.attach_cached_prefix(reader)
    assert reader.block_table == [0, 1]
    manager.free(reader)
    check(manager, x, y, z, reader)
    assert manager.pool.num_free == 2 and cache.num_evictable_blocks == 6

    w = make_seq(4, [20] * 12)
    assert manager.can_append(w, 12)
    run(manager, w, 12)  # 2 free + y's node (the least recently used leaf, both blocks)
    assert w.block_table == [6, 7, 2]
    assert refcounts(manager) == [1, 1, 2, 0, 1, 1, 2, 2]
    assert cache.match([11] * 8).blocks == []
    assert cache.num_evicted_blocks == 2
    check(manager, w)

    v = make_seq(5, [30] * 16)  # 1 free (3) + z's node, then x's node; w's is locked
    assert manager.num_available == 1 + 4
    run(manager, v, 16)
    assert v.block_table == [3, 4, 5, 0]
    assert cache.match([12] * 8).blocks == [] and cache.match([10] * 8).blocks == []
    assert cache.match([20] * 12).blocks == [6, 7, 2]
    assert manager.pool.num_free == 1 and cache.num_evicted_blocks == 6
    check(manager, w, v)


def test_can_append_counts_evictable_blocks_but_not_locked_ones():
    manager = make(4)
    cache = manager.prefix_cache
    a = make_seq(0, [5] * 8)
    run(manager, a, 8)
    manager.free(a)  # blocks 0, 1 cached, evictable; 2, 3 free
    big = make_seq(1, [6] * 16)
    assert manager.pool.num_free == 2 and manager.num_available == 4
    assert manager.can_append(big, 16) and not manager.can_append(big, 17)

    user = make_seq(2, [5] * 9)  # locks a's blocks while it runs
    manager.attach_cached_prefix(user)
    assert user.block_table == [0, 1] and cache.num_evictable_blocks == 0
    assert manager.num_available == 2
    assert manager.can_append(big, 8) and not manager.can_append(big, 9)
    check(manager, a, big, user)

    manager.free(user)
    assert manager.can_append(big, 16)
    run(manager, big, 16)
    assert big.block_table == [2, 3, 0, 1]
    assert manager.pool.num_free == 0 and cache.match([5] * 8).blocks == []
    check(manager, a, big, user)


def test_fork_shares_blocks_and_copies_the_shared_partial_last_block_on_first_write():
    manager = make(8)
    cache = manager.prefix_cache
    parent = make_seq(0, [1, 2, 3, 4, 5, 6])
    run(manager, parent, 6)  # block 0 full (cached), block 1 has 2 tokens
    child = make_seq(1, [])
    manager.fork(parent, child)
    child.token_ids = list(parent.token_ids)
    assert child.block_table == [0, 1] and child.num_computed_tokens == 6
    node = manager.cache_node(parent)
    assert manager.cache_node(child) is node and node.lock_ref == 2
    assert refcounts(manager)[:3] == [3, 2, 0]
    check(manager, parent, child)

    child.token_ids.append(70)
    assert manager.blocks_needed(child, 1) == 1
    assert run(manager, child, 1) == [BlockCopy(src=1, dst=2)]
    assert child.block_table == [0, 2] and parent.block_table == [0, 1]
    assert refcounts(manager)[:3] == [3, 1, 1]
    check(manager, parent, child)

    parent.token_ids.append(60)  # now the only holder of block 1: written in place
    assert manager.blocks_needed(parent, 1) == 0
    assert run(manager, parent, 1) == []
    assert parent.block_table == [0, 1]
    check(manager, parent, child)

    for seq, token in ((parent, 61), (child, 71)):  # both fill their second block
        seq.token_ids.append(token)
        assert run(manager, seq, 1) == []
        check(manager, parent, child)
    assert cache.match(parent.token_ids).blocks == [0, 1]
    assert cache.match(child.token_ids).blocks == [0, 2]
    assert [n.lock_ref for n in path(cache, manager.cache_node(child))] == [1, 2]

    manager.free(parent)
    manager.free(child)
    assert refcounts(manager) == [1, 1, 1, 0, 0, 0, 0, 0]
    check(manager, parent, child)


def test_a_copy_on_write_with_no_free_block_evicts_one():
    manager = make(4)
    old = make_seq(0, [9] * 4)
    run(manager, old, 4)
    manager.free(old)  # block 0: cached, evictable
    parent = make_seq(1, [1] * 10)
    run(manager, parent, 10)  # blocks 1, 2 cached and locked, 3 half full; none free
    child = make_seq(2, [])
    manager.fork(parent, child)
    child.token_ids = parent.token_ids + [5]
    assert manager.pool.num_free == 0 and manager.can_append(child, 1)
    assert run(manager, child, 1) == [BlockCopy(src=3, dst=0)]
    assert child.block_table == [1, 2, 0] and manager.prefix_cache.match([9] * 4).blocks == []
    check(manager, old, parent, child)
    # Block 3 is the parent's alone again: it fills it in place, but has no block for more.
    assert manager.can_append(parent, 2) and not manager.can_append(parent, 3)


def sched_step(scheduler: Scheduler) -> list[tuple[int, int]]:
    """An engine step without a model: commit, and sampling sequences append token 0."""
    out = scheduler.schedule()
    for seq, n in out.scheduled:
        scheduler.block_manager.commit(seq, n)
    for s in out.scheduled:
        if s.seq.num_computed_tokens == s.seq.num_tokens:
            s.seq.token_ids.append(0)
    return [(s.seq.seq_id, s.num_new_tokens) for s in out.scheduled]


def test_admission_waits_one_step_for_the_block_a_running_sequence_is_computing():
    manager = make(16)
    scheduler = Scheduler(manager, max_batch_tokens=10, max_num_seqs=4)
    prefix = list(range(100, 112))  # three blocks
    a = make_seq(0, prefix + [1, 1, 1, 1])
    b = make_seq(1, prefix + [2, 2, 2, 2])
    scheduler.add(a)
    scheduler.add(b)

    assert sched_step(scheduler) == [(0, 10)]  # the budget goes to a's first chunk
    assert a.block_table == [0, 1, 2] and manager.num_inserted_blocks(a) == 2
    check(manager, a, b)

    # b could start from blocks 0, 1, but a is computing block 2 of the same prefix now:
    # b waits, holding nothing, rather than computing block 2 a second time.
    assert sched_step(scheduler) == [(0, 6)]
    assert list(scheduler.waiting) == [b] and b.block_table == [] and manager.cache_node(b) is None
    assert a.block_table == [0, 1, 2, 3]
    check(manager, a, b)

    # Block 2 is cached now: b starts from three blocks and computes only its own tail.
    assert sched_step(scheduler) == [(0, 1), (1, 4)]
    assert a.block_table == [0, 1, 2, 3, 4]
    assert b.block_table == [0, 1, 2, 5] and b.num_prefix_hit_tokens == 12
    assert refcounts(manager)[:6] == [3, 3, 3, 2, 1, 2]
    check(manager, a, b)


def test_admission_waits_only_for_its_own_next_block_and_only_with_a_cache():
    for with_cache in (True, False):
        pool = BlockPool(16)
        manager = BlockManager(pool, BS, RadixCache(pool, BS) if with_cache else None)
        scheduler = Scheduler(manager, max_batch_tokens=32, max_num_seqs=4)
        a = make_seq(0, list(range(100, 112)))
        b = make_seq(1, [5] * 4 + list(range(104, 112)))  # a different first block
        c = make_seq(2, list(range(100, 112)))  # a's prompt: a is computing c's block 0
        for seq in (a, b, c):
            scheduler.add(seq)
        if with_cache:
            assert sched_step(scheduler) == [(0, 12), (1, 12)]
            assert list(scheduler.waiting) == [c] and c.block_table == []
            check(manager, a, b, c)
            assert sched_step(scheduler) == [(0, 1), (1, 1), (2, 4)]
            # c computed its last block (its last token's logits are needed) into block 8,
            # then took the cache's copy, block 2, and gave 8 back.
            assert c.block_table == [0, 1, 2] and c.num_prefix_hit_tokens == 8
            assert pool.refcount(8) == 0
            check(manager, a, b, c)
        else:
            assert sched_step(scheduler) == [(0, 12), (1, 12), (2, 8)]
            assert c.block_table == [6, 7]


def test_a_sequence_that_computed_cached_tokens_again_gives_its_copies_back():
    # Two records with the same first two blocks are admitted in one step, before either
    # is cached: both compute them. The first to commit caches its blocks; the second
    # then holds the cache's copies and frees its own, so its lock pins one copy.
    manager = make(8)
    cache = manager.prefix_cache
    prefix = [7, 7, 7, 7, 8, 8, 8, 8]
    a = make_seq(0, prefix + [1, 1])
    b = make_seq(1, prefix + [2, 2, 2, 2])
    manager.append(a, 10)
    manager.append(b, 10)
    assert (a.block_table, b.block_table) == ([0, 1, 2], [3, 4, 5])
    manager.commit(a, 10)
    manager.commit(b, 10)
    tables = manager.tables
    assert b.block_table == [0, 1, 5] and tables.host[tables.row(1), :3].tolist() == [0, 1, 5]
    assert manager.pool.num_free == 8 - 4  # 3 and 4 went back
    assert manager.cache_node(b) is manager.cache_node(a)
    assert cache.num_cached_blocks == 2
    check(manager, a, b)
    assert manager.usage.in_use == 4 and manager.usage.shared == 2
    # The shared blocks are full: b writes its next tokens into its own third block.
    assert run(manager, b, 2) == [] and b.block_table == [0, 1, 5]
    assert manager.cache_node(b).blocks == [5]
    check(manager, a, b)
    manager.free(a)
    manager.free(b)
    check(manager, a, b)
    assert cache.num_evictable_blocks == 3 and manager.pool.num_free == 5


class ComparingCache(RadixCache):
    """Records how many tokens each insert is given and which nodes' tokens it compares."""

    def __init__(self, pool: BlockPool, block_size: int) -> None:
        super().__init__(pool, block_size)
        self.given: list[int] = []
        self.compared: list[Node] = []

    def insert(self, tokens, blocks, after=None):
        self.given.append(len(tokens))
        return super().insert(tokens, blocks, after)

    def _shared_blocks(self, node, tokens, pos):
        self.compared.append(node)
        return super()._shared_blocks(node, tokens, pos)


def test_commit_inserts_only_the_newly_full_blocks_after_the_sequences_own_node():
    pool = BlockPool(16)
    cache = ComparingCache(pool, BS)
    manager = BlockManager(pool, BS, cache)
    seq = make_seq(0, list(range(13)))
    run(manager, seq, 13)  # three full blocks and one token
    prompt = manager.cache_node(seq)
    assert (prompt.blocks, cache.given, cache.compared) == ([0, 1, 2], [12], [])
    for token in (13, 14, 15):  # block 3 fills with the third
        seq.token_ids.append(token)
        run(manager, seq, 1)
    decode = manager.cache_node(seq)
    assert (decode.parent, decode.blocks, list(decode.tokens)) == (prompt, [3], [12, 13, 14, 15])
    assert cache.given == [12, 4] and cache.compared == []  # the prompt was not read again
    assert [n.lock_ref for n in path(cache, decode)] == [1, 1]
    check(manager, seq)
    # A fork that generates the same next block finds it under the shared node.
    fork = make_seq(1, [])
    manager.fork(seq, fork)
    fork.token_ids = list(seq.token_ids)
    for token in range(16, 20):
        for s in (seq, fork):
            s.token_ids.append(token)
            run(manager, s, 1)
    assert cache.given == [12, 4, 4, 4] and cache.compared == [manager.cache_node(seq)]
    assert manager.cache_node(fork) is manager.cache_node(seq)
    assert seq.block_table == [0, 1, 2, 3, 4] and fork.block_table == [0, 1, 2, 3, 4]
    check(manager, seq, fork)
