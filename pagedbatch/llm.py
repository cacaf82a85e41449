"""The library entry point: `LLM(...).generate(records or prompts, params, on_output=...)`."""

from __future__ import annotations

import itertools
import math
from array import array
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from pagedbatch.engine.attention import ATTN_IMPLEMENTATION
from pagedbatch.engine.block_pool import blocks_for
from pagedbatch.engine.config import EngineConfig
from pagedbatch.engine.engine import Engine
from pagedbatch.engine.kv_cache import KVCache, KVCacheSpec, free_memory, num_blocks_for
from pagedbatch.engine.memory import memory_report
from pagedbatch.engine.sequence import Sequence, random_seed
from pagedbatch.engine.stats import EngineStats
from pagedbatch.engine.stopping import StopChecker
from pagedbatch.job.prompts import PromptBuilder, PromptError
from pagedbatch.job.records import Record, parse_record
from pagedbatch.models.loader import eos_token_ids, load_model
from pagedbatch.models.weights import model_bytes
from pagedbatch.outputs import (
    ENGINE_ERROR,
    INVALID_PARAMS,
    INVALID_RECORD,
    PROMPT_TOO_LONG,
    ChoiceScore,
    Completion,
    RecordError,
    RequestOutput,
    TokenLogprob,
)
from pagedbatch.sampling_params import SamplingParams, derive_seed, sample_seed

Input = str | Mapping[str, Any] | Record | list[int]


class LLM:
    """A model on a paged KV cache, ready to generate for many records.

    `LLM()` loads the embedded SmolLM2-135M-Instruct; pass `model=` (a directory, a
    .gguf file, a hub id) and any EngineConfig field, or a whole `config=`.
    """

    def __init__(self, model: str | None = None, *, config: EngineConfig | None = None, **kw: Any):
        config = config or EngineConfig()
        self.config = config.replace(**kw, **({"model": model} if model else {}))
        if (threads := self.config.torch_threads) is not None:
            torch.set_num_threads(threads)  # process-wide: the latest LLM's count holds
        self.device, dtype = self.config.torch_device, self.config.torch_dtype
        free = free_memory(self.device)  # before the weights: see num_blocks_for
        self.model, self.tokenizer = load_model(
            self.config.model, device=self.device, dtype=dtype,
            attn_implementation=ATTN_IMPLEMENTATION, cache_dir=self.config.cache_dir,
        )  # fmt: skip
        context = self.model.config.max_position_embeddings
        self.max_model_len = min(self.config.max_model_len or context, context)
        spec = KVCacheSpec.from_model_config(self.model.config, self.config.block_size, dtype)
        num_blocks = num_blocks_for(
            spec, self.device, self.config.num_blocks, self.config.kv_memory,
            weight_bytes=model_bytes(self.model), free=free,
        )  # fmt: skip
        self.kv_cache = KVCache(spec, num_blocks, self.device)
        stop = StopChecker(self.tokenizer, eos_token_ids(self.model, self.tokenizer))
        self.engine = Engine(
            self.model, self.kv_cache, stop, self.config.max_batch_tokens,
            self.config.max_num_seqs, self.max_model_len, self.config.attention_backend,
            prefix_sharing=self.config.prefix_sharing, keep_timeline=self.config.memory_report,
            cascade=self.config.cascade,
        )  # fmt: skip
        self.cuda_graphs_problem: str | None = None  # why auto CUDA graphs fell back to eager
        if self.config.use_cuda_graphs:
            self._capture_cuda_graphs()
        self.prompts = PromptBuilder(self.tokenizer, self.config.chat)
        self._seq_ids = itertools.count()

    def _capture_cuda_graphs(self) -> None:
        """Capture the decode graphs; when they were not asked for by name (the CUDA
        default), a failure leaves the engine eager and says why in `cuda_graphs_problem`."""
        try:
            self.engine.capture_cuda_graphs()
        except Exception as e:  # a capture failure (memory, an op that cannot be captured)
            lines = str(e).strip().splitlines()
            problem = f"{type(e).__name__}: {lines[0] if lines else ''}"
            if self.config.cuda_graphs:
                raise ValueError(
                    f"capturing the CUDA graphs failed ({problem}); "
                    "run with --no-cuda-graphs (cuda_graphs=False)"
                ) from e
            self.cuda_graphs_problem = problem

    def generate(
        self,
        inputs: Iterable[Input],
        params: SamplingParams | None = None,
        *,
        on_output: Callable[[RequestOutput], None] | None = None,
        on_step: Callable[[EngineStats], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_prepared: Callable[[int, int], None] | None = None,
        keep_outputs: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every input; return outputs in input order.

        `on_output` is called as each record finishes (errors first, before any step);
        `on_step` after every engine step with the engine's statistics; `on_prepared(done,
        total)` as records are tokenized, before the first step.
        `should_stop` is asked before each record is prepared and after each step; once
        it returns True, no record is admitted any more, the sequences still running or
        waiting are dropped (their blocks freed, the LLM stays usable) and `generate`
        returns the outputs of the records that finished, in input order. With
        `keep_outputs=False` an output is not held once `on_output` has it (a job that
        streams its outputs to a file), and `generate` returns an empty list.
        """
        params = params or SamplingParams()
        records = [to_record(x, i) for i, x in enumerate(inputs)]
        results: dict[int, RequestOutput] = {}

        def emit(index: int, output: RequestOutput) -> None:
            if keep_outputs:
                results[index] = output
            if on_output is not None:
                on_output(output)

        groups: list[_Group] = []
        for index, record in enumerate(records):
            if should_stop is not None and should_stop():
                return [results[i] for i in sorted(results)]
            item = self._prepare(record, params)
            if isinstance(item, RequestOutput):
                emit(index, item)
            else:
                groups.append(_Group(index, item))
            if on_prepared is not None:
                on_prepared(index + 1, len(records))

        def finish(group: _Group) -> None:
            emit(group.index, self._output(records[group.index], group.seqs))

        self._run(groups, finish, on_step, should_stop)
        return [results[i] for i in sorted(results)]

    def _run(
        self, groups: list[_Group], done: Callable[[_Group], None], on_step, should_stop
    ) -> None:
        """Run every group's sequences; call `done` when all samples of a group finished.

        With prefix sharing, records are admitted in depth-first order of their prompts
        (sorted token ids), so records sharing a prefix run together while it is cached.
        """
        if self.config.prefix_sharing:
            groups = sorted(groups, key=lambda g: g.seqs[0].token_ids)
        owner = {}
        for group in groups:
            for seq in group.seqs:
                owner[seq.seq_id] = group
            for seq in group.seqs if not group.seqs[0].forks else group.seqs[:1]:
                self.engine.add(seq)
        while self.engine.has_unfinished():
            if should_stop is not None and should_stop():
                self.engine.abort_all()
                break
            for seq in self.engine.step():
                group = owner.pop(seq.seq_id)
                group.pending -= 1
                if group.pending == 0:
                    done(group)
            if on_step is not None:
                on_step(self.engine.stats())

    def memory_report(self) -> dict:
        """The KV memory figures of everything generated so far (plain, JSON-ready data).

        The per-step timeline is there only with `memory_report=True`.
        """
        stats, spec, counter = self.engine.stats(), self.kv_cache.spec, self.engine.counter
        return memory_report(
            counter.peak, counter.kv_waste_mean, counter.timeline,
            block_size=spec.block_size, num_blocks=self.kv_cache.num_blocks,
            kv_bytes_per_token=spec.bytes_per_token,
            model_bytes=model_bytes(self.model),
            prefix_hit_rate=stats.prefix_hit_rate, preemptions=stats.preemptions,
            recomputed_tokens=stats.recomputed_tokens, evictions=stats.evicted_blocks,
            cascade_saved_token_reads=stats.cascade_saved_token_reads,
        )  # fmt: skip

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def _prepare(self, record: Record, defaults: SamplingParams) -> list[Sequence] | RequestOutput:
        """The record's sequences (one per sample), or the error output that replaces them."""
        if record.error is not None:
            return RequestOutput(record.id, error=record.error)
        try:
            params = defaults.with_overrides(record.overrides)
        except (TypeError, ValueError) as e:
            return _error(record, INVALID_PARAMS, str(e))
        try:
            ids = self.prompts.token_ids(record)
        except PromptError as e:
            return _error(record, INVALID_RECORD, str(e))
        except Exception as e:  # the tokenizer failing on this record's text only
            return _error(record, ENGINE_ERROR, f"tokenizing failed: {type(e).__name__}: {e}")
        if not ids:
            return _error(record, INVALID_RECORD, "the prompt is empty")
        vocab = self.model.get_input_embeddings().num_embeddings
        if not 0 <= min(ids) <= max(ids) < vocab:
            return _error(record, INVALID_RECORD, f"token ids must be in [0, {vocab})")
        if params.choices is not None:
            return self._choice_sequences(record, ids, params)
        problem = self._length_problem(len(ids), params)
        if problem:
            return _error(record, PROMPT_TOO_LONG, problem, prompt_tokens=len(ids))
        seed = self._record_seed(record, params)
        seqs = [self._sequence(record, ids, params, sample_seed(seed, k)) for k in range(params.n)]
        if self.config.prefix_sharing:
            seqs[0].forks = seqs[1:]  # the prompt is computed once, then forked
        return seqs

    def _choice_sequences(
        self, record: Record, ids: list[int], params: SamplingParams
    ) -> list[Sequence] | RequestOutput:
        """One sequence per choice: the prompt and the choice's tokens but the last, scored
        from the prompt's last position on. With prefix sharing, a scores_only parent
        computes the prompt once and the choices are forked from it."""
        assert params.choices is not None
        choices = []
        for text in params.choices:
            tokens = self.tokenizer.encode(text, add_special_tokens=False)
            if not tokens:
                return _error(record, INVALID_PARAMS, f"choice {text!r} has no tokens")
            length = len(ids) + len(tokens) - 1  # its last token is scored, not computed
            blocks = blocks_for(length, self.kv_cache.spec.block_size)
            if length > self.max_model_len or blocks > self.kv_cache.num_blocks:
                return _error(
                    record, INVALID_PARAMS,
                    f"choice {text!r} ({len(tokens)} tokens) after the prompt ({len(ids)} "
                    f"tokens) does not fit the context ({self.max_model_len}) or the KV cache",
                    prompt_tokens=len(ids),
                )  # fmt: skip
            choices.append(tokens)
        seqs = [
            self._sequence(record, ids + tokens[:-1], params, 0, choice_ids=tuple(tokens))
            for tokens in choices
        ]
        if not self.config.prefix_sharing:
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
        self, record: Record, ids: list[int], params: SamplingParams, seed: int | None,
        choice_ids: tuple[int, ...] | None = None,
    ) -> Sequence:  # fmt: skip
        scored = choice_ids is not None or params.choices is not None
        return Sequence(
            seq_id=next(self._seq_ids), token_ids=array("i", ids), num_prompt_tokens=len(ids),
            params=params,
            max_len=len(ids) if scored else min(self.max_model_len, len(ids) + params.max_tokens),
            seed=random_seed() if seed is None else seed, request_id=record.id,
            choice_ids=choice_ids, choice_logprobs=[None] * len(choice_ids or ()),
        )  # fmt: skip

    def _length_problem(self, prompt_len: int, params: SamplingParams) -> str | None:
        if prompt_len >= self.max_model_len:
            return (
                f"the prompt has {prompt_len} tokens; the model's context is {self.max_model_len}"
            )
        total = min(self.max_model_len, prompt_len + params.max_tokens)
        needed = blocks_for(total, self.kv_cache.spec.block_size)
        if needed > self.kv_cache.num_blocks:
            return (
                f"prompt ({prompt_len} tokens) + max_tokens ({params.max_tokens}) needs "
                f"{needed} KV blocks but the cache has {self.kv_cache.num_blocks}; "
                "raise --kv-memory or --num-blocks, or lower max_tokens"
            )
        return None

    def _output(self, record: Record, seqs: list[Sequence]) -> RequestOutput:
        if seqs[0].params.choices is not None:
            return _choice_output(record, seqs)
        completions = tuple(
            Completion(
                k,
                self.engine.stop_checker.text(s),
                tuple(s.output_ids),
                s.finish_reason,
                self._logprobs(s),
            )  # fmt: skip
            for k, s in enumerate(seqs)
        )
        return RequestOutput(
            record.id, completions, prompt_tokens=seqs[0].num_prompt_tokens,
            cached_tokens=seqs[0].num_prefix_hit_tokens,
        )  # fmt: skip

    def _logprobs(self, seq: Sequence) -> tuple[TokenLogprob, ...] | None:
        """The sequence's token logprobs with the tokens' texts (None when not asked for)."""
        if seq.params.logprobs is None:
            return None
        text = self._token_text
        return tuple(
            TokenLogprob(text(t), t, lp, tuple((text(i), i, v) for i, v in top))
            for t, (lp, top) in zip(seq.output_ids, seq.logprobs, strict=True)
        )

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


def _choice_output(record: Record, seqs: list[Sequence]) -> RequestOutput:
    """The scored choices of a record: each choice's summed log-probability, and the
    softmax over the choices of their scores (sums, or per-token means)."""
    params = seqs[0].params
    assert params.choices is not None
    scored = [s for s in seqs if s.choice_ids is not None]
    sums = [math.fsum(s.choice_logprobs) for s in scored]  # every entry set by now
    ranks = sums if params.choice_score == "sum" else [
        total / len(s.choice_ids) for total, s in zip(sums, scored)
    ]  # fmt: skip
    top = max(ranks)
    weights = [math.exp(r - top) for r in ranks]
    probs = [w / math.fsum(weights) for w in weights]
    choices = tuple(
        ChoiceScore(text, total, prob, len(s.choice_ids))
        for text, total, prob, s in zip(params.choices, sums, probs, scored, strict=True)
    )
    first = seqs[0]
    return RequestOutput(
        record.id, choices=choices, prompt_tokens=first.num_prompt_tokens,
        cached_tokens=first.num_prefix_hit_tokens,
    )  # fmt: skip


class _Group:
    """The sequences of one record (one per sample) and how many are still running."""

    def __init__(self, index: int, seqs: list[Sequence]) -> None:
        self.index = index
        self.seqs = seqs
        self.pending = len(seqs)


def to_record(item: Input, index: int) -> Record:
    """A Record from a prompt string, a JSONL-style dict, token ids, or a Record."""
    if isinstance(item, Record):
        return item
    if isinstance(item, str):
        return Record(id=index, prompt=item)
    if isinstance(item, Mapping):
        return parse_record(item, default_id=index)
    if isinstance(item, (list, tuple)) and all(isinstance(t, int) for t in item):
        return Record(id=index, prompt_token_ids=tuple(item))
    raise TypeError(f"input {index}: expected a string, a dict, token ids or a Record")


def _error(record: Record, code: str, message: str, prompt_tokens: int = 0) -> RequestOutput:
    return RequestOutput(record.id, prompt_tokens=prompt_tokens, error=RecordError(code, message))
