"""The per-row changes to the logits before sampling that a request's params ask for.

A thinking sequence that has spent its reasoning budget must end its thinking: its row
allows only the end-of-thinking token. Rows that ask for none of these changes cost
nothing: a step where no row does returns the logits as they are.
"""

from __future__ import annotations

import torch

from pagedbatch.engine.reasoning import ThinkTokens, must_end_thinking
from pagedbatch.engine.sampler import upload
from pagedbatch.engine.sequence import Sequence


class LogitsProcessor:
    """Applies each sequence's logits changes, row by row, in one set of tensor ops."""

    def __init__(self, think: ThinkTokens | None = None) -> None:
        self.think = think

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """`logits` [n, vocab] with row i changed as `seqs[i]` asks: a new tensor when some
        row changes (the logits given stay the model's, for logprobs), else `logits`."""
        if self.think is None:
            return logits
        forced = [i for i, seq in enumerate(seqs) if must_end_thinking(seq)]
        if not forced:
            return logits
        out = logits.clone()
        rows = upload(torch.tensor(forced), logits.device)
        out[rows] = float("-inf")
        out[rows, self.think.end] = 0.0
        return out
