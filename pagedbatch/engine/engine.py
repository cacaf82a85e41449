"""The synchronous step loop: schedule -> run -> sample -> postprocess."""

from __future__ import annotations

import time

import torch

from pagedbatch.engine.attention import PagedAttention
from pagedbatch.engine.batch import Batch
from pagedbatch.engine.block_manager import BlockManager
from pagedbatch.engine.block_pool import BlockPool, blocks_for
from pagedbatch.engine.kv_cache import KVCache
from pagedbatch.engine.memory import KVSnapshot
from pagedbatch.engine.model_runner import ModelRunner
from pagedbatch.engine.radix_cache import RadixCache
from pagedbatch.engine.sampler import sample_tokens, token_logprobs
from pagedbatch.engine.scheduler import Scheduler, SchedulerOutput
from pagedbatch.engine.sequence import Sequence
from pagedbatch.engine.stats import EngineStats, StatsCounter, StepTrace
from pagedbatch.engine.stopping import StopChecker
from pagedbatch.engine.token_masks import TokenMasks


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
        self.runner = ModelRunner(model, self.attention, self.block_manager, cascade=cascade)
        self.masks = TokenMasks(self.runner.device)
        self.stop_checker = stop_checker
        self.counter = StatsCounter(keep_timeline)
        self.last_step: StepTrace | None = None
        # What StepTrace's seconds are read from: wall time; time.thread_time gives the
        # host's CPU time instead, which a busy machine disturbs less (bench --host-overhead).
        self.clock = time.perf_counter
        self.max_num_seqs, self.max_model_len = max_num_seqs, max_model_len

    def capture_cuda_graphs(self) -> None:
        """From now on, run decode-only steps from CUDA graphs (engine/cuda_graphs.py)."""
        self.runner.capture_cuda_graphs(self.max_num_seqs, self.max_model_len)

    def add(self, seq: Sequence) -> None:
        """Queue a sequence (its `forks` join when its prompt is done)."""
        if seq.scores_only or seq.choice_ids is not None:
            self.runner.scoring = True  # until the engine runs dry: see step()
        if seq.matcher is not None:
            self.masks.active = True  # until the engine runs dry
        self.scheduler.add(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def num_waiting(self) -> int:
        """Sequences queued and not running yet."""
        return len(self.scheduler.waiting)

    def step(self) -> list[Sequence]:
        """Run one step; return the sequences that finished in it."""
        started = self.clock()
        out = self.scheduler.schedule()
        if not out.scheduled:  # nothing fits now (a sequence that needs the whole pool)
            return []
        batch = self.runner.prepare(out)
        forward_start = self.clock()
        logits = self.runner.forward(batch)
        sample_start = self.clock()
        sampling = [s.seq for s in out.scheduled if s.samples]
        trace = _trace(out, len(sampling))
        parents: list[Sequence] = []
        scored: list[Sequence] = []
        if self.runner.scoring:  # a job without choices never scans for them
            logits, sampling, parents, scored = _score_choices(batch, logits, sampling)
        seqs, rows = _with_forks(sampling)
        mask = self.masks.fill(seqs)  # on the host, while an asynchronous forward runs
        rows_logits = logits if len(rows) == len(sampling) else logits[rows]
        sampled = sample_tokens(rows_logits, seqs, mask)
        tokens = sampled.tolist()
        self.masks.accept(seqs, tokens)
        for seq, entry in zip(seqs, token_logprobs(rows_logits, sampled, seqs)):
            if entry is not None:
                seq.logprobs.append(entry)
        sample_end = self.clock()
        forked = [child for parent in parents for child in parent.forks]
        self.scheduler.commit(out, seqs + parents)  # forks the parents' choices
        self.counter.step(out.num_tokens, len(tokens), self.block_manager.usage, self._snapshot)
        finished = self.scheduler.postprocess(seqs, tokens, self.stop_checker)
        if parents or scored:
            finished += self._finish_scored(parents, scored, forked)
        for seq in finished:
            self.counter.finished(seq)
        self.last_step = trace._replace(
            seconds=self.clock() - started,
            forward_seconds=sample_start - forward_start,
            sample_seconds=sample_end - sample_start,
        )
        self.counter.timed(self.last_step)
        if self.runner.scoring and not self.scheduler.has_unfinished():
            self.runner.scoring = False
        if self.masks.active and not self.scheduler.has_unfinished():
            self.masks.active = False
        return finished

    def _finish_scored(
        self, parents: list[Sequence], scored: list[Sequence], forked: list[Sequence]
    ) -> list[Sequence]:
        """End the choices' prompt parents (their choices, `forked` from them, run on) and
        the choices whose tokens are all computed (scored); a one-token choice is scored
        by its parent's logits alone, so it ends at its fork."""
        done = [*scored, *parents, *(c for c in forked if c.num_uncomputed_tokens == 0)]
        for seq in done:
            seq.finish_reason = "stop"
            self.scheduler.finish(seq)
        return done

    def check_integrity(self) -> None:
        """Assert the block pool's and the prefix cache's invariants (tests, debugging)."""
        self.pool.check_integrity()
        if self.prefix_cache is not None:
            self.prefix_cache.check_integrity()

    def abort_all(self) -> list[Sequence]:
        """Drop every unfinished sequence, freeing its blocks (an interrupted job)."""
        self.runner.scoring = self.masks.active = False
        return self.scheduler.abort_all()

    def _snapshot(self) -> KVSnapshot:
        """The KV blocks of now, as the step being counted (`counter.steps`) left them."""
        return self.block_manager.usage.snapshot(
            self.counter.steps, self.scheduler.running, self.pool.num_used, self.pool.num_free
        )

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


def _trace(out: SchedulerOutput, num_sampling: int) -> StepTrace:
    """The shape of a step (before its tokens are committed); seconds filled in after."""
    context = sum(seq.num_computed_tokens + n for seq, n in out.scheduled)
    decode = num_sampling == len(out.scheduled) == out.num_tokens > 0
    return StepTrace(0.0, 0.0, 0.0, len(out.scheduled), out.num_tokens, context, decode)


def _score_choices(
    batch: Batch, logits: torch.Tensor, sampling: list[Sequence]
) -> tuple[torch.Tensor, list[Sequence], list[Sequence], list[Sequence]]:
    """Put this step's choice-token log-probabilities in their sequences; return the logits
    and sequences that sample, the scores_only parents whose prompt is done (each gives its
    choices the first token's log-probability), and the choices scored to their end."""
    rowed = [seq for seq in sampling if seq.choice_ids is None]  # logits rows, in order
    scored = [seq for seq in sampling if seq.choice_ids is not None]
    if batch.scores is not None:
        rows = logits[batch.scores.num_sample_rows :].float()
        targets = batch.scores.targets[:, None]
        values = torch.log_softmax(rows, dim=-1).gather(1, targets)[:, 0].tolist()
        for (seq, k), value in zip(batch.scores.owners, values, strict=True):
            seq.choice_logprobs[k] = value
    parents = [(row, seq) for row, seq in enumerate(rowed) if seq.scores_only]
    for row, parent in parents:
        firsts = [child.choice_ids[0] for child in parent.forks]
        values = torch.log_softmax(logits[row].float(), dim=-1)[firsts].tolist()
        for child, value in zip(parent.forks, values, strict=True):
            child.choice_logprobs[0] = value
    keep = [row for row, seq in enumerate(rowed) if not seq.scores_only]
    return logits[keep], [rowed[row] for row in keep], [p for _, p in parents], scored


def _with_forks(sampling: list[Sequence]) -> tuple[list[Sequence], list[int]]:
    """Sequences to sample and the logits row of each: forks sample from their parent's."""
    seqs, rows = [], []
    for row, seq in enumerate(sampling):
        for s in (seq, *seq.forks):
            seqs.append(s)
            rows.append(row)
    return seqs, rows
