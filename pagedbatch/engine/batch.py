"""The flattened ragged batch of one step, as the model and attention see it."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from pagedbatch.engine.cascade import CascadePlan
    from pagedbatch.engine.scoring import Scoring


@dataclass(frozen=True)
class Batch:
    """All scheduled tokens of all sequences of one step, as one row.

    Device tensors feed the model and kernels; the host lists are the same lengths,
    kept so that nothing synchronises to read them. The derived host facts below are
    worked out once per step (the first layer asks), not once per layer.
    """

    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    slot_mapping: torch.Tensor  # [num_tokens] physical KV slot of each new token
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, padded with 0
    context_lens: torch.Tensor  # [num_seqs] KV length after this step
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    # [num_logits_rows] token index of each row the LM head runs on: the last token of each
    # sequence that samples (`ScheduledSeq.samples`), then each position that scores a choice
    logits_indices: torch.Tensor
    context_lens_host: list[int]
    query_start_loc_host: list[int]
    cascade: CascadePlan | None = None  # sequences sharing prefix pages (not for graph replays)
    scores: Scoring | None = None  # the logits rows that score choices (engine/scoring.py)
    # The sampling rows' host facts, in logits-row order: each one's block-table row (the
    # row of its params: engine/sampling_slots.py) and the position of the token it samples.
    sample_rows: np.ndarray | None = None  # [num_sampled] int64
    sample_positions: np.ndarray | None = None  # [num_sampled] int64

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens_host)

    @property
    def num_sampled(self) -> int:
        """The first logits rows: one per sequence that samples."""
        return self.logits_indices.shape[0] if self.scores is None else self.scores.first_row

    @property
    def decode_only(self) -> bool:
        """One new token per sequence, and every sequence samples (what CUDA graphs replay)."""
        return self.num_tokens == self.num_seqs == self.num_sampled > 0

    @cached_property
    def query_lens_host(self) -> list[int]:
        q = self.query_start_loc_host
        return [b - a for a, b in zip(q[:-1], q[1:])]

    @cached_property
    def max_query_len(self) -> int:
        return max(self.query_lens_host)

    @cached_property
    def max_context_len(self) -> int:
        return max(self.context_lens_host)

    @cached_property
    def has_decode(self) -> bool:
        """Some sequence has exactly one new token."""
        return 1 in self.query_lens_host
