"""Block tables of sequences: growing them, forking them, copy-on-write, freeing."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from pagedbatch.engine.block_pool import BlockPool, blocks_for
from pagedbatch.engine.block_tables import BlockTables
from pagedbatch.engine.memory import KVUsage
from pagedbatch.engine.radix_cache import Node, RadixCache
from pagedbatch.engine.sequence import Sequence


class BlockCopy(NamedTuple):
    """Copy the KV contents of block `src` into block `dst` before the step runs."""

    src: int
    dst: int


class BlockManager:
    """Maps each sequence's logical blocks to physical ones from a BlockPool.

    Block tables are append-only. A block may be shared by several tables (after
    `fork`, or through the prefix cache); a shared block that is not full is copied
    before it is written (copy-on-write), so no block is written while its refcount > 1.

    With a `prefix_cache`, a sequence starts from the cached blocks of its longest
    cached prefix (`attach_cached_prefix`), its full blocks are cached as they are
    computed (`commit`), and cached blocks nobody uses are evicted when the pool runs
    out of free blocks. A sequence's path in the cache is the manager's to keep: the node
    it ends at (locked while the sequence holds blocks) and how many of the sequence's
    blocks it covers.
    """

    def __init__(
        self,
        pool: BlockPool,
        block_size: int,
        prefix_cache: RadixCache | None = None,
        *,
        max_num_seqs: int = 8,
        max_blocks_per_seq: int = 8,
    ) -> None:
        self.pool = pool
        self.block_size = block_size
        self.prefix_cache = prefix_cache
        self.usage = KVUsage(pool.num_blocks, block_size)
        # Every table also lives as a row here (sized for the usual maximum; it grows).
        self.tables = BlockTables(max_num_seqs, max_blocks_per_seq)
        self._cache_nodes: dict[int, Node] = {}  # seq_id -> end of its locked cached path
        self._inserted: dict[int, int] = {}  # seq_id -> its blocks in the cache (> 0)
        # Sequences whose partly filled last block may be shared (forks, until they write):
        # the only ones whose next token may need a copy-on-write.
        self.shared_tails: set[int] = set()

    def cache_node(self, seq: Sequence) -> Node | None:
        """The end of `seq`'s path in the prefix cache, locked for it (None: no path)."""
        return self._cache_nodes.get(seq.seq_id)

    def num_inserted_blocks(self, seq: Sequence) -> int:
        """How many of `seq`'s blocks are in the prefix cache."""
        return self._inserted.get(seq.seq_id, 0)

    def blocks_for(self, num_tokens: int) -> int:
        return blocks_for(num_tokens, self.block_size)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Free blocks that `append(seq, num_new_tokens)` would take (0: append does nothing)."""
        size, computed = self.block_size, seq.num_computed_tokens
        needed = max(-(-(computed + num_new_tokens) // size) - len(seq.block_table), 0)
        if num_new_tokens and computed % size:  # the next write lands in a partial block
            needed += self.pool.refcount(seq.block_table[(computed - 1) // size]) > 1
        return needed

    @property
    def num_available(self) -> int:
        """Free blocks, counting cached blocks that eviction could free."""
        cache = self.prefix_cache
        return self.pool.num_free + (cache.num_evictable_blocks if cache else 0)

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= self.num_available

    def _allocate(self, n: int) -> list[int]:
        if self.pool.num_free < n and self.prefix_cache is not None:
            self.prefix_cache.evict(n - self.pool.num_free)
        blocks = self.pool.allocate(n)
        for block in blocks:
            self.usage.allocated(block)
            self.usage.hold(block)
        return blocks

    def append(self, seq: Sequence, num_new_tokens: int) -> list[BlockCopy]:
        """Make room for the next `num_new_tokens` tokens of `seq` (KV not yet computed).

        Returns the block copies that must run before the step writes the new tokens.
        """
        copies = []
        if self._needs_copy(seq, num_new_tokens):
            index = (seq.num_computed_tokens - 1) // self.block_size
            old = seq.block_table[index]
            (new,) = self._allocate(1)
            seq.block_table[index] = new
            self.tables.write(seq.seq_id, index, [new])
            self.usage.release(old)
            self.pool.free([old])
            copies.append(BlockCopy(old, new))
        if num_new_tokens:
            self.shared_tails.discard(seq.seq_id)  # its last block is its own from here on
        end = seq.num_computed_tokens + num_new_tokens
        missing = self.blocks_for(end) - len(seq.block_table)
        if missing > 0:
            start = len(seq.block_table)
            seq.block_table.extend(self._allocate(missing))
            self.tables.write(seq.seq_id, start, seq.block_table[start:])
        return copies

    def commit(self, seq: Sequence, num_new_tokens: int) -> None:
        """Mark the next `num_new_tokens` tokens computed; cache blocks that became full."""
        begin = seq.num_computed_tokens
        end = seq.num_computed_tokens = begin + num_new_tokens
        size, table, fill = self.block_size, seq.block_table, self.usage.fill
        for index in range(begin // size, -(-end // size)):
            fill(table[index], min(size, end - index * size))
        if end // size > begin // size:
            self._cache_full_blocks(seq)

    def commit_each(
        self, seqs: list[Sequence], begins: list[int], counts: list[int], rows: np.ndarray
    ) -> None:
        """`commit(seqs[i], counts[i])` for each i (`begins[i]`: its computed tokens now,
        `rows[i]` its row of the block tables); a step where each computes one token
        (decode) with numpy, looping only over those whose block became full."""
        if len(seqs) != sum(counts) or 0 in counts:
            for seq, n in zip(seqs, counts):
                self.commit(seq, n)
            return
        size = self.block_size
        index = np.array(begins, dtype=np.int64) // size  # the block each token lands in
        blocks = self.tables.host[rows, index]
        ends = [b + 1 for b in begins]
        for seq, end in zip(seqs, ends):
            seq.num_computed_tokens = end
        self.usage.write_each(blocks, np.array(ends, dtype=np.int64) - index * size)
        for seq, end in zip(seqs, ends):
            if end % size == 0:  # its block became full
                self._cache_full_blocks(seq)

    def _cache_full_blocks(self, seq: Sequence) -> None:
        """Put `seq`'s whole computed blocks that the prefix cache lacks in it."""
        size, end = self.block_size, seq.num_computed_tokens
        full, inserted = end // size, self.num_inserted_blocks(seq)
        if self.prefix_cache is None or full <= inserted:
            return
        # Only the newly full blocks, after the end of the sequence's cached path.
        cached = self.prefix_cache.insert(
            seq.token_ids[inserted * size : full * size],
            seq.block_table[inserted:full],
            self.cache_node(seq),
        )
        self._adopt(seq, cached.blocks, inserted)
        self._move_lock(seq, cached.node)
        self._inserted[seq.seq_id] = full

    def _adopt(self, seq: Sequence, cached: list[int], start: int) -> None:
        """Hold the cache's copy of each block that `seq` computed twice: `cached` are the
        tree's blocks for the sequence's blocks from `start` on.

        Two sequences that computed the same tokens in the same step both insert them;
        the tree keeps the first one's blocks. The second gives its duplicates back, so
        its lock never pins two copies of a block (on a small pool that could leave a
        sequence unable to grow, preempting itself again and again).
        """
        for index, block in enumerate(cached, start):
            own = seq.block_table[index]
            if own == block:
                continue
            self._share([block])
            self.usage.release(own)
            self.pool.free([own])
            seq.block_table[index] = block
            self.tables.write(seq.seq_id, index, [block])

    def attach_cached_prefix(self, seq: Sequence) -> None:
        """Start a sequence that holds no blocks from its longest cached prefix.

        At least the last token is left to compute: its logits are needed (a choice's
        sequence: every position from its `first_scored_position` on).
        """
        if self.prefix_cache is None or seq.block_table:
            return
        keep = min(seq.num_tokens - 1, seq.first_scored_position)
        match = self.prefix_cache.match(seq.token_ids[:keep])
        self._share(match.blocks)
        seq.block_table = list(match.blocks)
        if seq.block_table:
            self.tables.write(seq.seq_id, 0, seq.block_table)
        self._set_inserted(seq, match.num_blocks)
        seq.num_computed_tokens = match.num_blocks * self.block_size
        self._move_lock(seq, match.node)
        if seq.num_output_tokens == 0:
            seq.num_prefix_hit_tokens = seq.num_computed_tokens

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Give `child` the same blocks as `parent`, shared by reference."""
        if child.block_table:
            raise RuntimeError("fork() into a sequence that already holds blocks")
        self._share(parent.block_table)
        if parent.num_computed_tokens % self.block_size:
            self.shared_tails.update((parent.seq_id, child.seq_id))
        child.block_table = list(parent.block_table)
        self.tables.write(child.seq_id, 0, child.block_table)
        child.num_computed_tokens = parent.num_computed_tokens
        self._set_inserted(child, self.num_inserted_blocks(parent))
        if (node := self.cache_node(parent)) is not None:
            self._move_lock(child, node)

    def free(self, seq: Sequence) -> None:
        """Release every block of `seq` and forget what it had computed.

        Blocks the prefix cache holds stay there (evictable once nobody uses them).
        """
        self._move_lock(seq, None)
        for block in seq.block_table:
            self.usage.release(block)
        self.pool.free(seq.block_table)
        self.tables.release(seq.seq_id)
        seq.block_table = []
        seq.num_computed_tokens = 0
        self._inserted.pop(seq.seq_id, None)
        self.shared_tails.discard(seq.seq_id)

    def _share(self, blocks: list[int]) -> None:
        """One more table holds each of `blocks`."""
        self.pool.share(blocks)
        for block in blocks:
            self.usage.hold(block)

    def _set_inserted(self, seq: Sequence, num_blocks: int) -> None:
        if num_blocks:
            self._inserted[seq.seq_id] = num_blocks
        else:
            self._inserted.pop(seq.seq_id, None)

    def _move_lock(self, seq: Sequence, node: Node | None) -> None:
        """`seq`'s cached path now ends at `node`: lock it, unlock the old end."""
        if node is None:
            old = self._cache_nodes.pop(seq.seq_id, None)
            if old is not None:
                self.prefix_cache.unlock(old)
            return
        old = self._cache_nodes.get(seq.seq_id)
        self._cache_nodes[seq.seq_id] = node
        if old is None:
            self.prefix_cache.lock(node)
        else:
            self.prefix_cache.move_lock(old, node)

    def _needs_copy(self, seq: Sequence, num_new_tokens: int) -> bool:
        # The next write lands in the last block only when it is partially filled.
        if num_new_tokens == 0 or seq.num_computed_tokens % self.block_size == 0:
            return False
        last = seq.block_table[(seq.num_computed_tokens - 1) // self.block_size]
        return self.pool.refcount(last) > 1
