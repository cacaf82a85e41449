"""Records to engine requests, in two steps a job of millions of records can afford.

`check` takes a batch of records and gives, for each, its prompt's token ids (tokenized
in one batch: the fast tokenizer encodes it in Rust) or the error output that replaces
the record: invalid params, a prompt that is empty, out of the vocabulary or too long,
bad choices, a constraint that does not compile. When a checked record is admitted,
`params` and `seeds` (or `choice_tokens`) give what the engine builds its sequences from
(`Engine.add_samples`, `add_choices`), with the prompt's token ids kept since in a
`PromptStore`.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import NamedTuple

from pagedbatch.engine.block_pool import blocks_for
from pagedbatch.engine.constraints import Grammars
from pagedbatch.engine.job_pool import record_blocks
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


class Checked(NamedTuple):
    """A batch of records checked: each one's prompt token ids or its error output; for the
    records that passed, the most output tokens they may generate (max_tokens x n each;
    choices: none) and the most KV blocks they may hold (engine/job_pool.py)."""

    prompts: list[list[int] | RequestOutput]
    output_tokens: int
    blocks: int


class Preparer:
    """Checks records and gives what the engine needs to run them, for one LLM."""

    def __init__(
        self, prompts: PromptBuilder, limits: Limits, grammars: Grammars, thinks: bool = False
    ) -> None:
        self.prompts = prompts
        self.limits = limits
        self.grammars = grammars  # each record's constraint compiled (once each) when checked
        self.thinks = thinks  # the model marks its thinking (engine/reasoning.py)
        self._choices: dict[str, list[int]] = {}

    def check(self, records: Seq[Record], defaults: SamplingParams) -> Checked:
        """Each record's prompt token ids, or its error output; what the records that passed
        may generate and hold (`Checked`)."""
        limits = self.limits
        checked: list[list[int] | RequestOutput] = []
        budget = blocks = 0
        prompts = prompt_ids(self.prompts, records, defaults, limits.vocab_size)
        for record, ids in zip(records, prompts):
            if not isinstance(ids, RequestOutput):
                params = ids[1]
                ids = self._check_fit(record, *ids)
                if not isinstance(ids, RequestOutput):
                    budget += params.most_output_tokens
                    choices = [len(self._choice_tokens(c)) for c in params.choices or ()]
                    blocks += record_blocks(
                        len(ids), params.max_output_tokens, params.n, choices,
                        limits.block_size, limits.max_model_len,
                    )  # fmt: skip
            checked.append(ids)
        return Checked(checked, budget, blocks)

    def params(self, record: Record, defaults: SamplingParams) -> SamplingParams:
        """The sampling params of a record that passed `check`."""
        return defaults.with_overrides(record.overrides)

    def seeds(self, record: Record, params: SamplingParams) -> list[int | None]:
        """The seed of each sample of a record that passed `check` (None: a random one)."""
        seed = self._record_seed(record, params)
        return [sample_seed(seed, k) for k in range(params.n)]

    def choice_tokens(self, params: SamplingParams) -> list[list[int]]:
        """The token ids of each choice of a record that passed `check` (none empty)."""
        assert params.choices is not None
        return [self._choice_tokens(text) for text in params.choices]

    def _check_fit(
        self, record: Record, ids: list[int], params: SamplingParams
    ) -> list[int] | RequestOutput:
        """`ids`, or the error of a record whose prompt (and choices) do not fit, or whose
        params the model cannot follow, or whose constraint does not compile for it."""
        if params.reasoning_budget is not None and not self.thinks:
            problem = (
                "reasoning_budget: the model marks no thinking (<think> ... </think> tokens "
                "used by its chat template; see --reasoning-parser)"
            )
            return _error(record, INVALID_PARAMS, problem, prompt_tokens=len(ids))
        problem = _vocabulary_problem(params, self.limits.vocab_size)
        if problem is not None:
            return _error(record, INVALID_PARAMS, problem, prompt_tokens=len(ids))
        if params.choices is not None:
            problem, code = self._choices_problem(len(ids), params), INVALID_PARAMS
        else:
            problem, code = self._length_problem(len(ids), params), PROMPT_TOO_LONG
        if problem is None and params.constraint is not None:
            try:
                self.grammars.compile(params.constraint)
            except ValueError as e:
                problem, code = str(e), INVALID_PARAMS
        if problem is not None:
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
        total = min(limit, prompt_len + params.max_output_tokens)
        needed = blocks_for(total, self.limits.block_size)
        if needed > self.limits.num_blocks:
            budget = "" if params.reasoning_budget is None else " and its reasoning budget"
            return (
                f"prompt ({prompt_len} tokens) + max_tokens ({params.max_tokens}){budget} needs "
                f"{needed} KV blocks but the cache has {self.limits.num_blocks}; "
                "raise --kv-memory or --num-blocks, or lower max_tokens"
            )
        return None

    def _record_seed(self, record: Record, params: SamplingParams) -> int | None:
        """The record's own seed; else one derived from the job seed (`params.seed`) and the
        record id, so that a record samples the same text in any order, batch or resumed run."""
        if "seed" in record.overrides or params.seed is None:
            return params.seed
        return derive_seed(params.seed, record.id)


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


def _vocabulary_problem(params: SamplingParams, vocab_size: int) -> str | None:
    """A token id of `logit_bias` or `stop_token_ids` outside the vocabulary, named."""
    for name, tokens in (
        ("logit_bias", [t for t, _ in params.logit_bias]), ("stop_token_ids", params.stop_token_ids)
    ):  # fmt: skip
        outside = [t for t in tokens if t >= vocab_size]
        if outside:
            return f"{name}: token {outside[0]} is outside the vocabulary (0 to {vocab_size - 1})"
    return None


def _error(record: Record, code: str, message: str, prompt_tokens: int = 0) -> RequestOutput:
    return RequestOutput(record.id, prompt_tokens=prompt_tokens, error=RecordError(code, message))
