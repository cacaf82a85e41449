"""Which sequences run in the next step, and with how many tokens each."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, NamedTuple

from pagedbatch.engine.block_manager import BlockCopy, BlockManager
from pagedbatch.engine.sequence import Sequence, SequenceStatus

if TYPE_CHECKING:
    from pagedbatch.engine.stopping import StopChecker


class ScheduledSeq(NamedTuple):
    seq: Sequence
    num_new_tokens: int

    @property
    def completes(self) -> bool:
        """This step computes the sequence's last token (its logits follow all its tokens)."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens

    @property
    def samples(self) -> bool:
        """This step samples the sequence's next token: it completes a sequence that
        generates (one that scores choices never samples). The one rule of which sequences
        sample: the runner's sampling rows, the engine's sampler, CUDA graph replays."""
        return self.completes and not self.seq.is_scoring


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq]
    copies: list[BlockCopy] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @cached_property
    def samples(self) -> list[bool]:
        """Whether each scheduled sequence samples (`ScheduledSeq.samples`), worked out once
        per step: asked after the schedule is made, before it is committed."""
        return [s.samples for s in self.scheduled]

    @property
    def sampling(self) -> list[Sequence]:
        """The sequences that sample this step, in order (the step's first logits rows)."""
        return [s.seq for s, samples in zip(self.scheduled, self.samples) if samples]


class Scheduler:
    """Continuous batching under a token budget and the KV block pool.

    Each step: every running sequence gets its next tokens (one to decode, or the
    next chunk of its prompt), oldest first; then waiting sequences are admitted,
    first come first served, while the budget and free blocks allow. When a running
    sequence needs a block and none is free, the most recently admitted running
    sequence is preempted: its blocks are freed and it waits to be recomputed.
    """

    def __init__(self, block_manager: BlockManager, max_batch_tokens: int, max_num_seqs: int):
        self.block_manager = block_manager
        self.max_batch_tokens = max_batch_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_recomputed_tokens = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput([])
        preemptions = self.num_preemptions
        budget = self._schedule_running(out, self.max_batch_tokens)
        # Admitting right after a preemption would only evict again, unless the
        # preemptions left nothing to run this step.
        if self.num_preemptions == preemptions or not out.scheduled:
            self._admit_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        manager, running = self.block_manager, self.running
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            needed = manager.blocks_needed(seq, n)  # mostly 0: a decode inside its last block
            while needed and needed > manager.num_available and running[-1] is not seq:
                self._preempt(running.pop())
                needed = manager.blocks_needed(seq, n)  # a preempted fork may unshare a block
            if needed and needed > manager.num_available:
                self._preempt(running.pop())
                break
            if needed:
                out.copies += manager.append(seq, n)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
            i += 1
        return budget

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            self.block_manager.attach_cached_prefix(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            if self._waits_for_prefix(seq) or not self.block_manager.can_append(seq, n):
                self.block_manager.free(seq)
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.copies += self.block_manager.append(seq, n)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n

    def _waits_for_prefix(self, seq: Sequence) -> bool:
        """True when a running sequence is still computing the next block `seq` would compute.

        Admitting `seq` now would compute that block a second time; a step later it is
        in the prefix cache. (Records sharing a prefix arrive one after another.)
        """
        if self.block_manager.prefix_cache is None:
            return False
        end = seq.num_computed_tokens + self.block_manager.block_size
        if end > seq.num_prompt_tokens:
            return False
        head = seq.token_ids[:end]
        return any(
            r.num_computed_tokens < end <= r.num_prompt_tokens and r.token_ids[:end] == head
            for r in self.running
        )

    def _preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self.num_recomputed_tokens += seq.num_computed_tokens
        self.block_manager.free(seq)
        self.add_front(seq)

    def commit(self, out: SchedulerOutput, sampled: list[Sequence]) -> None:
        """After the forward: the step's tokens are computed (full blocks go into the prefix
        cache), and the forks of each `sampled` sequence start on its computed prompt."""
        for seq, n in out.scheduled:
            self.block_manager.commit(seq, n)
        for parent in sampled:
            for child in parent.forks:
                self.block_manager.fork(parent, child)
                child.forked = True
                self.add_running(child)
            parent.forks = []

    def postprocess(
        self, seqs: list[Sequence], tokens: list[int], stop: StopChecker
    ) -> list[Sequence]:
        """Append each sequence's sampled token; finish those that `stop` says are done
        (their blocks freed). Returns the finished sequences."""
        finished = []
        for seq, token in zip(seqs, tokens, strict=True):
            seq.token_ids.append(token)
            seq.finish_reason = stop.check(seq)
            if seq.finish_reason is not None:
                self.finish(seq)
                finished.append(seq)
        return finished

    def add_running(self, seq: Sequence) -> None:
        """A sequence that already holds its blocks (a fork) joins the running set."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def add_front(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Take a finished sequence out of the running set and free its blocks."""
        seq.status = SequenceStatus.FINISHED
        self.running.remove(seq)
        self.block_manager.free(seq)

    def abort_all(self) -> list[Sequence]:
        """Drop every unfinished sequence, freeing its blocks (an interrupted job); return them."""
        aborted = [*self.running, *self.waiting]
        for seq in aborted:
            seq.status = SequenceStatus.FINISHED
            self.block_manager.free(seq)
        self.running.clear()
        self.waiting.clear()
        return aborted
