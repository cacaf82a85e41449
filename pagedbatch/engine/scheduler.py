"""Which sequences run in the next step, and with how many tokens each."""

from __future__ import annotations

import itertools
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from pagedbatch.engine.block_manager import BlockCopy, BlockManager
from pagedbatch.engine.memory import RunningFigures
from pagedbatch.engine.sequence import Sequence, SequenceStatus

if TYPE_CHECKING:
    from pagedbatch.engine.stopping import StopChecker


def samples(seq: Sequence, num_new_tokens: int) -> bool:
    """Whether a step that computes `seq`'s next `num_new_tokens` tokens samples its next
    token: it computes the sequence's last token (its logits follow all its tokens) and the
    sequence generates (one that scores choices never samples). The one rule of which
    sequences sample: the runner's sampling rows, the engine's sampler, CUDA graph replays."""
    return seq.num_computed_tokens + num_new_tokens == seq.num_tokens and not seq.is_scoring


class ScheduledSeq(NamedTuple):
    seq: Sequence
    num_new_tokens: int

    @property
    def completes(self) -> bool:
        """This step computes the sequence's last token (its logits follow all its tokens)."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens

    @property
    def samples(self) -> bool:
        """This step samples the sequence's next token (`samples`)."""
        return samples(self.seq, self.num_new_tokens)


@dataclass
class SchedulerOutput:
    """A step's schedule, as columns: the sequences and their new tokens, whether each
    samples (`samples`) and the sampling ones in order (the step's first logits rows),
    worked out as they are scheduled; the block copies to run first; the sequences
    admitted in this step."""

    seqs: list[Sequence] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)  # each one's new tokens
    begins: list[int] = field(default_factory=list)  # each one's computed tokens before
    samples: list[bool] = field(default_factory=list)
    sampling: list[Sequence] = field(default_factory=list)
    copies: list[BlockCopy] = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)
    num_tokens: int = 0
    rows: np.ndarray | None = None  # [num_seqs] each one's block-table row, once scheduled

    def add(self, seq: Sequence, num_new_tokens: int, uncomputed: int) -> None:
        """Schedule `num_new_tokens` of the `uncomputed` tokens `seq` has left."""
        self.seqs.append(seq)
        self.counts.append(num_new_tokens)
        self.begins.append(seq.num_computed_tokens)
        self.num_tokens += num_new_tokens
        sampled = num_new_tokens == uncomputed and not seq.is_scoring  # `samples`'s rule
        self.samples.append(sampled)
        if sampled:
            self.sampling.append(seq)

    def add_generating(
        self, seqs: list[Sequence], counts: np.ndarray, uncomputed: np.ndarray,
        begins: np.ndarray,
    ) -> None:  # fmt: skip
        """`add` for each of `seqs`, none of which scores: arrays of their new tokens,
        tokens left and computed tokens."""
        samples = (counts == uncomputed).tolist()
        self.seqs += seqs
        self.counts += counts.tolist()
        self.begins += begins.tolist()
        self.num_tokens += int(counts.sum())
        self.samples += samples
        self.sampling += itertools.compress(seqs, samples)

    @property
    def scheduled(self) -> list[ScheduledSeq]:
        return [ScheduledSeq(seq, n) for seq, n in zip(self.seqs, self.counts)]


class RunningSet:
    """The running sequences in the order they joined: add, remove and the last one in
    O(1) (a finished sequence leaves wherever it is), iteration in order. The sum and the
    largest of their `max_len` (the memory report's reserved figures) are kept as they
    join and leave."""

    def __init__(self) -> None:
        self._seqs: dict[Sequence, None] = {}
        self.max_len_sum = 0
        self._max_lens: Counter[int] = Counter()
        self.num_scoring = 0  # sequences that score choices

    def append(self, seq: Sequence) -> None:
        self._seqs[seq] = None
        self.max_len_sum += seq.max_len
        self._max_lens[seq.max_len] += 1
        self.num_scoring += seq.is_scoring

    def remove(self, seq: Sequence) -> None:
        del self._seqs[seq]
        self.num_scoring -= seq.is_scoring
        self.max_len_sum -= seq.max_len
        self._max_lens[seq.max_len] -= 1
        if not self._max_lens[seq.max_len]:
            del self._max_lens[seq.max_len]

    @property
    def last(self) -> Sequence:
        return next(reversed(self._seqs))

    def pop(self) -> Sequence:
        """Remove and return the sequence that joined last."""
        seq = self.last
        self.remove(seq)
        return seq

    @property
    def figures(self) -> RunningFigures:
        return RunningFigures(len(self._seqs), self.max_len_sum, max(self._max_lens, default=0))

    def clear(self) -> None:
        self._seqs.clear()
        self.max_len_sum = self.num_scoring = 0
        self._max_lens.clear()

    def __iter__(self) -> Iterator[Sequence]:
        return iter(self._seqs)

    def __len__(self) -> int:
        return len(self._seqs)

    def __contains__(self, seq: object) -> bool:
        return seq in self._seqs


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
        self.running = RunningSet()
        self.num_preemptions = 0
        self.num_recomputed_tokens = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        preemptions = self.num_preemptions
        budget = self._schedule_running(out, self.max_batch_tokens)
        # Admitting right after a preemption would only evict again, unless the
        # preemptions left nothing to run this step.
        if self.num_preemptions == preemptions or not out.seqs:
            self._admit_waiting(out, budget)
        out.rows = self.block_manager.tables.rows([seq.seq_id for seq in out.seqs])
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        """Each running sequence's next tokens, oldest first; preempt the newest when a
        block is missing. With numpy at once when nothing can be missing or copied."""
        if self.running and not self.running.num_scoring and not self.block_manager.shared_tails:
            left = self._schedule_all(out, budget)
            if left is not None:
                return left
        manager, running = self.block_manager, self.running
        for seq in list(running):  # oldest first; preemptions take the newest
            if budget <= 0 or seq not in running:
                break
            left = len(seq.token_ids) - seq.num_computed_tokens
            n = left if left < budget else budget
            needed = manager.blocks_needed(seq, n)  # mostly 0: a decode inside its last block
            while needed and needed > manager.num_available and running.last is not seq:
                self._preempt(running.pop())
                needed = manager.blocks_needed(seq, n)  # a preempted fork may unshare a block
            if needed and needed > manager.num_available:
                self._preempt(running.pop())
                break
            if needed:
                out.copies += manager.append(seq, n)
            out.add(seq, n, left)
            budget -= n
        return budget

    def _schedule_all(self, out: SchedulerOutput, budget: int) -> int | None:
        """The loop of `_schedule_running` for every running sequence at once, when no
        sequence scores or shares a partly filled block (so no copy-on-write) and the
        blocks the scheduled tokens need are available (so no preemption); None (nothing
        done) otherwise. Returns the budget left."""
        manager, seqs = self.block_manager, list(self.running)
        # [num_seqs, 3]: tokens, computed tokens, blocks held (one pass over the sequences)
        lengths, begins, held = np.array(
            [(len(s.token_ids), s.num_computed_tokens, len(s.block_table)) for s in seqs],
            dtype=np.int64,
        ).T
        left = lengths - begins
        before = np.cumsum(left) - left  # the tokens of the sequences before, all scheduled
        k = int(np.searchsorted(before, budget))  # those that start within the budget
        counts = np.minimum(left[:k], budget - before[:k])
        size = manager.block_size
        needed = np.maximum(-(-(begins[:k] + counts) // size) - held[:k], 0)
        if needed.sum() > manager.num_available:
            return None
        for i in np.flatnonzero(needed).tolist():
            manager.append(seqs[i], int(counts[i]))  # no copy: no tail is shared
        out.add_generating(seqs[:k], counts, left[:k], begins[:k])
        return budget - int(counts.sum())

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            self.block_manager.attach_cached_prefix(seq)
            left = seq.num_uncomputed_tokens
            n = min(left, budget)
            if self._waits_for_prefix(seq) or not self.block_manager.can_append(seq, n):
                self.block_manager.free(seq)
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.copies += self.block_manager.append(seq, n)
            out.add(seq, n, left)
            out.admitted.append(seq)
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

    def commit(self, out: SchedulerOutput, parents: list[Sequence]) -> None:
        """After the forward: the step's tokens are computed (full blocks go into the prefix
        cache), and the forks of each of `parents` (their prompt computed in this step)
        start on its computed prompt."""
        self.block_manager.commit_each(out.seqs, out.begins, out.counts, out.rows)
        for parent in parents:
            for child in parent.forks:
                self.block_manager.fork(parent, child)
                child.forked = True
                self.add_running(child)
            parent.forks = []

    def postprocess(
        self, seqs: list[Sequence], tokens: list[int], stop: StopChecker,
        may_stop: list[int] | None = None,
    ) -> list[Sequence]:  # fmt: skip
        """Append each sequence's sampled token; finish those that `stop` says are done
        (their blocks freed). Only the sequences `may_stop` indexes are checked when it is
        given (`StopChecker.may_stop`: the others cannot stop now). Returns the finished
        sequences."""
        for seq, token in zip(seqs, tokens, strict=True):
            seq.token_ids.append(token)
        finished = []
        for i in range(len(seqs)) if may_stop is None else may_stop:
            seq = seqs[i]
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
