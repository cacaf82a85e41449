"""The records a plan counts, a few bytes each: what `pagedbatch plan` keeps of a job.

`PlanPrompts` holds the token ids of the prompts that fit the context in a `PromptStore`
(prompt k there is the k-th that fits, in input order), their `max_tokens` and `n` in
arrays of the same numbering (a record that scores choices generates nothing: max_tokens
0, and its choices' token counts are kept), and the ids of the records too long for the
context (their tokens are not kept); how many records constrain their output, and the ids of
those whose own constraint cannot be used, with why. `read_plan_prompts` fills it from a
`RecordIndex` as `run` checks records, tokenizing a batch at a time; `PlanPrompts.of` from a
few `PlanPrompt`s.
"""

from __future__ import annotations

import functools
import itertools
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np

from pagedbatch.constraint import record_constraint
from pagedbatch.inputs.record_index import RecordIndex
from pagedbatch.outputs import RequestOutput
from pagedbatch.requests.ahead import ahead
from pagedbatch.requests.preparer import prompt_ids
from pagedbatch.requests.prompt_store import PromptStore
from pagedbatch.requests.prompts import PromptBuilder
from pagedbatch.sampling_params import SamplingParams

TOKENIZE_BATCH = 512  # records tokenized at a time


class PlanPrompt(NamedTuple):
    """One record to plan: its prompt's token ids, max_tokens and samples (`n`); or, for a
    record that scores choices, the token count of each choice (max_tokens is then 0)."""

    id: Any
    token_ids: list[int]
    max_tokens: int
    n: int = 1
    choice_tokens: tuple[int, ...] = ()


class PlanPrompts:
    """Prompts to plan, for a context of `max_model_len` tokens.

    Invariants: `len(store) == len(max_tokens) == len(n) == len(choice_ends)`; prompt k's
    choices have the token counts `choice_tokens[choice_ends[k-1]:choice_ends[k]]` (none
    for a record that generates); every stored prompt is shorter than `max_model_len`;
    `too_long` lists the other records' ids in input order; `invalid` counts by error code
    the records left out because `run` writes an error line for them.
    """

    def __init__(self, vocab_size: int, max_model_len: int) -> None:
        self.max_model_len = max_model_len
        self.store = PromptStore(vocab_size)
        self.max_tokens = array("i")
        self.n = array("i")
        self.choice_tokens = array("i")
        self.choice_ends = array("q")
        self.too_long: list[Any] = []
        self.constrained = 0  # records whose output a constraint shapes (that would run)
        self.constraint_problems: list[tuple[Any, str]] = []  # (id, why), input order
        self.invalid: Counter[str] = Counter()  # records left out as `run` fails them, by code
        self._order: np.ndarray | None = None

    @classmethod
    def of(cls, prompts: Iterable[tuple[Any, ...]], max_model_len: int) -> PlanPrompts:
        """From (id, token ids, max_tokens[, n]) tuples (`PlanPrompt`s)."""
        planned = [PlanPrompt(*p) for p in prompts]
        vocab = max((max(p.token_ids, default=0) for p in planned), default=0) + 1
        result = cls(vocab, max_model_len)
        for p in planned:
            if result.fits(p.token_ids):
                result.add(p.token_ids, p.max_tokens, p.n, p.choice_tokens)
            else:
                result.too_long.append(p.id)
        return result

    @property
    def records(self) -> int:
        """Records read: those that fit, those too long and those left out as invalid."""
        return len(self.store) + len(self.too_long) + self.invalid.total()

    @property
    def samples(self) -> int:
        """Sequences the fitting records generate: their `n` summed."""
        return sum(self.n)

    @property
    def generating_samples(self) -> int:
        """Sequences the fitting records generate, those that score choices left out."""
        return sum(n for n, most in zip(self.n, self.max_tokens) if most > 0)

    def fits(self, ids: Sequence[int]) -> bool:
        return len(ids) < self.max_model_len

    def add(
        self, ids: list[int], max_tokens: int, n: int, choice_tokens: Sequence[int] = ()
    ) -> None:
        """Keep a prompt that `fits` (with `choice_tokens`: it scores choices of these
        token counts and generates nothing)."""
        self.store.append(ids)
        self.max_tokens.append(0 if choice_tokens else max_tokens)
        self.n.append(n)
        self.choice_tokens.extend(choice_tokens)
        self.choice_ends.append(len(self.choice_tokens))
        self._order = None

    def order(self) -> np.ndarray:
        """The stored prompts' numbers in depth-first (sorted) order, computed once."""
        if self._order is None:
            self._order = self.store.order()
        return self._order

    def first(self, most: int) -> list[list[int]]:
        """The token ids of the first `most` prompts in sorted order."""
        return [self.store.tokens(int(k)).tolist() for k in self.order()[:most]]


def read_plan_prompts(
    index: RecordIndex,
    builder: PromptBuilder,
    defaults: SamplingParams,
    limits: tuple[int, int],
    on_tokenized: Callable[[int, int], None] | None = None,
) -> PlanPrompts:
    """The prompts of every record of `index`, tokenized a batch at a time, as `run` checks
    them: a record with an error, invalid params, a prompt the tokenizer or chat template
    refuses, an empty prompt or ids outside the vocabulary is left out (counted in
    `invalid` by its error code); one too long for
    the context is counted in `too_long`. `limits` is (vocab_size, max_model_len);
    `on_tokenized(done, total)` follows the records."""
    vocab_size, max_model_len = limits
    prompts = PlanPrompts(vocab_size, max_model_len)
    too_long = array("q")  # their record numbers, resolved to ids at the end
    records = index.records()
    batches = iter(lambda: list(itertools.islice(records, TOKENIZE_BATCH)), [])
    check = functools.partial(prompt_ids, builder, defaults=defaults, vocab_size=vocab_size)
    counted = functools.lru_cache(maxsize=4096)(lambda text: len(builder.choice_ids(text)))
    start = 0
    for batch, checked in ahead(batches, check):  # tokenizing while the next batch is read
        for j, prompt in enumerate(checked):
            if isinstance(prompt, RequestOutput):  # run writes an error line for it
                problem = _constraint_problem(batch[j].overrides)
                if problem is not None:
                    prompts.constraint_problems.append((prompt.id, problem))
                assert prompt.error is not None
                prompts.invalid[prompt.error.code] += 1
                continue
            ids, params = prompt
            prompts.constrained += params.constraint is not None
            if prompts.fits(ids):
                choices = params.choices or ()
                prompts.add(ids, params.max_output_tokens, params.n, [counted(c) for c in choices])
            else:
                too_long.append(start + j)
        start += len(batch)
        if on_tokenized is not None:
            on_tokenized(start, len(index))
    numbers = np.frombuffer(too_long, dtype=np.int64) if too_long else np.zeros(0, np.int64)
    prompts.too_long = [record.id for record in index.records(numbers)]
    return prompts


def _constraint_problem(fields: Any) -> str | None:
    """Why a record's own constraint (response_format, regex, grammar) cannot be used."""
    try:
        record_constraint(fields)
    except ValueError as e:
        return str(e)
    return None
