"""RadixCache on a tiny pool: exact blocks, refcounts, splits, locks, LRU eviction."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pagedbatch.engine.block_pool import BlockPool
from pagedbatch.engine.radix_cache import RadixCache

BS = 2  # block size: tokens are written in pairs below


def make(num_blocks: int = 16) -> tuple[BlockPool, RadixCache]:
    pool = BlockPool(num_blocks)
    return pool, RadixCache(pool, BS)


def cache_tokens(pool: BlockPool, cache: RadixCache, tokens: list[int]):
    """What a sequence does: allocate blocks for `tokens`, cache them, drop its own hold."""
    blocks = pool.allocate(len(tokens) // BS)
    node = cache.insert(tokens, blocks).node
    pool.free(blocks)
    return blocks, node


def cache_evicting(pool: BlockPool, cache: RadixCache, tokens: list[int]) -> None:
    """cache_tokens(), evicting first when the pool is short; nothing when even eviction
    cannot make room (what the BlockManager does when it allocates)."""
    n = len(tokens) // BS
    if pool.num_free + cache.num_evictable_blocks >= n:
        if pool.num_free < n:
            cache.evict(n - pool.num_free)
        cache_tokens(pool, cache, tokens)


def test_insert_then_match_returns_the_same_blocks_of_whole_blocks_only():
    pool, cache = make()
    blocks, _ = cache_tokens(pool, cache, [1, 2, 3, 4, 5, 6])
    assert blocks == [0, 1, 2]
    assert [pool.refcount(b) for b in blocks] == [1, 1, 1]  # the tree's own reference
    assert cache.match([1, 2, 3, 4, 5, 6, 7]).blocks == [0, 1, 2]
    assert cache.match([1, 2, 3, 4, 5]).blocks == [0, 1]  # 5 alone is not a whole block
    assert cache.match([1, 2, 3, 9]).blocks == [0]
    assert cache.match([9, 9]).blocks == []
    assert cache.num_cached_blocks == 3 and cache.num_evictable_blocks == 3
    cache.check_integrity()


def test_a_match_ending_inside_a_node_splits_it():
    pool, cache = make()
    _, leaf = cache_tokens(pool, cache, [1, 2, 3, 4, 5, 6])
    match = cache.match([1, 2, 3, 4, 7, 7])
    assert match.blocks == [0, 1]
    assert list(match.node.tokens) == [1, 2, 3, 4] and match.node.blocks == [0, 1]
    # The original node object is now the lower part, hanging under the new one.
    assert list(leaf.tokens) == [5, 6] and leaf.blocks == [2] and leaf.parent is match.node
    cache.check_integrity()


def test_insert_keeps_existing_blocks_and_adds_only_the_new_tail():
    pool, cache = make()
    cache_tokens(pool, cache, [1, 2, 3, 4])  # blocks 0, 1
    # Another sequence computed the same first block itself (block 2) and more (3).
    mine = pool.allocate(2)
    assert mine == [2, 3]
    cached = cache.insert([1, 2, 5, 6], mine)
    assert cached.blocks == [0, 3]  # the tree's block where it had the tokens, then mine
    node = cached.node
    assert node.blocks == [3] and list(node.tokens) == [5, 6]
    assert cache.match([1, 2, 5, 6, 0]).blocks == [0, 3]
    assert [pool.refcount(b) for b in range(4)] == [1, 1, 1, 2]  # block 2 stays the sequence's
    assert cache.num_cached_blocks == 3
    cache.check_integrity()


def test_evict_frees_least_recently_used_unlocked_leaves_first():
    pool, cache = make(8)
    cache_tokens(pool, cache, [1, 1, 2, 2])  # blocks 0, 1
    cache_tokens(pool, cache, [3, 3])  # block 2
    cache_tokens(pool, cache, [4, 4])  # block 3
    cache.match([1, 1, 2, 2])  # now the most recently used
    assert cache.evict(1) == 1
    assert pool.refcount(2) == 0 and cache.match([3, 3]).blocks == []
    assert cache.evict(1) == 1  # [4, 4] is next, then the older path [1,1,2,2]
    assert cache.match([4, 4]).blocks == []
    assert cache.evict(5) == 2
    assert cache.num_cached_blocks == 0 and pool.num_free == 8
    assert cache.num_evicted_blocks == 4
    cache.check_integrity()


def test_locked_paths_are_not_evicted_and_unlocking_makes_them_evictable():
    pool, cache = make(8)
    _, leaf = cache_tokens(pool, cache, [1, 1, 2, 2])
    cache_tokens(pool, cache, [1, 1, 3, 3])  # splits: [1,1] -> {[2,2], [3,3]}
    cache.lock(leaf)
    assert cache.num_evictable_blocks == 1  # only [3, 3]: [1,1] and [2,2] are pinned
    assert cache.evict(10) == 1
    assert cache.match([1, 1, 2, 2]).blocks == [0, 1]
    cache.unlock(leaf)
    assert cache.num_evictable_blocks == 2
    assert cache.evict(10) == 2
    assert pool.num_free == 8
    cache.check_integrity()


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["insert", "match", "lock", "unlock", "evict"]),
            st.lists(st.integers(0, 2), min_size=0, max_size=10),
            st.integers(0, 6),
        ),
        max_size=40,
    )
)
def test_random_interleavings_keep_the_tree_and_pool_consistent(ops):
    pool, cache = make(24)
    locked = []
    for op, tokens, k in ops:
        tokens = tokens[: len(tokens) // BS * BS]
        if op == "insert" and tokens:
            cache_evicting(pool, cache, tokens)
        elif op == "match":
            match = cache.match(tokens)
            assert len(match.blocks) * BS <= len(tokens)
        elif op == "lock":
            node = cache.match(tokens).node
            if node is not cache.root:
                cache.lock(node)
                locked.append(node)
        elif op == "unlock" and locked:
            cache.unlock(locked.pop(k % len(locked)))
        elif op == "evict":
            before = cache.num_evictable_blocks
            freed = cache.evict(k)
            assert freed <= before and (freed >= k or cache.num_evictable_blocks == 0)
        cache.check_integrity()
        pool.check_integrity()
        assert pool.num_used == cache.num_cached_blocks  # the tree is the only holder
    for node in locked:
        cache.unlock(node)
    cache.evict(10**6)
    assert pool.num_free == pool.num_blocks, "a block leaked"


class ScanLRU(RadixCache):
    """The eviction rule written plainly: walk the whole tree for the least recently used
    evictable leaf, every time (what evict() did before its heap)."""

    def evict(self, num_blocks: int) -> int:
        freed = 0
        while freed < num_blocks:
            leaves = [n for n in self._nodes() if self._evictable_leaf(n)]
            if not leaves:
                break
            freed += self._remove_leaf(min(leaves, key=lambda n: n.last_access))
        return freed


def contents(cache: RadixCache) -> dict[tuple[int, ...], list[int]]:
    """Every cached path (its tokens from the root) -> the blocks of its last node."""
    out, stack = {}, [(cache.root, ())]
    while stack:
        node, prefix = stack.pop()
        for child in node.children.values():
            path = prefix + tuple(child.tokens)
            out[path] = child.blocks
            stack.append((child, path))
    return out


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["insert", "insert", "match", "lock", "unlock", "evict"]),
            st.lists(st.integers(0, 2), min_size=0, max_size=12),
            st.integers(0, 6),
        ),
        max_size=60,
    )
)
def test_evicts_exactly_what_a_full_scan_lru_evicts(ops):
    pools_caches = [(BlockPool(20), None), (BlockPool(20), None)]
    pools_caches = [(p, cls(p, BS)) for (p, _), cls in zip(pools_caches, (RadixCache, ScanLRU))]
    locked: list[list] = [[], []]
    for op, tokens, k in ops:
        tokens = tokens[: len(tokens) // BS * BS]
        for (pool, cache), held in zip(pools_caches, locked):
            if op == "insert" and tokens:
                cache_evicting(pool, cache, tokens)
            elif op == "match":
                cache.match(tokens)
            elif op == "lock" and (node := cache.match(tokens).node) is not cache.root:
                cache.lock(node)
                held.append(node)
            elif op == "unlock" and held:
                cache.unlock(held.pop(k % len(held)))
            elif op == "evict":
                cache.evict(k)
        (pool, heap), (_, scan) = pools_caches
        assert contents(heap) == contents(scan)
        assert heap.num_evicted_blocks == scan.num_evicted_blocks
        heap.check_integrity()
        pool.check_integrity()


class CountingCache(RadixCache):
    """Records the nodes whose tokens an operation compared."""

    def __init__(self, pool: BlockPool, block_size: int) -> None:
        super().__init__(pool, block_size)
        self.compared: list = []

    def _shared_blocks(self, node, tokens, pos):
        self.compared.append(node)
        return super()._shared_blocks(node, tokens, pos)


def test_an_insert_after_a_node_compares_and_returns_only_the_new_blocks():
    pool = BlockPool(16)
    cache = CountingCache(pool, BS)
    prompt = cache.insert([1, 1, 2, 2, 3, 3], pool.allocate(3)).node  # blocks 0-2
    cache.compared.clear()
    new = pool.allocate(1)  # block 3
    cached = cache.insert([4, 4], new, after=prompt)
    assert cached.blocks == [3] and cached.node.parent is prompt
    assert list(cached.node.tokens) == [4, 4] and cached.node.blocks == [3]
    assert cache.compared == []  # the prompt's three blocks were not read again
    assert cache.match([1, 1, 2, 2, 3, 3, 4, 4]).blocks == [0, 1, 2, 3]
    # Another sequence on the same path computed [4, 4] (block 4) and [5, 5] (block 5):
    # the tree keeps its block 3 and adds block 5 under it.
    cache.compared.clear()
    cached = cache.insert([4, 4, 5, 5], pool.allocate(2), after=prompt)
    assert cached.blocks == [3, 5] and cached.node.parent.blocks == [3]
    assert [list(n.tokens) for n in cache.compared] == [[4, 4]]
    assert [pool.refcount(b) for b in range(6)] == [2, 2, 2, 2, 1, 2]  # 4: the caller's
    cache.check_integrity()


def test_an_insert_after_a_node_splits_a_child_it_matches_in_part():
    pool, cache = make()
    prompt = cache.insert([1, 1], pool.allocate(1)).node  # block 0
    cache.insert([2, 2, 3, 3], pool.allocate(2), after=prompt)  # blocks 1, 2
    cached = cache.insert([2, 2, 9, 9], pool.allocate(2), after=prompt)  # 3, 4
    assert cached.blocks == [1, 4]
    upper = cached.node.parent
    assert (list(upper.tokens), upper.blocks, upper.parent) == ([2, 2], [1], prompt)
    assert sorted(c.blocks[0] for c in upper.children.values()) == [2, 4]
    cache.check_integrity()


def test_move_lock_down_a_path_locks_only_the_new_nodes():
    pool, cache = make()
    top = cache.insert([1, 1], pool.allocate(1)).node
    cache.lock(top)
    below = cache.insert([2, 2, 3, 3], pool.allocate(2), after=top).node
    assert cache.num_evictable_blocks == 2
    cache.move_lock(top, below)
    assert (top.lock_ref, below.lock_ref, cache.num_evictable_blocks) == (1, 1, 0)
    other = cache.insert([7, 7], pool.allocate(1)).node  # not below `below`
    cache.move_lock(below, other)
    assert (top.lock_ref, below.lock_ref, other.lock_ref) == (0, 0, 1)
    assert cache.num_evictable_blocks == 3
    cache.check_integrity()


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["grow", "grow", "grow", "start", "finish", "match", "evict"]),
            st.integers(0, 3),  # which sequence
            st.lists(st.integers(0, 2), min_size=1, max_size=8),
            st.integers(0, 6),
        ),
        max_size=60,
    )
)
def test_incremental_inserts_leave_the_tree_and_eviction_order_of_whole_prefix_inserts(ops):
    """Sequences caching their blocks as they fill, as the BlockManager does: one cache
    inserts only each new part after the sequence's node (and moves its lock down), the
    other the whole prefix from the root (lock the new node, unlock the old), as before.
    After every operation both hold the same paths, blocks and evicted counts."""
    caches = [make(24), make(24)]
    # k -> (its cached tokens, their blocks in the tree, the end of its path: locked)
    seqs: list[dict[int, tuple[list[int], list[int], object]]] = [{}, {}]
    for op, k, tokens, n in ops:
        tokens = tokens * BS  # whole blocks
        for incremental, ((pool, cache), held) in enumerate(zip(caches, seqs)):
            if op == "start" and k not in held:
                match = cache.match(tokens)
                cache.lock(match.node)
                held[k] = (tokens[: match.num_blocks * BS], match.blocks, match.node)
            elif op == "grow" and k in held:
                own, own_blocks, node = held[k]
                want = len(tokens) // BS
                if pool.num_free + cache.num_evictable_blocks < want:
                    continue
                if pool.num_free < want:
                    cache.evict(want - pool.num_free)
                blocks = pool.allocate(want)
                if incremental:
                    cached = cache.insert(tokens, blocks, after=node)
                    cached_blocks = own_blocks + cached.blocks
                    cache.move_lock(node, cached.node)
                else:
                    cached = cache.insert(own + tokens, own_blocks + blocks)
                    cached_blocks = cached.blocks
                    cache.lock(cached.node)
                    cache.unlock(node)
                pool.free(blocks)  # the tree holds them now (or held its own copies)
                held[k] = (own + tokens, cached_blocks, cached.node)
            elif op == "finish" and k in held:
                cache.unlock(held.pop(k)[2])
            elif op == "match":
                cache.match(tokens)
            elif op == "evict":
                cache.evict(n)
        (pool_a, a), (pool_b, b) = caches
        assert contents(a) == contents(b)
        assert a.num_evicted_blocks == b.num_evicted_blocks
        assert pool_a.num_free == pool_b.num_free
        a.check_integrity()
        b.check_integrity()


def test_an_insert_after_a_node_makes_its_whole_path_recent_as_a_match_from_the_root_did():
    pool, cache = make(8)
    first = cache.insert([1, 1], pool.allocate(1)).node  # sequence A's prompt
    cache.lock(first)
    second = cache.insert([2, 2], pool.allocate(1), after=first).node
    cache.move_lock(first, second)
    other = cache.insert([5, 5], pool.allocate(1)).node  # sequence B, still running
    cache.lock(other)
    third = cache.insert([3, 3], pool.allocate(1), after=second).node  # A grows again
    cache.move_lock(second, third)
    pool.free([0, 1, 2, 3])  # the tree is the only holder
    cache.unlock(third)  # A finishes
    assert cache.evict(1) == 1  # A's last block (B's is locked)
    assert contents(cache) == {(1, 1): [0], (1, 1, 2, 2): [1], (5, 5): [2]}  # (no touch)
    cache.unlock(other)  # B finishes: its leaf is older than A's path, touched by A's insert
    assert cache.evict(1) == 1
    assert contents(cache) == {(1, 1): [0], (1, 1, 2, 2): [1]}
    cache.check_integrity()
