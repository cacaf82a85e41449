"""The synchronous step loop: schedule -> run -> sample -> postprocess."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedbatch.attention import PagedAttention
from pagedbatch.block_manager import BlockManager
from pagedbatch.block_pool import BlockPool
from pagedbatch.kv_cache import KVCache
from pagedbatch.model_runner import ModelRunner
from pagedbatch.sampler import sample
from pagedbatch.scheduler import Scheduler, SchedulerOutput
from pagedbatch.sequence import Sequence
from pagedbatch.stopping import StopChecker


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's counters (plain data, for progress and reports)."""

    steps: int
    prompt_tokens: int
    computed_tokens: int
    generated_tokens: int
    finished_seqs: int
    running_seqs: int
    waiting_seqs: int
    preemptions: int
    recomputed_tokens: int
    num_blocks: int
    blocks_in_use: int
    peak_blocks_in_use: int


class Engine:
    """Runs sequences to completion on one model and one paged KV cache."""

    def __init__(
        self,
        model,
        kv_cache: KVCache,
        stop_checker: StopChecker,
        max_batch_tokens: int,
        max_num_seqs: int,
        attention_backend: str = "torch",
    ) -> None:
        self.pool = BlockPool(kv_cache.num_blocks)
        self.block_manager = BlockManager(self.pool, kv_cache.spec.block_size)
        self.scheduler = Scheduler(self.block_manager, max_batch_tokens, max_num_seqs)
        attention = PagedAttention(kv_cache, attention_backend)
        self.runner = ModelRunner(model, attention, self.block_manager)
        self.stop_checker = stop_checker
        self._steps = self._prompt_tokens = self._computed = self._generated = 0
        self._finished = self._peak_blocks = 0

    def add(self, seq: Sequence) -> None:
        self._prompt_tokens += seq.num_prompt_tokens
        self.scheduler.add(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[Sequence]:
        """Run one step; return the sequences that finished in it."""
        out = self.scheduler.schedule()
        logits = self.runner.run(out)
        sampling = [s.seq for s in out.scheduled if s.samples]
        tokens = sample(logits, sampling)
        return self._postprocess(out, sampling, tokens)

    def _postprocess(
        self, out: SchedulerOutput, sampling: list[Sequence], tokens: list[int]
    ) -> list[Sequence]:
        self._steps += 1
        self._computed += out.num_tokens
        self._generated += len(tokens)
        self._peak_blocks = max(self._peak_blocks, self.pool.num_used)
        for seq, n in out.scheduled:
            seq.num_computed_tokens += n
        finished = []
        for seq, token in zip(sampling, tokens):
            seq.token_ids.append(token)
            seq.finish_reason = self.stop_checker.check(seq)
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)
                finished.append(seq)
        self._finished += len(finished)
        return finished

    def stats(self) -> EngineStats:
        return EngineStats(
            steps=self._steps,
            prompt_tokens=self._prompt_tokens,
            computed_tokens=self._computed,
            generated_tokens=self._generated,
            finished_seqs=self._finished,
            running_seqs=len(self.scheduler.running),
            waiting_seqs=len(self.scheduler.waiting),
            preemptions=self.scheduler.num_preemptions,
            recomputed_tokens=self.scheduler.num_recomputed_tokens,
            num_blocks=self.pool.num_blocks,
            blocks_in_use=self.pool.num_used,
            peak_blocks_in_use=self._peak_blocks,
        )


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A random stream of its own for one sequence; seeded when `seed` is given."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator
