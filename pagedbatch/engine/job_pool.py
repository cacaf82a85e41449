"""A CPU KV pool sized from the job: the blocks its records could ever hold at once.

On CPU, with neither `num_blocks` nor `kv_memory` given, a job's pool is not the default
(a quarter of the RAM up to 4 GiB, `num_blocks_for`) but what the job needs, capped by
that default: every record's prompt and outputs held at once, each shared prefix block
counted once (the prefix cache keeps them all: nothing is ever evicted or preempted for
room, so the outputs are those of the default pool), plus room for the shared blocks
two sequences compute in the same step before the cache keeps one copy
(`BlockManager._adopt`).
`LLM.generate(fit_pool=True)` sizes it after tokenizing the records, before the first step;
`pagedbatch plan` from the same prompts, with the same functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from pagedbatch.engine.block_pool import blocks_for


class PoolFit(NamedTuple):
    """What the room for a step's duplicate blocks depends on."""

    max_batch_tokens: int
    max_num_seqs: int


def record_blocks(
    prompt_len: int,
    output_tokens: int,
    n: int,
    choice_tokens: Sequence[int],
    block_size: int,
    max_model_len: int,
) -> int:
    """The most blocks one record's sequences hold, none shared: each of its `n` samples its
    prompt and `output_tokens` (up to the context); a record that scores choices, each
    choice after the prompt but its last token (never computed)."""
    if choice_tokens:
        return sum(blocks_for(prompt_len + c - 1, block_size) for c in choice_tokens)
    return n * blocks_for(min(prompt_len + output_tokens, max_model_len), block_size)


def job_num_blocks(default: int, held: int, shared: int, fit: PoolFit, block_size: int) -> int:
    """The pool of a job whose records hold `held` blocks (`record_blocks` summed), `shared`
    of them prefix blocks another record computes first: at most `default` blocks (what
    the memory allows). A shared block is computed twice only by sequences in one step,
    each at most its chunk's blocks and one more."""
    duplicates = blocks_for(fit.max_batch_tokens, block_size) + fit.max_num_seqs
    return max(1, min(default, held - shared + min(shared, duplicates)))
