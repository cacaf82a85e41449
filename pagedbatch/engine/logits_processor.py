"""The per-row changes to the logits before sampling that a request's params ask for.

In transformers' order (its `generate` builds them so): the logit bias is added; the
repetition penalty divides the positive logits of the tokens the sequence holds (prompt
and output) and multiplies the negative ones; the presence and frequency penalties
subtract, from each output token's logit, the penalty once and its count times the
penalty; while a sequence has fewer than `min_tokens` output tokens, EOS and its stop
token ids are -inf. A thinking sequence that has spent its reasoning budget must end its
thinking: its row allows only the end-of-thinking token. The temperature, top-k, top-p
and min-p filters that follow are the sampler's.

The changes are made on a float32 copy of the logits (the model's logits stay as they
are, for logprobs), on the rows that ask for them alone; a step where none does returns
the logits as they are. Each change keeps a -inf logit at -inf, so that a token a
structured output's mask removed stays removed. A row's change depends only on its own
sequence's tokens and params (token_counts.py keeps them on the device).
"""

from __future__ import annotations

from collections.abc import Collection

import torch

from pagedbatch.engine.reasoning import ThinkTokens, must_end_thinking
from pagedbatch.engine.sampler import upload
from pagedbatch.engine.sequence import Sequence
from pagedbatch.engine.token_counts import TokenCounts


class LogitsProcessor:
    """Applies each sequence's logits changes, row by row, in one set of tensor ops.

    Call it with a step's logits and sequences, then `accept` the tokens sampled from its
    result, so that the counts follow the sequences.
    """

    def __init__(self, eos_token_ids: Collection[int], think: ThinkTokens | None = None) -> None:
        self.eos_token_ids = sorted(eos_token_ids)
        self.think = think
        self.counts: TokenCounts | None = None  # made at the first row that needs it
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, slots)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """`logits` [n, vocab] with row i changed as `seqs[i]` asks: a new float32 tensor
        when some row changes, else `logits` itself."""
        self._pending = None
        rows = [i for i, seq in enumerate(seqs) if seq.params.processes_logits]
        forced = [i for i, s in enumerate(seqs) if must_end_thinking(s)] if self.think else []
        if not rows and not forced:
            return logits
        out = logits.float() if logits.dtype != torch.float32 else logits.clone()
        if rows:
            index = upload(torch.tensor(rows), logits.device)
            out[index] = self._process(out[index], [seqs[i] for i in rows], index)
        if forced:
            assert self.think is not None
            index = upload(torch.tensor(forced), logits.device)
            out[index] = float("-inf")
            out[index, self.think.end] = 0.0
        return out

    def accept(self, tokens: torch.Tensor) -> None:
        """The step's sampled tokens [n] (on the device): counted for the rows that keep counts."""
        if self._pending is not None and self.counts is not None:
            rows, slots = self._pending
            self.counts.add(slots, tokens[rows])
        self._pending = None

    def _process(self, x: torch.Tensor, seqs: list[Sequence], rows: torch.Tensor) -> torch.Tensor:
        """Rows `x` [r, vocab] float32 of `seqs` (at logits rows `rows`), changed."""
        params = [s.params for s in seqs]
        bias = any(p.logit_bias for p in params)
        repetition = any(p.repetition_penalty != 1 for p in params)
        penalties = any(p.presence_penalty or p.frequency_penalty for p in params)
        if bias or repetition or penalties:
            if self.counts is None:
                self.counts = TokenCounts(x.shape[-1], x.device)
            slots = self.counts.slots(seqs)
            self._pending = (rows, slots)
            values = [
                (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) for p in params
            ]
            per_row = upload(torch.tensor(values, dtype=torch.float32), x.device)  # [r, 3]
            if bias:
                x = x + self.counts["bias"][slots]
            if repetition:
                penalty = per_row[:, :1]
                seen = self.counts["seen"][slots]
                x = torch.where(seen, torch.where(x < 0, x * penalty, x / penalty), x)
            if penalties:
                counts = self.counts["counts"][slots].float()
                presence, frequency = per_row[:, 1:2], per_row[:, 2:3]
                x = x - counts * frequency - (counts > 0).float() * presence
        return self._min_tokens(x, seqs)

    def _min_tokens(self, x: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """EOS and the stop token ids at -inf in the rows of sequences short of min_tokens."""
        pairs = [
            (j, token)
            for j, seq in enumerate(seqs)
            if seq.num_output_tokens < seq.params.min_tokens
            for token in (*self.eos_token_ids, *seq.params.stop_token_ids)
            if token < x.shape[-1]
        ]
        if pairs:
            at = upload(torch.tensor(pairs), x.device)
            x[at[:, 0], at[:, 1]] = float("-inf")
        return x
