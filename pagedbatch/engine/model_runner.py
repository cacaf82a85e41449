"""Runs one step of a transformers model over the paged KV cache."""

from __future__ import annotations

import itertools
from typing import NamedTuple

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
from pagedbatch.engine.profiling import FORWARD, marked
from pagedbatch.engine.scheduler import SchedulerOutput
from pagedbatch.engine.scoring import Scoring, plan_scoring
from pagedbatch.engine.sequence import Sequence
from pagedbatch.engine.staging import Uploads


class HostInputs(NamedTuple):
    """A step's inputs on the host: per scheduled sequence its block-table row, computed
    tokens before and after the step, first token index (one more: the total); per token
    its id, position and KV slot."""

    rows: np.ndarray
    begins: np.ndarray
    ends: np.ndarray
    starts: np.ndarray
    input_ids: np.ndarray
    positions: np.ndarray
    slots: np.ndarray


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
        self.uploads = Uploads(self.device)
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

        Host work is a pass over the scheduled sequences plus numpy over tokens; the
        block tables are not rebuilt (they are rows of the persistent `BlockTables`), and
        every integer input travels to the device in one copy from a pinned buffer
        (engine/staging.py).
        """
        uploads = self.uploads
        uploads.begin_step()
        if out.copies:
            src, dst = np.array(out.copies, dtype=np.int64).T  # [num_copies] each
            self.attention.kv_cache.copy_blocks(uploads.put(src), uploads.put(dst))
        host = self._flatten(out)
        logits_rows, scores = self._logits_rows(out, host.starts)
        staged = uploads.put(
            np.concatenate([host.input_ids, host.positions, host.slots, host.ends, host.starts,
                            logits_rows, host.rows])
        )  # fmt: skip
        t, s = out.num_tokens, len(out.seqs)
        ids, pos, slot, lens, loc, logits_indices, row_ids = staged.split(
            (t, t, t, s, s + 1, len(logits_rows), s)
        )
        width = blocks_for(int(host.ends.max()), self.block_manager.block_size)
        # A decode step that replays a CUDA graph runs the kernels captured without cascade.
        decode_only = scores is None and t == s == len(logits_rows)  # = Batch.decode_only
        plan = None
        if self.cascade and not (self.graphs is not None and self.graphs.takes(s, decode_only)):
            plan = self._cascade_plan(host, width)
        every = len(out.sampling) == s  # every sequence samples
        return Batch(
            input_ids=ids,
            positions=pos,
            slot_mapping=slot,
            block_tables=self.block_manager.tables.device(uploads)[row_ids, :width],
            context_lens=lens.to(torch.int32),
            query_start_loc=loc.to(torch.int32),
            logits_indices=logits_indices,
            context_lens_host=host.ends.tolist(),
            query_start_loc_host=host.starts.tolist(),
            scores=scores,
            cascade=plan,
            sample_rows=host.rows if every else host.rows[np.array(out.samples, dtype=bool)],
            sample_positions=host.ends if every else host.ends[np.array(out.samples, dtype=bool)],
        )

    def _flatten(self, out: SchedulerOutput) -> HostInputs:
        """The step's inputs on the host (one token per sequence, a decode step, without
        the general repeat and cumsum)."""
        seqs, tables, size = out.seqs, self.block_manager.tables, self.block_manager.block_size
        rows = out.rows
        begins = np.array(out.begins, dtype=np.int64)
        if out.num_tokens == len(seqs):  # one token each
            ids = [seq.token_ids[b] for seq, b in zip(seqs, out.begins)]
            input_ids = np.array(ids, dtype=np.int64)
            ends, starts, positions = begins + 1, np.arange(len(seqs) + 1), begins
            blocks = tables.host[rows, begins // size]
        else:
            counts = np.array(out.counts, dtype=np.int64)
            input_ids = _new_token_ids(seqs, begins, counts, out.num_tokens)
            ends = begins + counts
            starts = np.zeros(len(seqs) + 1, dtype=np.int64)
            np.cumsum(counts, out=starts[1:])
            # positions: begin of the token's sequence + its index within the sequence's run
            positions = np.repeat(begins - starts[:-1], counts) + np.arange(starts[-1])
            blocks = tables.host[np.repeat(rows, counts), positions // size]
        slots = blocks.astype(np.int64) * size + positions % size
        return HostInputs(rows, begins, ends, starts, input_ids, positions, slots)

    def _logits_rows(
        self, out: SchedulerOutput, starts: np.ndarray
    ) -> tuple[np.ndarray, Scoring | None]:
        """The token rows the LM head runs on: the last of each sequence that samples, then
        every row that scores a choice token (engine/scoring.py)."""
        if len(out.sampling) == len(out.seqs):  # every sequence samples: none scores
            return starts[1:] - 1, None
        samples = np.array(out.samples, dtype=bool)
        last = starts[1:][samples] - 1
        others = np.flatnonzero(~samples).tolist()  # prompt chunks, sequences that score
        planned = plan_scoring(out.seqs, out.counts, others, starts, len(last), self.uploads)
        if planned is None:
            return last, None
        score_rows, scoring = planned
        return np.concatenate([last, np.array(score_rows, dtype=np.int64)]), scoring

    def _cascade_plan(self, host: HostInputs, width: int) -> CascadePlan | None:
        """Which scheduled sequences attend to a shared prefix's pages together this step."""
        tables, size = self.block_manager.tables, self.block_manager.block_size
        own_rows = tables.host[host.rows, :width]
        begins, ends = host.begins, host.ends
        decoding = ends - begins == 1
        groups = plan_cascade(own_rows, -(-ends // size), begins, size, self.cascade_rule, decoding)
        starts = host.starts.tolist()
        return make_plan(groups, own_rows, size, starts, self.device, self.uploads.put)

    @torch.inference_mode()
    def forward(self, batch: Batch) -> torch.Tensor:  # [num_sampled, vocab]
        """Run the model over `batch`; return the logits of the sampling positions."""
        with marked(FORWARD):
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


def _new_token_ids(
    seqs: list[Sequence], begins: np.ndarray, counts: np.ndarray, num_tokens: int
) -> np.ndarray:
    """The token ids each scheduled sequence computes this step, concatenated."""
    if num_tokens == len(seqs):  # decode (or one-token chunks): one id per sequence
        return np.array([seq.token_ids[seq.num_computed_tokens] for seq in seqs], dtype=np.int64)
    return np.fromiter(
        itertools.chain.from_iterable(
            seq.token_ids[b : b + n] for seq, b, n in zip(seqs, begins.tolist(), counts.tolist())
        ),
        dtype=np.int64,
        count=num_tokens,
    )
