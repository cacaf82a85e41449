"""A step's sampling stage: who samples with what, on the device, read back in one copy.

The sequences that sample in a step are those `SchedulerOutput.sampling` lists (their
logits are the step's first rows, in order). Their params are rows of `SamplingSlots`,
gathered with numpy by their block-table rows; only in a step where a prompt with forks
ends (the forks sample from their parent's logits and have no row yet) are they read from
the sequences themselves. The sampled tokens, with the logprobs when some sequence asks and
the choice scores when the step scores, come back in the step's one device-to-host copy
(`Readback`); the host then turns them into each sequence's entries.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from pagedbatch.engine.batch import Batch
from pagedbatch.engine.sampler import (
    LogprobEntry,
    RowParams,
    logprob_entries,
    pack,
    sample_rows,
    sort_width,
    top_logprobs,
)
from pagedbatch.engine.sampling_slots import SamplingSlots
from pagedbatch.engine.scoring import score_values
from pagedbatch.engine.sequence import Sequence
from pagedbatch.engine.staging import Readback, Uploads
from pagedbatch.engine.stopping import StopChecker
from pagedbatch.engine.token_masks import TokenMasks

if TYPE_CHECKING:
    from pagedbatch.engine.logits_processor import LogitsProcessor


class SamplingRows(NamedTuple):
    """Who samples in a step and with what: the sequences (forks after their parent), the
    parents among them whose forks start, their logits [len(seqs), vocab], params and
    logprobs widths (-1: none), and their rows of the SamplingSlots (None when forks, which
    have no row yet, sample)."""

    seqs: list[Sequence]
    parents: list[Sequence]
    logits: torch.Tensor
    params: RowParams | None
    logprobs: np.ndarray | None  # None: no row asks
    table_rows: np.ndarray | None


class Sampled(NamedTuple):
    """A step's sampling and scoring as read back (host arrays, valid until the next step):
    the sequences that sampled and their tokens, `top_logprobs`' results when some ask, the
    choice scores (`Batch.scores`' targets, in order)."""

    rows: SamplingRows
    tokens: np.ndarray  # [len(rows.seqs)] int
    logprobs: list[np.ndarray] | None  # chosen, alternatives' values and ids (flattened)
    scores: np.ndarray | None  # [num_targets] float32


class StepSampler:
    """Samples each step's sequences from their rows' params (`SamplingSlots`, written as
    sequences join) and reads the results back in one copy."""

    def __init__(self, max_num_seqs: int, uploads: Uploads) -> None:
        self.slots = SamplingSlots(max_num_seqs)
        self.uploads = uploads
        self.readback = Readback(uploads.device)

    def sample(
        self, sampling: list[Sequence], parents: set[Sequence], batch: Batch,
        logits: torch.Tensor, masks: TokenMasks, processor: LogitsProcessor,
    ) -> Sampled:  # fmt: skip
        """The next token of each of `sampling` (the first logits rows, in order) and of
        the forks of those among `parents` (sequences whose forks have not started); the
        logprobs of those that ask for them and the step's choice scores.

        The constrained rows' tokens are masked first (`masks`, filled on the host before
        anything waits for the forward; in place, so logprobs see the mask), then the
        `processor` changes the rows that ask on a copy (penalties, bias, min_tokens, the
        end of a thinking budget)."""
        rows = self._rows(sampling, parents, batch, logits)
        if not rows.seqs and batch.scores is None:
            return Sampled(rows, np.zeros(0, dtype=np.int64), None, None)
        mask = masks.fill(rows.seqs)
        if mask is not None:
            mask.apply(rows.logits)
        changes = rows.table_rows is None or self.slots.num_processes or processor.think
        processed = processor(rows.logits, rows.seqs) if changes else rows.logits
        tokens = sample_rows(processed, rows.params)
        if changes:
            processor.accept(tokens)
        parts = [tokens]
        widths = rows.logprobs
        wants_logprobs = widths is not None and len(widths) > 0 and widths.max() >= 0
        if wants_logprobs:
            parts += top_logprobs(rows.logits, tokens, int(rows.logprobs.max()))
        if batch.scores is not None:
            parts.append(score_values(batch.scores, logits))
        host = self.readback.fetch(parts)
        logprobs = host[1:4] if wants_logprobs else None
        return Sampled(rows, host[0], logprobs, host[-1] if batch.scores is not None else None)

    def _rows(
        self, sampling: list[Sequence], parents: set[Sequence], batch: Batch,
        logits: torch.Tensor,
    ) -> SamplingRows:  # fmt: skip
        vocab = logits.shape[-1]
        if not parents or parents.isdisjoint(sampling):
            rows, positions = batch.sample_rows, batch.sample_positions
            params = self.slots.row_params(rows, positions, vocab, self.uploads)
            widths = self.slots.logprobs[rows] if self.slots.num_logprobs else None
            return SamplingRows(sampling, [], logits[: len(sampling)], params, widths, rows)
        starting = [s for s in sampling if s in parents]
        seqs, rows = _with_forks(sampling)
        put = self.uploads.put
        rows_logits = logits[put(np.array(rows, dtype=np.int64))]
        randoms = [s.params for s in seqs if not s.params.greedy]
        params = None
        if randoms:
            min_p = any(p.min_p > 0 for p in randoms)
            params = RowParams(put(pack(seqs)), sort_width(randoms, vocab), min_p)
        widths = np.array([_logprobs_width(s) for s in seqs], dtype=np.int64)
        return SamplingRows(seqs, starting, rows_logits, params, widths, None)

    def join(self, seqs: list[Sequence], rows: list[int]) -> None:
        """`seqs` joined the running set in block-table rows `rows`."""
        for seq, row in zip(seqs, rows):
            self.slots.join(row, seq)

    @staticmethod
    def logprobs(sampled: Sampled) -> list[tuple[int, LogprobEntry]]:
        """The logprobs entry of each sampled sequence that asks: (index, entry)."""
        if sampled.logprobs is None:
            return []
        return logprob_entries(*sampled.logprobs, sampled.rows.logprobs)

    def may_stop(
        self, sampled: Sampled, tokens: list[int], batch: Batch, stop: StopChecker
    ) -> list[int] | None:
        """The sampled sequences that may stop (`StopChecker.may_stop`) from their rows'
        params; None (check every one) when forks, which have no row yet, sampled."""
        at = sampled.rows.table_rows
        if at is None:
            return None
        slots = self.slots
        return stop.may_stop(
            tokens, batch.sample_positions + 1, slots.max_len[at],
            slots.ignore_eos[at] if slots.num_eos else None,
            slots.has_stop[at] if slots.num_stop else None,
        )  # fmt: skip


def _logprobs_width(seq: Sequence) -> int:
    """How many alternatives `seq` reports per token (-1: no logprobs)."""
    return -1 if seq.params.logprobs is None else seq.params.logprobs


def _with_forks(sampling: list[Sequence]) -> tuple[list[Sequence], list[int]]:
    """Sequences to sample and the logits row of each: forks sample from their parent's."""
    seqs, rows = [], []
    for row, seq in enumerate(sampling):
        for s in (seq, *seq.forks):
            seqs.append(s)
            rows.append(row)
    return seqs, rows
