"""The flattened ragged batch of one step, as the model and attention see it."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from pagedbatch.engine.cascade import CascadePlan
    from pagedbatch.engine.sequence import Sequence


@dataclass(frozen=True)
class ScoreRows:
    """The logits rows a step computes to score choices, after the sampling rows: row
    `num_sample_rows + j` gives the log-probability of `targets[j]`, which belongs in
    `owners[j]` = (sequence, index into its choice_logprobs)."""

    num_sample_rows: int
    targets: torch.Tensor  # [num_score_rows] token ids, on the device
    owners: list[tuple[Sequence, int]]


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
    logits_indices: torch.Tensor  # [num_sampled] token index of each sampled sequence's last token
    context_lens_host: list[int]
    query_start_loc_host: list[int]
    cascade: CascadePlan | None = None  # sequences sharing prefix pages (not for graph replays)
    scores: ScoreRows | None = None  # logits rows that score choices (after the sampling rows)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens_host)

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
