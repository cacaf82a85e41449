"""Block tables of sequences: growing them, forking them, copy-on-write, freeing."""

from __future__ import annotations

from typing import NamedTuple

from pagedbatch.block_pool import BlockPool
from pagedbatch.sequence import Sequence


class BlockCopy(NamedTuple):
    """Copy the KV contents of block `src` into block `dst` before the step runs."""

    src: int
    dst: int


class BlockManager:
    """Maps each sequence's logical blocks to physical ones from a BlockPool.

    Block tables are append-only. A block may be shared by several tables (after
    `fork`); a shared block that is not full is copied before it is written
    (copy-on-write), so no block is written while its refcount > 1.
    """

    def __init__(self, pool: BlockPool, block_size: int) -> None:
        self.pool = pool
        self.block_size = block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Free blocks that `append(seq, num_new_tokens)` would take."""
        end = seq.num_computed_tokens + num_new_tokens
        needed = self.blocks_for(end) - len(seq.block_table)
        return max(needed, 0) + int(self._needs_copy(seq, num_new_tokens))

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.pool.can_allocate(self.blocks_needed(seq, num_new_tokens))

    def append(self, seq: Sequence, num_new_tokens: int) -> list[BlockCopy]:
        """Make room for the next `num_new_tokens` tokens of `seq` (KV not yet computed).

        Returns the block copies that must run before the step writes the new tokens.
        """
        copies = []
        if self._needs_copy(seq, num_new_tokens):
            index = (seq.num_computed_tokens - 1) // self.block_size
            old = seq.block_table[index]
            (new,) = self.pool.allocate(1)
            seq.block_table[index] = new
            self.pool.free([old])
            copies.append(BlockCopy(old, new))
        end = seq.num_computed_tokens + num_new_tokens
        missing = self.blocks_for(end) - len(seq.block_table)
        if missing > 0:
            seq.block_table.extend(self.pool.allocate(missing))
        return copies

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Give `child` the same blocks as `parent`, shared by reference."""
        if child.block_table:
            raise RuntimeError("fork() into a sequence that already holds blocks")
        self.pool.share(parent.block_table)
        child.block_table = list(parent.block_table)
        child.num_computed_tokens = parent.num_computed_tokens

    def free(self, seq: Sequence) -> None:
        """Release every block of `seq` and forget what it had computed."""
        self.pool.free(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0

    def slot(self, seq: Sequence, position: int) -> int:
        """The physical KV slot of token `position` of `seq`."""
        block = seq.block_table[position // self.block_size]
        return block * self.block_size + position % self.block_size

    def _needs_copy(self, seq: Sequence, num_new_tokens: int) -> bool:
        # The next write lands in the last block only when it is partially filled.
        if num_new_tokens == 0 or seq.num_computed_tokens % self.block_size == 0:
            return False
        last = seq.block_table[(seq.num_computed_tokens - 1) // self.block_size]
        return self.pool.refcount(last) > 1
