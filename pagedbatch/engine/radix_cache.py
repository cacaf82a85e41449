"""Prefix sharing: a radix tree over token ids whose nodes own full KV blocks."""

from __future__ import annotations

import heapq
import itertools
from array import array
from collections.abc import Sequence as Seq
from typing import NamedTuple

from pagedbatch.engine.block_pool import BlockPool


class Node:
    """A run of full blocks: `tokens` (a multiple of block_size) and the `blocks` holding them.

    `lock_ref` counts running sequences whose cached path goes through this node; a
    node with lock_ref 0 (and so all its descendants) may be evicted, leaves first.
    `parent` is None for the root and for a node evicted from the tree.
    """

    __slots__ = ("tokens", "blocks", "parent", "children", "lock_ref", "last_access")

    def __init__(self, tokens: array[int], blocks: list[int], parent: Node | None) -> None:
        self.tokens = tokens
        self.blocks = blocks
        self.parent = parent
        self.children: dict[bytes, Node] = {}
        self.lock_ref = 0
        self.last_access = 0


class MatchResult(NamedTuple):
    """The longest cached prefix: its blocks, in order, and the node where it ends."""

    blocks: list[int]
    node: Node

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)


class RadixCache:
    """Full KV blocks of computed prefixes, shared by reference between sequences.

    The tree holds one reference (BlockPool refcount) on every block of its nodes; a
    sequence that uses cached blocks holds its own. Only full blocks are cached, so a
    cached block is never written again.

    Eviction takes the least recently used evictable leaf from a heap kept as nodes
    change (a leaf is pushed when it is made, unlocked, touched, or its last child goes),
    so it costs O(log n) per node evicted, not a walk of the tree. Entries go stale
    rather than being removed: one counts only while its node is still an evictable
    leaf in the tree with the same `last_access`.
    """

    def __init__(self, pool: BlockPool, block_size: int) -> None:
        self.pool = pool
        self.block_size = block_size
        self.root = Node(array("i"), [], None)
        self.root.lock_ref = 1  # never evicted
        self._clock = itertools.count(1)
        self.num_cached_blocks = 0
        self.num_evictable_blocks = 0
        self.num_evicted_blocks = 0
        self.num_nodes = 0  # not counting the root
        self._leaves: list[tuple[int, int, Node]] = []  # (last_access, tiebreak, node)
        self._tiebreak = itertools.count()

    def _key(self, tokens: Seq[int], start: int) -> bytes:
        """A child's key: its first block's tokens, packed (a few bytes a token)."""
        block = tokens[start : start + self.block_size]
        if not (isinstance(block, array) and block.typecode == "i"):
            block = array("i", block)
        return block.tobytes()

    def match(self, tokens: Seq[int]) -> MatchResult:
        """Blocks of the longest cached prefix of `tokens` (whole blocks only).

        A match that ends inside a node splits it, so that the result ends on a node.
        """
        return self._walk(self.root, tokens, next(self._clock))

    def _walk(self, node: Node, tokens: Seq[int], now: int) -> MatchResult:
        """`match` of `tokens` below `node`: the blocks of the cached tokens that follow it."""
        blocks, pos = [], 0
        while len(tokens) - pos >= self.block_size:
            child = node.children.get(self._key(tokens, pos))
            if child is None:
                break
            shared = self._shared_blocks(child, tokens, pos)
            if shared < len(child.blocks):
                child = self._split(child, shared)
            child.last_access = now
            self._push_if_leaf(child)
            blocks += child.blocks
            pos += len(child.tokens)
            node = child
        return MatchResult(blocks, node)

    def insert(self, tokens: Seq[int], blocks: list[int], after: Node | None = None) -> MatchResult:
        """Cache `blocks` as holding the full blocks `tokens`, which follow the path
        root..`after` (the root by default: `tokens` are then a prefix).

        Only the tokens after `after` are compared: a sequence that caches its blocks as
        they fill passes the end of its cached path, and an insert costs its new blocks,
        not its whole prefix. The path to `after` is touched as a match of all the tokens
        from the root would (the same recency, so the same eviction order). Where the tree
        already holds some of `tokens` it keeps its own blocks; only the new tail is added
        (and referenced). Returns the tree's blocks for `tokens` (where they differ from
        `blocks`, the caller's are duplicates) and the last node.
        """
        if len(tokens) != len(blocks) * self.block_size:
            raise ValueError(f"insert() of {len(tokens)} tokens with {len(blocks)} blocks")
        now = next(self._clock)
        after = self.root if after is None else after
        self._touch_path(after, now)
        match = self._walk(after, tokens, now)
        done = match.num_blocks
        if done == len(blocks):
            return match
        start = done * self.block_size
        node = Node(array("i", tokens[start:]), blocks[done:], match.node)
        node.last_access = next(self._clock)
        match.node.children[self._key(node.tokens, 0)] = node
        self.pool.share(node.blocks)
        self.num_cached_blocks += len(node.blocks)
        self.num_evictable_blocks += len(node.blocks)
        self.num_nodes += 1
        self._push_if_leaf(node)
        return MatchResult(match.blocks + node.blocks, node)

    def _touch_path(self, node: Node, now: int) -> None:
        """The nodes root..`node` were used at `now` (O(nodes on the path), no tokens)."""
        end = node
        while node is not self.root:
            if node.parent is None:
                raise RuntimeError("insert() after a node that is no longer in the tree")
            node.last_access = now
            node = node.parent
        self._push_if_leaf(end)  # the only one of them that may be a leaf

    def lock(self, node: Node) -> None:
        """Pin the path root..node: none of it is evicted until `unlock`."""
        while node is not self.root:
            if node.lock_ref == 0:
                self.num_evictable_blocks -= len(node.blocks)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: Node) -> None:
        while node is not self.root:
            if node.lock_ref < 1:
                raise RuntimeError("unlock() of an unlocked node")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.num_evictable_blocks += len(node.blocks)
                self._push_if_leaf(node)
            node = node.parent

    def move_lock(self, old: Node, new: Node) -> None:
        """`lock(new)` then `unlock(old)`; when `new` lies below `old` (a sequence's cached
        path grew) only the nodes between them change, O(those nodes)."""
        between, node = [], new
        while node is not old and node is not self.root:
            between.append(node)
            node = node.parent
        if node is not old:
            self.lock(new)
            self.unlock(old)
            return
        for node in between:
            if node.lock_ref == 0:
                self.num_evictable_blocks -= len(node.blocks)
            node.lock_ref += 1

    def evict(self, num_blocks: int) -> int:
        """Drop least recently used unlocked leaves until `num_blocks` blocks are freed.

        Returns the number of blocks given back to the pool (whole nodes, so it may
        exceed `num_blocks`; less when not enough is evictable).
        """
        freed = 0
        while freed < num_blocks and self._leaves:
            access, _, node = heapq.heappop(self._leaves)
            if not self._is_current(access, node):
                continue  # stale: touched, locked, given a child or evicted since
            parent = node.parent
            freed += self._remove_leaf(node)
            self._push_if_leaf(parent)
        return freed

    def _evictable_leaf(self, node: Node) -> bool:
        return node.parent is not None and not node.children and node.lock_ref == 0

    def _is_current(self, access: int, node: Node) -> bool:
        return node.last_access == access and self._evictable_leaf(node)

    def _push_if_leaf(self, node: Node) -> None:
        if not self._evictable_leaf(node):
            return
        heapq.heappush(self._leaves, (node.last_access, next(self._tiebreak), node))
        if len(self._leaves) > 4 * self.num_nodes + 64:  # mostly stale: keep it O(nodes)
            self._leaves = [e for e in self._leaves if self._is_current(e[0], e[2])]
            heapq.heapify(self._leaves)

    def _remove_leaf(self, node: Node) -> int:
        del node.parent.children[self._key(node.tokens, 0)]
        node.parent = None
        self.num_nodes -= 1
        self.pool.free(node.blocks)
        count = len(node.blocks)
        self.num_cached_blocks -= count
        self.num_evictable_blocks -= count
        self.num_evicted_blocks += count
        return count

    def _shared_blocks(self, node: Node, tokens: Seq[int], pos: int) -> int:
        """How many leading blocks of `node` equal `tokens` from `pos` on."""
        size = self.block_size
        for i in range(len(node.blocks)):
            start = pos + i * size
            if len(tokens) - start < size:
                return i
            if node.tokens[i * size : (i + 1) * size] != array("i", tokens[start : start + size]):
                return i
        return len(node.blocks)

    def _split(self, node: Node, num_blocks: int) -> Node:
        """Cut `node` after `num_blocks` blocks; return the new upper part.

        The original object stays the lower part, so references to it (the end of
        some sequence's path) remain valid; the new parent inherits its lock count.
        """
        cut = num_blocks * self.block_size
        upper = Node(node.tokens[:cut], node.blocks[:num_blocks], node.parent)
        upper.lock_ref, upper.last_access = node.lock_ref, node.last_access
        node.parent.children[self._key(upper.tokens, 0)] = upper
        node.tokens, node.blocks, node.parent = node.tokens[cut:], node.blocks[num_blocks:], upper
        upper.children[self._key(node.tokens, 0)] = node
        self.num_nodes += 1
        return upper

    def _nodes(self) -> list[Node]:
        nodes, stack = [], [self.root]
        while stack:
            node = stack.pop()
            nodes.append(node)
            stack.extend(node.children.values())
        return nodes

    def check_integrity(self) -> None:
        """Raise AssertionError when the tree, its counters and the pool disagree."""
        cached = evictable = 0
        current = {id(e[2]) for e in self._leaves if self._is_current(e[0], e[2])}
        nodes = self._nodes()
        assert len(nodes) - 1 == self.num_nodes, (len(nodes) - 1, self.num_nodes)
        for node in nodes:
            if node is self.root:
                continue
            if self._evictable_leaf(node):
                assert id(node) in current, "an evictable leaf is missing from the heap"
            assert len(node.tokens) == len(node.blocks) * self.block_size > 0
            assert node.parent.children.get(self._key(node.tokens, 0)) is node
            assert node.lock_ref >= sum(c.lock_ref for c in node.children.values())
            for block in node.blocks:
                assert self.pool.refcount(block) >= 1, f"cached block {block} is free"
            cached += len(node.blocks)
            evictable += len(node.blocks) if node.lock_ref == 0 else 0
        assert cached == self.num_cached_blocks, (cached, self.num_cached_blocks)
        assert evictable == self.num_evictable_blocks, (evictable, self.num_evictable_blocks)
