"""The synchronous step loop: schedule -> run -> sample and score -> postprocess."""

from __future__ import annotations

import itertools
import time
from array import array
from collections.abc import Callable

import torch

from pagedbatch.engine.attention import PagedAttention
from pagedbatch.engine.batch import Batch
from pagedbatch.engine.block_manager import BlockManager
from pagedbatch.engine.block_pool import BlockPool, blocks_for
from pagedbatch.engine.constraints import ConstraintMatcher, Grammars
from pagedbatch.engine.kv_cache import KVCache
from pagedbatch.engine.logits_processor import LogitsProcessor
from pagedbatch.engine.memory import KVSnapshot
from pagedbatch.engine.model_runner import ModelRunner
from pagedbatch.engine.radix_cache import RadixCache
from pagedbatch.engine.scheduler import Scheduler, SchedulerOutput
from pagedbatch.engine.scoring import choice_family, record_scores
from pagedbatch.engine.sequence import Sequence, random_seed
from pagedbatch.engine.stats import EngineStats, StatsCounter, StepTrace
from pagedbatch.engine.step_sampler import Sampled, StepSampler
from pagedbatch.engine.stopping import StopChecker
from pagedbatch.engine.token_masks import TokenMasks
from pagedbatch.sampling_params import SamplingParams


class Engine:
    """Runs sequences to completion on one model and one paged KV cache."""

    def __init__(
        self,
        model,
        kv_cache: KVCache,
        stop_checker: StopChecker,
        max_batch_tokens: int,
        max_num_seqs: int,
        max_model_len: int,
        attention_backend: str = "torch",
        prefix_sharing: bool = True,
        keep_timeline: bool = False,
        cascade: bool = True,
        grammars: Grammars | None = None,
        make_runner: Callable[..., ModelRunner] = ModelRunner,
    ) -> None:
        block_size = kv_cache.spec.block_size
        self.pool = BlockPool(kv_cache.num_blocks)
        self.prefix_cache = RadixCache(self.pool, block_size) if prefix_sharing else None
        self.block_manager = BlockManager(
            self.pool, block_size, self.prefix_cache, max_num_seqs=max_num_seqs,
            max_blocks_per_seq=blocks_for(max_model_len, block_size),
        )  # fmt: skip
        self.scheduler = Scheduler(self.block_manager, max_batch_tokens, max_num_seqs)
        self.attention = PagedAttention(kv_cache, attention_backend, max_model_len)
        # make_runner: ModelRunner, or tensor parallelism's (engine/tensor_parallel.py)
        self.runner = make_runner(model, self.attention, self.block_manager, cascade=cascade)
        self.grammars = grammars  # structured output: each constrained sequence's matcher
        self.masks = TokenMasks(self.runner.device)
        self.stop_checker = stop_checker
        self.sampler = StepSampler(max_num_seqs, self.runner.uploads)
        self.logits_processor = LogitsProcessor(stop_checker.eos_token_ids, stop_checker.think)
        self._parents: set[Sequence] = set()  # queued or running, forks not started yet
        self.counter = StatsCounter(keep_timeline)
        self.last_step: StepTrace | None = None
        # What StepTrace's seconds are read from: wall time; time.thread_time gives the
        # host's CPU time instead, which a busy machine disturbs less (bench --host-overhead).
        self.clock = time.perf_counter
        self.max_num_seqs, self.max_model_len = max_num_seqs, max_model_len
        self._seq_ids = itertools.count()

    def capture_cuda_graphs(self) -> None:
        """From now on, run decode-only steps from CUDA graphs (engine/cuda_graphs.py)."""
        self.runner.capture_cuda_graphs(self.max_num_seqs, self.max_model_len)

    def add_samples(
        self, prompt: array[int], params: SamplingParams, seeds: list[int | None],
        request_id: str | int | None = None,
    ) -> list[Sequence]:  # fmt: skip
        """Queue a request's samples, one sequence per seed (None: a random one), each
        constrained one with a matcher of its own; return them. With prefix
        sharing the prompt is computed once: the others fork from the first when its
        prompt is done."""
        max_len = min(self.max_model_len, len(prompt) + params.max_output_tokens)
        think = self.stop_checker.think
        # A constrained output is not split: its grammar covers all of it.
        thinks = think is not None and params.constraint is None
        think_start = think.thinking_start(prompt) if thinks else None
        seqs = [
            Sequence(
                next(self._seq_ids),
                array("i", prompt),
                len(prompt),
                params,
                max_len,
                seed=random_seed() if seed is None else seed,
                request_id=request_id,
                think_start=think_start,
                matcher=self._matcher(params),
            )  # fmt: skip
            for seed in seeds
        ]
        if self.prefix_cache is not None:
            seqs[0].forks = seqs[1:]
        self._queue(seqs)
        return seqs

    def _matcher(self, params: SamplingParams) -> ConstraintMatcher | None:
        """A matcher of its own for a constrained sequence, at its grammar's start."""
        if params.constraint is None:
            return None
        if self.grammars is None:
            raise ValueError("a constrained request needs an engine built with grammars")
        self.masks.active = True  # until the engine runs dry
        return self.grammars.matcher(params.constraint)

    def add_choices(
        self, prompt: array[int], choices: list[list[int]], params: SamplingParams,
        request_id: str | int | None = None,
    ) -> list[Sequence]:  # fmt: skip
        """Queue a request that scores each of `choices` (token ids) after `prompt`; return
        its sequences (engine/scoring.py: with prefix sharing, the prompt's parent first)."""
        share = self.prefix_cache is not None
        seqs = choice_family(self._seq_ids, prompt, choices, params, request_id, share)
        self._queue(seqs)
        return seqs

    def _queue(self, family: list[Sequence]) -> None:
        """Queue a request's sequences: the first alone when the others are its forks."""
        parent = family[0]
        if parent.forks and not parent.is_scoring:
            self._parents.add(parent)
        for seq in family[:1] if parent.forks else family:
            self.scheduler.add(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def num_waiting(self) -> int:
        """Sequences queued and not running yet."""
        return len(self.scheduler.waiting)

    def step(self) -> list[Sequence]:
        """Run one step (schedule -> run -> sample and score -> postprocess); return the
        sequences that finished in it."""
        started = self.clock()
        out = self.scheduler.schedule()
        if not out.seqs:  # nothing fits now (a sequence that needs the whole pool)
            return []
        batch = self.runner.prepare(out)
        self._join(out.admitted)
        forward_start = self.clock()
        logits = self.runner.forward(batch)
        sample_start = self.clock()
        trace = _trace(batch)
        sampled = self._sample(out, batch, logits)
        sample_end = self.clock()
        finished = self._postprocess(out, batch, sampled)
        self._timed(trace, started, forward_start, sample_start, sample_end)
        return finished

    def _join(self, seqs: list[Sequence]) -> None:
        """`seqs` joined the running set: their sampling params go in their rows."""
        row = self.block_manager.tables.row
        self.sampler.join(seqs, [row(seq.seq_id) for seq in seqs])

    def _sample(self, out: SchedulerOutput, batch: Batch, logits: torch.Tensor) -> Sampled:
        """Sample and score (engine/step_sampler.py): the step's one device-to-host copy."""
        return self.sampler.sample(
            out.sampling, self._parents, batch, logits, self.masks, self.logits_processor
        )

    def _postprocess(self, out: SchedulerOutput, batch: Batch, sampled: Sampled) -> list[Sequence]:
        """Commit the step (the forks of the sampled sequences and of the choices' parents
        start), append the sampled tokens and logprobs, record the scores; return the
        sequences that stopped and those that scoring ended."""
        rows, scoring = sampled.rows, batch.scores
        forks = [child for parent in rows.parents for child in parent.forks]
        choosing = scoring.parents if scoring is not None else []
        self.scheduler.commit(out, rows.parents + choosing)
        self._parents.difference_update(rows.parents)
        self._join(forks)
        self.counter.step(out.num_tokens, len(rows.seqs), self.block_manager.usage, self._snapshot)
        for i, entry in self.sampler.logprobs(sampled):
            rows.seqs[i].logprobs.append(entry)
        if scoring is not None:
            record_scores(scoring, sampled.scores.tolist())
        tokens = sampled.tokens.tolist()
        self.masks.accept(rows.seqs, tokens)
        may_stop = self.sampler.may_stop(sampled, tokens, batch, self.stop_checker)
        finished = self.scheduler.postprocess(rows.seqs, tokens, self.stop_checker, may_stop)
        for seq in scoring.ended if scoring is not None else []:
            seq.finish_reason = "stop"
            self.scheduler.finish(seq)
            finished.append(seq)
        for seq in finished:
            self.counter.finished(seq)
        return finished

    def _timed(
        self, trace: StepTrace, started: float, forward_start: float, sample_start: float,
        sample_end: float,
    ) -> None:  # fmt: skip
        """Count the step's time (`last_step`: its trace, with seconds)."""
        self.last_step = trace._replace(
            seconds=self.clock() - started,
            forward_seconds=sample_start - forward_start,
            sample_seconds=sample_end - sample_start,
        )
        self.counter.timed(self.last_step)
        if self.masks.active and not self.scheduler.has_unfinished():
            self.masks.active = False  # until a constrained sequence is queued again

    def check_integrity(self) -> None:
        """Assert the block pool's and the prefix cache's invariants (tests, debugging)."""
        self.pool.check_integrity()
        if self.prefix_cache is not None:
            self.prefix_cache.check_integrity()

    def abort_all(self) -> list[Sequence]:
        """Drop every unfinished sequence, freeing its blocks (an interrupted job)."""
        self._parents.clear()
        self.masks.active = False
        return self.scheduler.abort_all()

    def _snapshot(self) -> KVSnapshot:
        """The KV blocks of now, as the step being counted (`counter.steps`) left them."""
        return self.block_manager.usage.snapshot(
            self.counter.steps, self.scheduler.running.figures, self.pool.num_used,
            self.pool.num_free,
        )  # fmt: skip

    def stats(self) -> EngineStats:
        c, cache, usage = self.counter, self.prefix_cache, self.block_manager.usage
        return EngineStats(
            steps=c.steps,
            prompt_tokens=c.prompt_tokens,
            prefix_hit_tokens=c.prefix_hit_tokens,
            computed_tokens=c.computed_tokens,
            generated_tokens=c.generated_tokens,
            finished_seqs=c.finished_seqs,
            running_seqs=len(self.scheduler.running),
            waiting_seqs=len(self.scheduler.waiting),
            preemptions=self.scheduler.num_preemptions,
            recomputed_tokens=self.scheduler.num_recomputed_tokens,
            num_blocks=self.pool.num_blocks,
            blocks_in_use=usage.in_use,
            cached_blocks=self.pool.num_used - usage.in_use,
            free_blocks=self.pool.num_free,
            peak_blocks_in_use=c.peak.in_use if c.peak else 0,
            peak_logical_blocks=c.peak.logical if c.peak else 0,
            evicted_blocks=cache.num_evicted_blocks if cache else 0,
            graph_steps=self.runner.graphs.replays if self.runner.graphs else 0,
            cascade_saved_token_reads=self.attention.cascade_saved_token_reads,
            prefill_step_seconds=c.prefill_step_seconds,
            prefill_step_tokens=c.prefill_step_tokens,
            decode_step_seconds=c.decode_step_seconds,
            decode_step_tokens=c.decode_step_tokens,
            decode_steps=c.decode_steps,
            mask_seconds=self.masks.seconds,
            masked_steps=self.masks.steps,
        )


def _trace(batch: Batch) -> StepTrace:
    """The shape of a step; seconds filled in after."""
    context = sum(batch.context_lens_host)
    return StepTrace(0.0, 0.0, 0.0, batch.num_seqs, batch.num_tokens, context, batch.decode_only)
