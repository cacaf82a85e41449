"""Physical KV block ids: a free list and reference counts."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks that hold `num_tokens` tokens: the ceiling of num_tokens / block_size."""
    return -(-num_tokens // block_size)


class BlockPool:
    """Owns the ids `0 .. num_blocks-1` of the KV cache's blocks.

    Invariant: every block is either on the free list with refcount 0, or off it with
    refcount >= 1, where the refcount is the number of block tables (and, later, radix
    nodes) that hold it. Allocation takes from the front of the free list and freed
    blocks go to its back, so block ids are deterministic.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._refcount = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def refcount(self, block: int) -> int:
        return self._refcount[block]

    def allocate(self, n: int) -> list[int]:
        """Take `n` free blocks, each with refcount 1."""
        if n > len(self._free):
            raise RuntimeError(f"allocate({n}) with only {len(self._free)} free blocks")
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self._refcount[b] = 1
        return blocks

    def share(self, blocks: Iterable[int]) -> None:
        """One more holder for each of `blocks` (a fork, or a cache entry)."""
        for b in blocks:
            if self._refcount[b] < 1:
                raise RuntimeError(f"share() of free block {b}")
            self._refcount[b] += 1

    def free(self, blocks: Iterable[int]) -> None:
        """One holder fewer for each of `blocks`; those nobody holds go back to the free list."""
        for b in blocks:
            if self._refcount[b] < 1:
                raise RuntimeError(f"free() of free block {b}")
            self._refcount[b] -= 1
            if self._refcount[b] == 0:
                self._free.append(b)

    def check_integrity(self) -> None:
        """Raise AssertionError when the free list and refcounts disagree."""
        free = set(self._free)
        assert len(free) == len(self._free), "a block is on the free list twice"
        for b, rc in enumerate(self._refcount):
            assert (rc == 0) == (b in free), f"block {b}: refcount {rc}, free={b in free}"
