"""Time RadixCache.evict with many cached prefixes (issue #12's eviction figure).

Usage: .venv/bin/python scripts/bench_evict.py [NUM_PREFIXES]   (default 100000)
Caches NUM_PREFIXES prompts of two blocks that share their first block, then times 100
calls of evict(1), each freeing one least recently used leaf.
"""

from __future__ import annotations

import sys
import time

from pagedbatch.engine.block_pool import BlockPool
from pagedbatch.engine.radix_cache import RadixCache

BLOCK_SIZE = 16


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    pool = BlockPool(2 * n + 1)
    cache = RadixCache(pool, BLOCK_SIZE)
    shared = list(range(BLOCK_SIZE))
    for i in range(n):
        blocks = pool.allocate(2)
        cache.insert(shared + [BLOCK_SIZE + i] * BLOCK_SIZE, blocks)
        pool.free(blocks)  # the tree's reference remains: evictable
    started = time.perf_counter()
    for _ in range(100):
        cache.evict(1)
    took = (time.perf_counter() - started) / 100
    print(f"{took * 1e3:.3f} ms per evict(1) with {n} cached prefixes")


if __name__ == "__main__":
    main()
