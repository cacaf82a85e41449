"""Runs one step of a transformers model over the paged KV cache."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import torch

from pagedbatch.engine.attention import PagedAttention
from pagedbatch.engine.batch import Batch
from pagedbatch.engine.block_manager import BlockManager
from pagedbatch.engine.block_pool import blocks_for
from pagedbatch.engine.cascade import (
    ANY_GROUP,
    TORCH_RULE,
    CascadePlan,
    make_plan,
    plan_cascade,
)
from pagedbatch.engine.cuda_graphs import CudaGraphRunner
from pagedbatch.engine.scheduler import SchedulerOutput
from pagedbatch.engine.scoring import Scoring, plan_scoring


class ModelRunner:
    """Turns a SchedulerOutput into a Batch, runs the model, returns the logits to sample
    (and to score: the Batch says which rows do which)."""

    def __init__(
        self,
        model,
        attention: PagedAttention,
        block_manager: BlockManager,
        cascade: bool = False,
    ) -> None:
        self.model = model
        self.cascade = cascade  # plan cascade attention for sequences sharing prefix pages
        # Which groups are worth it: measured for torch; Triton takes any (see cascade.py).
        self.cascade_rule = TORCH_RULE if attention.backend == "torch" else ANY_GROUP
        self.attention = attention
        self.block_manager = block_manager
        self.device = next(model.parameters()).device
        self.graphs: CudaGraphRunner | None = None

    def capture_cuda_graphs(self, max_num_seqs: int, max_model_len: int) -> None:
        """From now on, replay decode-only steps from CUDA graphs (see cuda_graphs.py)."""
        width = blocks_for(max_model_len, self.block_manager.block_size)
        graphs = CudaGraphRunner(self._eager, max_num_seqs, width, max_model_len, self.device)
        with torch.inference_mode():
            graphs.capture()
        self.graphs = graphs

    def prepare(self, out: SchedulerOutput) -> Batch:
        """Run the step's block copies; flatten its scheduled tokens into one ragged batch.

        Host work is a few list comprehensions over the scheduled sequences plus numpy
        over tokens; the block tables are not rebuilt (they are rows of the persistent
        `BlockTables`), and every integer input travels to the device in one copy.
        """
        self.attention.kv_cache.copy_blocks(out.copies)
        scheduled = out.scheduled
        tables = self.block_manager.tables
        rows = np.array([tables.row(s.seq.seq_id) for s in scheduled], dtype=np.int64)
        begins = np.array([s.seq.num_computed_tokens for s in scheduled], dtype=np.int64)
        counts = np.array([s.num_new_tokens for s in scheduled], dtype=np.int64)
        input_ids = _new_token_ids(scheduled, begins, counts)
        ends = begins + counts
        starts = np.zeros(len(scheduled) + 1, dtype=np.int64)
        np.cumsum(counts, out=starts[1:])
        # positions: begin of the token's sequence + its index within the sequence's run
        positions = np.repeat(begins - starts[:-1], counts) + np.arange(starts[-1])
        size = self.block_manager.block_size
        blocks = tables.host[np.repeat(rows, counts), positions // size]
        slots = blocks.astype(np.int64) * size + positions % size
        logits_rows, scores = self._logits_rows(out, starts)
        staged = torch.from_numpy(
            np.concatenate([input_ids, positions, slots, ends, starts, logits_rows, rows])
        )
        device = self.device
        if device.type != "cpu":
            staged = staged.pin_memory().to(device, non_blocking=True)
        t, s = len(positions), len(scheduled)
        cuts = (t, t, t, s, s + 1, len(logits_rows), s)
        ids, pos, slot, lens, loc, logits_indices, row_ids = staged.split(cuts)
        width = blocks_for(int(ends.max()), size)
        batch = Batch(
            input_ids=ids,
            positions=pos,
            slot_mapping=slot,
            block_tables=tables.device(device)[row_ids, :width],
            context_lens=lens.to(torch.int32),
            query_start_loc=loc.to(torch.int32),
            logits_indices=logits_indices,
            context_lens_host=ends.tolist(),
            query_start_loc_host=starts.tolist(),
            scores=scores,
        )
        # A decode step that replays a CUDA graph runs the kernels captured without cascade.
        if self.cascade and not (self.graphs is not None and self.graphs.replays(batch)):
            plan = self._cascade_plan(rows, begins, ends, starts)
            batch = dataclasses.replace(batch, cascade=plan)
        return batch

    def _logits_rows(
        self, out: SchedulerOutput, starts: np.ndarray
    ) -> tuple[np.ndarray, Scoring | None]:
        """The token rows the LM head runs on: the last of each sequence that samples, then
        every row that scores a choice token (engine/scoring.py)."""
        samples = np.array(out.samples, dtype=bool)
        last = starts[1:][samples] - 1
        others = np.flatnonzero(~samples).tolist()  # prompt chunks, sequences that score
        planned = plan_scoring(out.scheduled, others, starts, len(last), self.device)
        if planned is None:
            return last, None
        score_rows, scoring = planned
        return np.concatenate([last, np.array(score_rows, dtype=np.int64)]), scoring

    def _cascade_plan(
        self, rows: np.ndarray, begins: np.ndarray, ends: np.ndarray, starts: np.ndarray
    ) -> CascadePlan | None:
        """Which scheduled sequences attend to a shared prefix's pages together this step."""
        tables, size = self.block_manager.tables, self.block_manager.block_size
        own_rows = tables.host[rows]
        decoding = ends - begins == 1
        groups = plan_cascade(own_rows, -(-ends // size), begins, size, self.cascade_rule, decoding)
        return make_plan(groups, own_rows, size, starts.tolist(), self.device)

    @torch.inference_mode()
    def forward(self, batch: Batch) -> torch.Tensor:  # [num_sampled, vocab]
        """Run the model over `batch`; return the logits of the sampling positions."""
        if self.graphs is not None:
            logits = self.graphs.run(batch)
            if logits is not None:
                return logits
        return self._eager(batch)

    def _eager(self, batch: Batch) -> torch.Tensor:
        result = self.model(
            input_ids=batch.input_ids[None],
            position_ids=batch.positions[None],
            use_cache=False,
            logits_to_keep=batch.logits_indices,
            paged_attention=self.attention,
            paged_batch=batch,
        )
        return result.logits[0]


def _new_token_ids(scheduled: list, begins: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The token ids each scheduled sequence computes this step, concatenated."""
    if counts.max() == 1:  # decode (or one-token chunks): one id per sequence
        return np.array([s.seq.token_ids[s.seq.num_computed_tokens] for s in scheduled])
    return np.fromiter(
        itertools.chain.from_iterable(
            s.seq.token_ids[b : b + n]
            for s, b, n in zip(scheduled, begins.tolist(), counts.tolist())
        ),
        dtype=np.int64,
        count=int(counts.sum()),
    )
