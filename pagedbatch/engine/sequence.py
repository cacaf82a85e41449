"""One sequence being generated: its tokens, its KV blocks and its progress."""

from __future__ import annotations

import enum
import secrets
from collections.abc import MutableSequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pagedbatch.outputs import FinishReason
from pagedbatch.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagedbatch.engine.constraints import ConstraintMatcher
    from pagedbatch.engine.detokenizer import IncrementalDetokenizer


def random_seed() -> int:
    """A seed for a sequence whose record has none (63 bits, as `derive_seed`'s)."""
    return secrets.randbits(63)


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Prompt plus generated tokens of one completion.

    `num_computed_tokens` tokens have their K/V in the cache (in `block_table`); the
    rest are computed by the next steps. A preempted sequence frees its blocks and
    starts again from 0, keeping the tokens it has generated (recompute).

    `forks` are the other samples of the same record, forked from this one when its
    prompt is done. (Its path in the prefix cache is the BlockManager's to keep.)

    A thinking model's sequence thinks from `think_start` (the first token after `<think>`)
    to `think_end` (the `</think>` token): both None when it does not think, `think_end`
    None while it thinks (engine/reasoning.py). With a reasoning budget, `max_len` leaves
    room for the thinking and then shrinks to the answer's own max_tokens.

    `seed` keys the sampler's noise (with the position of the token being sampled); a
    sequence created without one draws a random 63-bit seed. `detokenizer` holds the
    decoded tail of the output while stop strings are searched. `matcher` follows the
    output through the grammar of `params.constraint` (engine/constraints.py).

    Scoring a choice instead of generating (engine/scoring.py): `choice_ids` are the
    choice's tokens, of which `token_ids` (the prompt, then all but the last choice token)
    are followed; the log-probability of choice token k goes to `choice_logprobs[k]`, from
    the logits of position `num_tokens - len(choice_ids) + k`. Such a sequence never
    samples: it is done when its tokens are computed. With prefix sharing, a `scores_only`
    parent computes the prompt once, gives each choice (its `forks`) the first token's
    log-probability from its last logits, forks them and ends.
    """

    seq_id: int
    token_ids: MutableSequence[int]  # LLM gives an int32 array: 4 bytes a token, not ~36
    num_prompt_tokens: int
    params: SamplingParams
    max_len: int
    seed: int = field(default_factory=random_seed)
    request_id: str | int | None = None
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_prefix_hit_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_text_end: int | None = None
    detokenizer: IncrementalDetokenizer | None = None
    # With params.logprobs: per output token, (its logprob, [(token id, logprob)] of the
    # most likely tokens), as the sampler saw them.
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    forks: list[Sequence] = field(default_factory=list)
    forked: bool = False  # started as a fork: its prompt is its record's first sequence's
    choice_ids: tuple[int, ...] | None = None
    choice_logprobs: list[float | None] = field(default_factory=list)
    scores_only: bool = False
    think_start: int | None = None
    think_end: int | None = None
    matcher: ConstraintMatcher | None = None

    @property
    def is_scoring(self) -> bool:
        """A choice's sequence or the prompt parent of choices: it scores, never samples."""
        return self.choice_ids is not None or self.scores_only

    @property
    def first_scored_position(self) -> int:
        """The first position whose logits a choice sequence needs (num_tokens if none)."""
        if self.choice_ids is None:
            return self.num_tokens
        return self.num_tokens - len(self.choice_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
