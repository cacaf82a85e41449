"""Records to engine sequences, in two steps a job of millions of records can afford.

`check` takes a batch of records and gives, for each, its prompt's token ids (tokenized
in one batch: the fast tokenizer encodes it in Rust) or the error output that replaces
the record: invalid params, a prompt that is empty, out of the vocabulary or too long,
bad choices. `sequences` builds a checked record's sequences (one per sample, or one per
choice) when the record is admitted, from the token ids kept since in a `PromptStore`.
"""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from pagedbatch.engine.block_pool import blocks_for
from pagedbatch.engine.sequence import Sequence, random_seed
from pagedbatch.outputs import (
    ENGINE_ERROR,
    INVALID_PARAMS,
    INVALID_RECORD,
    PROMPT_TOO_LONG,
    RecordError,
    RequestOutput,
)
from pagedbatch.requests.prompts import PromptBuilder, PromptError
from pagedbatch.requests.records import Record, text_problem
from pagedbatch.sampling_params import SamplingParams, derive_seed, sample_seed, short_repr

_CHOICES_CACHED = 4096  # choice texts whose tokens are kept (a job has a few)


@dataclass(frozen=True)
class Limits:
    """What a record must fit: the vocabulary, the context, the KV cache."""

    vocab_size: int
    max_model_len: int
    block_size: int
    num_blocks: int
    prefix_sharing: bool


class Preparer:
    """Checks records and builds their sequences for one LLM."""

    def __init__(self, prompts: PromptBuilder, limits: Limits) -> None:
        self.prompts = prompts
        self.limits = limits
        self._seq_ids = itertools.count()
        self._choices: dict[str, list[int]] = {}

    def check(
        self, records: Seq[Record], defaults: SamplingParams
    ) -> tuple[list[list[int] | RequestOutput], int]:
        """Each record's prompt token ids, or its error output; and the most output tokens
        the records that passed may generate (max_tokens x n each; choices: none)."""
        vocab = self.limits.vocab_size
        checked: list[list[int] | RequestOutput] = []
        budget = 0
        for record, ids in zip(records, prompt_ids(self.prompts, records, defaults, vocab)):
            if not isinstance(ids, RequestOutput):
                params = ids[1]
                ids = self._check_fit(record, *ids)
                if not isinstance(ids, RequestOutput):
                    budget += params.most_output_tokens
            checked.append(ids)
        return checked, budget

    def params(self, record: Record, defaults: SamplingParams) -> SamplingParams:
        """The sampling params of a record that passed `check`."""
        return defaults.with_overrides(record.overrides)

    def sequences(self, record: Record, ids: array[int], params: SamplingParams) -> list[Sequence]:
        """The sequences of a checked record: one per sample, or a parent and one per choice
        (with prefix sharing, samples and choices are forks of the first sequence)."""
        if params.choices is not None:
            return self._choice_sequences(record, ids, params)
        seed = self._record_seed(record, params)
        seqs = [self._sequence(record, ids, params, sample_seed(seed, k)) for k in range(params.n)]
        if self.limits.prefix_sharing:
            seqs[0].forks = seqs[1:]  # the prompt is computed once, then forked
        return seqs

    def _check_fit(
        self, record: Record, ids: list[int], params: SamplingParams
    ) -> list[int] | RequestOutput:
        """`ids`, or the error of a record whose prompt (and choices) do not fit."""
        problem = (
            self._choices_problem(len(ids), params)
            if params.choices is not None
            else self._length_problem(len(ids), params)
        )
        if problem is not None:
            code = INVALID_PARAMS if params.choices is not None else PROMPT_TOO_LONG
            return _error(record, code, problem, prompt_tokens=len(ids))
        return ids

    def _choice_tokens(self, text: str) -> list[int]:
        tokens = self._choices.get(text)
        if tokens is None:
            if len(self._choices) >= _CHOICES_CACHED:
                self._choices.clear()
            tokens = self.prompts.choice_ids(text)
            self._choices[text] = tokens
        return tokens

    def _choices_problem(self, prompt_len: int, params: SamplingParams) -> str | None:
        assert params.choices is not None
        for text in params.choices:
            tokens = self._choice_tokens(text)
            if not tokens:
                return f"choice {short_repr(text)} has no tokens"
            where = self._no_room(prompt_len + len(tokens))
            if where is not None:
                return (
                    f"choice {short_repr(text)} ({len(tokens)} tokens) after the prompt "
                    f"({prompt_len} tokens) does not fit {where}"
                )
        return None

    def _no_room(self, length: int) -> str | None:
        """What a prompt and choice of `length` tokens do not fit (None: they fit): the
        context counts them all, as it counts a prompt and its output; the KV cache holds
        all but the last, which is scored and never computed."""
        limits = self.limits
        if length > limits.max_model_len:
            return f"the model's context ({limits.max_model_len} tokens)"
        if blocks_for(length - 1, limits.block_size) > limits.num_blocks:
            return f"the KV cache ({limits.num_blocks} blocks of {limits.block_size} tokens)"
        return None

    def _length_problem(self, prompt_len: int, params: SamplingParams) -> str | None:
        limit = self.limits.max_model_len
        if prompt_len >= limit:
            return f"the prompt has {prompt_len} tokens; the model's context is {limit}"
        total = min(limit, prompt_len + params.max_tokens)
        needed = blocks_for(total, self.limits.block_size)
        if needed > self.limits.num_blocks:
            return (
                f"prompt ({prompt_len} tokens) + max_tokens ({params.max_tokens}) needs "
                f"{needed} KV blocks but the cache has {self.limits.num_blocks}; "
                "raise --kv-memory or --num-blocks, or lower max_tokens"
            )
        return None

    def _choice_sequences(
        self, record: Record, ids: array[int], params: SamplingParams
    ) -> list[Sequence]:
        """One sequence per choice: the prompt and the choice's tokens but the last, scored
        from the prompt's last position on. With prefix sharing, a scores_only parent
        computes the prompt once and the choices are forked from it."""
        assert params.choices is not None
        choices = [self._choice_tokens(text) for text in params.choices]
        seqs = [
            self._sequence(record, ids + array("i", t[:-1]), params, 0, choice_ids=tuple(t))
            for t in choices
        ]
        if not self.limits.prefix_sharing:
            return seqs
        parent = self._sequence(record, ids, params, 0)
        parent.scores_only, parent.forks = True, seqs
        return [parent, *seqs]

    def _record_seed(self, record: Record, params: SamplingParams) -> int | None:
        """The record's own seed; else one derived from the job seed (`params.seed`) and the
        record id, so that a record samples the same text in any order, batch or resumed run."""
        if "seed" in record.overrides or params.seed is None:
            return params.seed
        return derive_seed(params.seed, record.id)

    def _sequence(
        self, record: Record, ids: array[int], params: SamplingParams, seed: int | None,
        choice_ids: tuple[int, ...] | None = None,
    ) -> Sequence:  # fmt: skip
        scored = choice_ids is not None or params.choices is not None
        limit = self.limits.max_model_len
        return Sequence(
            seq_id=next(self._seq_ids), token_ids=array("i", ids), num_prompt_tokens=len(ids),
            params=params,
            max_len=len(ids) if scored else min(limit, len(ids) + params.max_tokens),
            seed=random_seed() if seed is None else seed, request_id=record.id,
            choice_ids=choice_ids, choice_logprobs=[None] * len(choice_ids or ()),
        )  # fmt: skip


def prompt_ids(
    prompts: PromptBuilder, records: Seq[Record], defaults: SamplingParams, vocab_size: int
) -> list[tuple[list[int], SamplingParams] | RequestOutput]:
    """Each record's prompt token ids (the batch tokenized at once) and sampling params, or
    the error output that replaces them: the record's own error, invalid params, a prompt
    the chat template or tokenizer refuses, an empty one, ids outside the vocabulary."""
    params = [_params(record, defaults) for record in records]
    wanted = [r for r, p in zip(records, params) if isinstance(p, SamplingParams)]
    tokens = iter(prompts.token_ids_batch(wanted))
    checked: list[tuple[list[int], SamplingParams] | RequestOutput] = []
    for record, p in zip(records, params):
        if isinstance(p, RequestOutput):
            checked.append(p)
            continue
        ids = next(tokens)
        problem = _ids_problem(record, ids, vocab_size)
        checked.append(problem if problem is not None else (ids, p))
    return checked


def _params(record: Record, defaults: SamplingParams) -> SamplingParams | RequestOutput:
    if record.error is not None:
        return RequestOutput(record.id, error=record.error)
    if (problem := text_problem(record)) is not None:
        return _error(record, INVALID_RECORD, problem)
    try:
        return defaults.with_overrides(record.overrides)
    except (TypeError, ValueError) as e:
        return _error(record, INVALID_PARAMS, str(e))


def _ids_problem(record: Record, ids: list[int] | Exception, vocab: int) -> RequestOutput | None:
    if isinstance(ids, PromptError):
        return _error(record, INVALID_RECORD, str(ids))
    if isinstance(ids, Exception):  # the tokenizer failing on this record's text only
        return _error(record, ENGINE_ERROR, f"tokenizing failed: {type(ids).__name__}: {ids}")
    if not ids:
        return _error(record, INVALID_RECORD, "the prompt is empty")
    if not 0 <= min(ids) <= max(ids) < vocab:
        return _error(record, INVALID_RECORD, f"token ids must be in [0, {vocab})")
    return None


def _error(record: Record, code: str, message: str, prompt_tokens: int = 0) -> RequestOutput:
    return RequestOutput(record.id, prompt_tokens=prompt_tokens, error=RecordError(code, message))
