"""The library entry point: `LLM(...).generate(records or prompts, params, on_output=...)`."""

from __future__ import annotations

import json
import math
import weakref
from array import array
from collections.abc import Callable, Iterable
from collections.abc import Sequence as Seq
from functools import partial
from typing import Any

import torch

from pagedbatch.engine import kv_scales
from pagedbatch.engine.attention import ATTN_IMPLEMENTATION, kv_dtype_problem
from pagedbatch.engine.config import EngineConfig
from pagedbatch.engine.constraints import Grammars
from pagedbatch.engine.engine import Engine
from pagedbatch.engine.job_pool import PoolFit, job_num_blocks
from pagedbatch.engine.kv_cache import (
    KVCache,
    KVCacheSpec,
    address_space_left,
    free_memory,
    num_blocks_for,
)
from pagedbatch.engine.memory import memory_report
from pagedbatch.engine.model_runner import ModelRunner
from pagedbatch.engine.reasoning import think_tokens
from pagedbatch.engine.scoring import choice_logprobs
from pagedbatch.engine.sequence import Sequence
from pagedbatch.engine.stats import EngineStats
from pagedbatch.engine.stopping import StopChecker
from pagedbatch.engine.tensor_parallel import TensorParallel, start_tensor_parallel
from pagedbatch.engine.tp_shards import local_weight_bytes
from pagedbatch.generator import OnOutput, OnPrepared, OnStep, ShouldStop
from pagedbatch.models.loader import (
    eos_token_ids,
    load_model,
    model_config,
    model_directory,
    model_quantization,
)
from pagedbatch.models.quantization import checkpoint_kv_scales
from pagedbatch.models.weights import config_model_bytes, model_bytes
from pagedbatch.outputs import (
    ChoiceScore,
    Completion,
    ParsedJson,
    RequestOutput,
    TokenLogprob,
)
from pagedbatch.requests.ahead import ahead
from pagedbatch.requests.preparer import Limits, Preparer
from pagedbatch.requests.prompt_store import PromptStore, shared_blocks
from pagedbatch.requests.prompts import PromptBuilder
from pagedbatch.requests.records import Input, record_batches, to_record
from pagedbatch.sampling_params import SamplingParams

_Emit = Callable[[int, RequestOutput], None]  # (input number, its output)
_PREPARE_BATCH = 512  # records tokenized at a time
# Sequences kept waiting in the engine: enough to fill every step, few enough that a job's
# memory is this window, not its records.
_ADMIT_PER_SEQ = 2
_ADMIT_MIN = 64
# Address space a CPU job maps beside its weights and KV pool: the tokenizer and its
# threads, the threads' malloc arenas (64 MiB each), a step's activations.
_LOAD_RESERVE = 128 * 2**20


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
        kv_dtype = self.config.torch_kv_dtype
        problem = kv_dtype_problem(self.config.attention_backend, kv_dtype, dtype, self.device)
        if problem is not None:
            raise ValueError(problem)
        free = free_memory(self.device)  # before the weights: see num_blocks_for
        # How the weights are quantized (None: full precision); refused here, one line,
        # before any weight loads, when that cannot run on this device.
        self.quantization = model_quantization(
            self.config.model, self.config.quantize, self.device, dtype, self.config.cache_dir
        )
        if self.device.type == "cpu":
            _check_address_space(self.config.model, self.config.cache_dir, dtype, self.quantization)
        # Ranks 1..N-1 (engine/tensor_parallel.py), started before this rank loads its shard.
        self.tensor_parallel = start_tensor_parallel(self.config)
        tp = self.tensor_parallel
        try:
            self._load(tp, free, dtype)
        except BaseException:
            if tp is not None:
                tp.close()
            raise
        if tp is not None:  # an LLM dropped without close() stops its workers too
            weakref.finalize(self, tp.close)
        self.think = think_tokens(self.tokenizer, self.config.reasoning_parser)
        eos = eos_token_ids(self.model, self.tokenizer)
        stop = StopChecker(self.tokenizer, eos, self.think)
        # Structured output: the logits' width is the model's vocabulary, not the tokenizer's.
        self.grammars = Grammars(self.tokenizer, self.model.config.vocab_size, eos)
        self.engine = self._make_engine(stop)
        if self.kv_cache.quantized:
            self._set_kv_scales()
        self.cuda_graphs_problem: str | None = None  # why auto CUDA graphs fell back to eager
        if self.config.use_cuda_graphs:
            self._capture_cuda_graphs()
        self.prompts = PromptBuilder(
            self.tokenizer, self.config.chat, self.config.chat_template_kwargs
        )
        # A record must fit the default pool (what the memory allows), also when
        # generate(fit_pool=True) sizes a smaller one (which then holds every record).
        limits = Limits(
            self.model.get_input_embeddings().num_embeddings, self.max_model_len,
            self.kv_cache.spec.block_size, self.kv_cache.num_blocks,
        )  # fmt: skip
        self.preparer = Preparer(self.prompts, limits, self.grammars, thinks=self.think is not None)

    def _make_engine(self, stop: StopChecker) -> Engine:
        tp = self.tensor_parallel
        return Engine(
            self.model, self.kv_cache, stop, self.config.max_batch_tokens,
            self.config.max_num_seqs, self.max_model_len, self.config.attention_backend,
            prefix_sharing=self.config.prefix_sharing, keep_timeline=self.config.memory_report,
            cascade=self.config.cascade, grammars=self.grammars,
            make_runner=tp.runner if tp is not None else ModelRunner,
        )  # fmt: skip

    def _load(self, tp: TensorParallel | None, free: int, dtype: torch.dtype) -> None:
        """Load the model (this rank's shard) and allocate the KV cache (its KV heads)."""
        if tp is not None:  # full precision (EngineConfig refuses quantize with it)
            load = tp.load_model
        else:
            load = partial(load_model, self.config.model, quantize=self.config.quantize)
        self.model, self.tokenizer = load(
            device=self.device, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION,
            cache_dir=self.config.cache_dir,
        )  # fmt: skip
        context = self.model.config.max_position_embeddings
        self.max_model_len = min(self.config.max_model_len or context, context)
        kv_dtype = self.config.torch_kv_dtype
        spec = KVCacheSpec.from_model_config(self.model.config, self.config.block_size, kv_dtype)
        if tp is not None:
            spec, num_blocks = tp.size_pool(spec, self.model, free)
        else:
            num_blocks = num_blocks_for(
                spec, self.device, self.config.num_blocks, self.config.kv_memory,
                weight_bytes=model_bytes(self.model), free=free,
            )  # fmt: skip
        _check_fits(num_blocks * spec.bytes_per_block, free, self.device)
        self.kv_cache = KVCache(spec, num_blocks, self.device)
        if tp is not None:
            tp.start_engines(spec, num_blocks, self.max_model_len)

    def _set_kv_scales(self) -> None:
        """An fp8 cache's scales: the checkpoint's, else measured on a fixed text (see
        engine/kv_scales.py)."""
        spec = self.kv_cache.spec
        directory = model_directory(self.config.model, self.config.cache_dir)
        found = None
        if directory is not None:
            found = checkpoint_kv_scales(directory, spec.num_layers, spec.num_kv_heads)
        if found is not None:
            k_scale, v_scale = (t.to(self.device) for t in found)
            self.kv_cache.set_scales(k_scale, v_scale, kv_scales.CHECKPOINT)
            return
        builder = PromptBuilder(self.tokenizer)
        messages = [{"role": "user", "content": kv_scales.MEASURE_TEXT}]
        try:
            ids = builder.token_ids(to_record({"messages": messages}, 0))
        except ValueError:  # no chat template (PromptError)
            ids = builder.token_ids(to_record(kv_scales.MEASURE_TEXT, 0))
        backend = self.engine.attention.backend
        kv_scales.measure_kv_scales(self.model, self.kv_cache, backend, ids)

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
        self, inputs: Iterable[Input], params: SamplingParams | None = None, *,
        on_output: OnOutput | None = None, on_step: OnStep | None = None,
        should_stop: ShouldStop | None = None, on_prepared: OnPrepared | None = None,
        keep_outputs: bool = True, fit_pool: bool = False,
    ) -> list[RequestOutput]:  # fmt: skip
        """Generate for every input; return outputs in input order.

        `on_output` is called as each record finishes (errors first, before any step);
        `on_step` after every engine step with the engine's statistics; `on_prepared(done,
        total, output_tokens)` as records are tokenized, before the first step, with the
        most output tokens a record that passed may generate, on average so far (max_tokens
        x n; 0 when choices are scored).
        `should_stop` is asked before each batch of records is prepared and after each
        step; once it returns True, no record is admitted any more, the sequences still
        running or waiting are dropped (their blocks freed, the LLM stays usable) and
        `generate` returns the outputs of the records that finished, in input order. With
        `keep_outputs=False` an output is not held once `on_output` has it (a job that
        streams its outputs to a file), and `generate` returns an empty list.
        With `fit_pool=True` and the CPU default pool (`EngineConfig.pool_from_job`: neither
        num_blocks nor kv_memory), the KV pool is sized from these inputs once they are
        tokenized, before the first step: what they could hold at once, at most the
        default (engine/job_pool.py); the same outputs in less memory. The engine starts
        anew (its statistics and prefix cache), so a job asks for it on its one call.

        `inputs` that are a sequence (a list, a job's `RecordView`) are read twice, and
        not held: once in order to tokenize them (token ids kept compactly: prompt_store.py),
        then each again when it is admitted, in depth-first order of the prompts with prefix
        sharing, a window of records at a time (so memory holds the window, not the job).
        """
        params = params or SamplingParams()
        items = inputs if isinstance(inputs, Seq) and not isinstance(inputs, str) else list(inputs)
        results: dict[int, RequestOutput] = {}
        stop = should_stop or (lambda: False)

        def emit(index: int, output: RequestOutput) -> None:
            if keep_outputs:
                results[index] = output
            if on_output is not None:
                on_output(output)

        prepared = self._tokenize(items, params, emit, stop, on_prepared)
        if prepared is not None:
            store, numbers, blocks = prepared
            order = store.order() if self.config.prefix_sharing else range(len(store))
            if fit_pool and self.config.pool_from_job:
                self._fit_pool(store, order, blocks)
            self._run(items, store, numbers, order, params, emit, on_step, stop)
        return [results[i] for i in sorted(results)]

    def _fit_pool(self, store: PromptStore, order: Seq[int], held: int) -> None:
        """Size the pool for prompts that hold `held` blocks (`Preparer.check`), in `order`:
        engine/job_pool.py; `Limits.num_blocks` stays the default pool's."""
        spec, default = self.kv_cache.spec, self.preparer.limits.num_blocks
        shared = 0
        if self.config.prefix_sharing and len(store):
            lcps = store.common_prefixes(order)
            shared = int(shared_blocks(store.lengths(), order, lcps, spec.block_size).sum())
        fit = PoolFit(self.config.max_batch_tokens, self.config.max_num_seqs)
        num_blocks = job_num_blocks(default, held, shared, fit, spec.block_size)
        if num_blocks == self.kv_cache.num_blocks:
            return
        old = self.kv_cache
        self.kv_cache = KVCache(spec, num_blocks, self.device)
        if old.k_scale is not None and old.v_scale is not None and old.scales_source:
            self.kv_cache.set_scales(old.k_scale, old.v_scale, old.scales_source)
        self.engine = self._make_engine(self.engine.stop_checker)

    def _tokenize(
        self, items: Seq[Input], params: SamplingParams, emit: _Emit, stop: ShouldStop,
        on_prepared: OnPrepared | None,
    ) -> tuple[PromptStore, array[int], int] | None:  # fmt: skip
        """Check and tokenize every input, a batch at a time (in a worker thread, while the
        next batch is read: requests/ahead.py; only that thread touches the tokenizer and the
        Preparer meanwhile); emit the errors. Returns the prompts, the input number of
        each and the KV blocks they may hold (`Checked.blocks`), or None when stopped."""
        store = PromptStore(self.preparer.limits.vocab_size)
        numbers = array("q")  # numbers[k]: the input whose prompt store[k] is
        batches = record_batches(items, _PREPARE_BATCH)
        budget = blocks = 0  # the most output tokens, KV blocks of the records that passed
        for (start, _), (checked, most, held) in ahead(
            batches, lambda b: self.preparer.check(b[1], params)
        ):
            if stop():
                return None
            for j, ids in enumerate(checked):
                if isinstance(ids, RequestOutput):
                    emit(start + j, ids)
                else:
                    store.append(ids)
                    numbers.append(start + j)
            budget += most
            blocks += held
            if on_prepared is not None:
                on_prepared(start + len(checked), len(items), budget / max(len(store), 1))
        return store, numbers, blocks

    def _run(
        self, items: Seq[Input], store: PromptStore, numbers: array[int], order: Seq[int],
        defaults: SamplingParams, emit: _Emit, on_step: OnStep | None, stop: ShouldStop,
    ) -> None:  # fmt: skip
        """Admit the prompts in `order` a window at a time and step until all are done (or
        `stop`).

        With prefix sharing, `order` is the depth-first order of the prompts (sorted token
        ids), so records sharing a prefix run together while they are cached.
        """
        pending = iter(order)
        window = max(_ADMIT_MIN, _ADMIT_PER_SEQ * self.config.max_num_seqs)
        owner: dict[int, _Group] = {}
        while True:
            if stop():
                self.engine.abort_all()
                return
            while self.engine.num_waiting() < window and (k := next(pending, None)) is not None:
                self._admit(items, int(k), store, numbers, defaults, owner)
            if not self.engine.has_unfinished():
                return
            for seq in self.engine.step():
                group = owner.pop(seq.seq_id)
                group.pending -= 1
                if group.pending == 0:
                    emit(group.index, self._output(group.rid, group.seqs))
            if on_step is not None:
                on_step(self.engine.stats())

    def _admit(
        self, items: Seq[Input], k: int, store: PromptStore, numbers: array[int],
        defaults: SamplingParams, owner: dict[int, _Group],
    ) -> None:  # fmt: skip
        """Queue prompt k's record: read it again; the engine builds its sequences."""
        index = numbers[k]
        record = to_record(items[index], index)
        params, ids = self.preparer.params(record, defaults), store.tokens(k)
        if params.choices is not None:
            choices = self.preparer.choice_tokens(params)
            seqs = self.engine.add_choices(ids, choices, params, record.id)
        else:
            seeds = self.preparer.seeds(record, params)
            seqs = self.engine.add_samples(ids, params, seeds, record.id)
        group = _Group(index, record.id, seqs)
        for seq in seqs:
            owner[seq.seq_id] = group

    def memory_report(self) -> dict:
        """The KV memory figures of everything generated so far (plain, JSON-ready data).

        The per-step timeline is there only with `memory_report=True`.
        """
        stats, spec, counter = self.engine.stats(), self.kv_cache.spec, self.engine.counter
        ranks = self.config.tensor_parallel  # the figures are all ranks' together
        report = memory_report(
            counter.peak, counter.kv_waste_mean, counter.timeline,
            dtype=self.dtype,
            block_size=spec.block_size, num_blocks=self.kv_cache.num_blocks,
            kv_bytes_per_token=spec.bytes_per_token * ranks,
            model_bytes=model_bytes(self.model),
            weights=self.quantization.description if self.quantization else "full precision",
            kv_dtype=str(spec.dtype).removeprefix("torch."),
            kv_scales=self.kv_cache.scales_source,
            prefix_hit_rate=stats.prefix_hit_rate, preemptions=stats.preemptions,
            recomputed_tokens=stats.recomputed_tokens, evictions=stats.evicted_blocks,
            cascade_saved_token_reads=stats.cascade_saved_token_reads,
        )  # fmt: skip
        if self.grammars.num_compiled:  # host memory, beside the KV figures
            report["compiled_grammar_bytes"] = self.grammars.memory_bytes
        if self.tensor_parallel is not None:  # what each rank holds (rank 0's shard)
            report["tensor_parallel"] = {
                "ranks": ranks,
                "rank_weight_bytes": local_weight_bytes(self.model),
                "rank_kv_pool_bytes": self.kv_cache.nbytes,
            }
        return report

    def stats(self) -> EngineStats:
        return self.engine.stats()

    @property
    def dtype(self) -> str:
        """The dtype the model runs in: "float32", "bfloat16" or "float16"."""
        return str(self.model.dtype).removeprefix("torch.")

    def close(self) -> None:
        """Stop the tensor-parallel workers (a no-op with one rank); the LLM is done."""
        if self.tensor_parallel is not None:
            self.tensor_parallel.close()

    def _output(self, rid: Any, seqs: list[Sequence]) -> RequestOutput:
        if seqs[0].params.choices is not None:
            return _choice_output(rid, seqs)
        completions = tuple(self._completion(k, s) for k, s in enumerate(seqs))
        return RequestOutput(
            rid, completions, prompt_tokens=seqs[0].num_prompt_tokens,
            cached_tokens=seqs[0].num_prefix_hit_tokens,
        )  # fmt: skip

    def _completion(self, index: int, seq: Sequence) -> Completion:
        stop = self.engine.stop_checker
        text = stop.text(seq)
        complete, value = None, None
        if seq.matcher is not None:  # constrained: whole unless a limit or stop string cut it
            complete = seq.matcher.complete and seq.stop_text_end is None
            if complete and seq.params.constraint is not None and seq.params.constraint.is_json:
                value = _parse_json(text)
        return Completion(
            index, text, tuple(seq.output_ids), seq.finish_reason, self._logprobs(seq),
            complete=complete, json=value, reasoning=stop.reasoning(seq),
            reasoning_tokens=stop.reasoning_tokens(seq),
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


def _parse_json(text: str) -> ParsedJson | None:
    """The value of a JSON text its grammar completed (None if it does not parse after all:
    bytes of a character cut in two, left out of the text)."""
    try:
        return ParsedJson(json.loads(text))
    except ValueError:
        return None


def _choice_output(rid: Any, seqs: list[Sequence]) -> RequestOutput:
    """The scored choices of a record: each choice's summed log-probability, and the
    softmax over the choices of their scores (sums, or per-token means)."""
    params = seqs[0].params
    assert params.choices is not None
    scored = choice_logprobs(seqs)  # (sum, tokens) of each choice
    ranks = [total if params.choice_score == "sum" else total / n for total, n in scored]
    top = max(ranks)
    weights = [math.exp(r - top) for r in ranks]
    probs = [w / math.fsum(weights) for w in weights]
    choices = tuple(
        ChoiceScore(text, total, prob, n)
        for text, (total, n), prob in zip(params.choices, scored, probs, strict=True)
    )
    first = seqs[0]
    return RequestOutput(
        rid, choices=choices, prompt_tokens=first.num_prompt_tokens,
        cached_tokens=first.num_prefix_hit_tokens,
    )  # fmt: skip


class _Group:
    """The sequences of one record (one per sample) and how many are still running."""

    def __init__(self, index: int, rid: Any, seqs: list[Sequence]) -> None:
        self.index = index
        self.rid = rid
        self.seqs = seqs
        self.pending = len(seqs)


def _check_address_space(name: str, cache_dir: Any, dtype: torch.dtype, quantization: Any) -> None:
    """Refuse, before anything loads, a model that does not fit the process's address-space
    limit (`ulimit -v`): past it the tokenizer's Rust code aborts the process, no line said."""
    left = address_space_left()
    if left is None:
        return
    weights = config_model_bytes(model_config(name, cache_dir), dtype, quantization)
    need = weights + _LOAD_RESERVE
    if left < need:
        raise ValueError(
            f"the address-space limit (ulimit -v) leaves this process {left / 2**20:,.0f} MiB, "
            f"and {name} needs about {need / 2**20:,.0f} MiB ({weights / 2**20:,.0f} MiB of "
            f"weights, {_LOAD_RESERVE // 2**20} MiB for the tokenizer and threads); raise "
            "ulimit -v (or unset it)"
        )


def _check_fits(kv_bytes: int, free: int, device: torch.device) -> None:
    """Refuse a KV cache larger than the memory free on `device` before the weights loaded:
    an allocation that the kernel grants lazily would fail later, mid-job (OOM killer)."""
    if kv_bytes > free:
        raise ValueError(
            f"the KV cache would take {kv_bytes / 2**30:,.1f} GiB but {device} has "
            f"{free / 2**30:,.1f} GiB free; lower --num-blocks or --kv-memory"
        )
