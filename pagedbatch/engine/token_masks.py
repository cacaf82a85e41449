"""The step's token mask of structured output: filled on the host, applied to the logits.

Each step, `TokenMasks.fill` asks the matchers of the constrained rows (constraints.py) for
the tokens they allow, as an xgrammar bitmask on the host (a 1 bit for each allowed
token). On CUDA this runs while the forward computes (the forward is asynchronous; nothing
waited on the logits yet) and goes up in one asynchronous copy. The sampler applies it to
the logits before sampling (`StepMask.apply`: the allowed tokens' logits kept, the others
-inf, on the rows of constrained sequences only, greedy and sampled alike); then each
matcher accepts its row's token (`TokenMasks.accept`). A step with no constrained sequence
does none of this; decode steps replayed from CUDA graphs are masked as eager ones are (the
mask is applied to the graph's logits).
"""

from __future__ import annotations

import time
from collections.abc import Sequence as Seq

import torch

from pagedbatch.engine.sequence import Sequence


class TokenMasks:
    """The engine's side of the masks: the step's bitmask buffer and the time they took."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.active = False  # a constrained sequence may run (set by Engine.add)
        self.seconds = 0.0  # host time filling and applying masks
        self.steps = 0  # steps that masked some row
        self._host = torch.zeros((0, 0), dtype=torch.int32)

    def fill(self, seqs: Seq[Sequence]) -> StepMask | None:
        """The mask of the rows of `seqs` (one logits row each) whose sequence is
        constrained; None when none is."""
        if not self.active:
            return None
        rows = [i for i, s in enumerate(seqs) if s.matcher is not None]
        if not rows:
            return None
        started = time.perf_counter()
        host = self._buffer(len(seqs), seqs[rows[0]].matcher.words)
        for i in rows:
            seqs[i].matcher.fill(host, i)
        bits = host[: len(seqs)]
        if self.device.type != "cpu":
            bits = bits.to(self.device, non_blocking=True)
        self.steps += 1
        self.seconds += time.perf_counter() - started
        return StepMask(bits, None if len(rows) == len(seqs) else rows, self)

    def accept(self, seqs: Seq[Sequence], tokens: Sequence[int]) -> None:
        """Advance each constrained sequence's matcher over its sampled token."""
        if self.active:
            for seq, token in zip(seqs, tokens, strict=True):
                if seq.matcher is not None:
                    seq.matcher.accept(token)

    def _buffer(self, rows: int, words: int) -> torch.Tensor:
        """The host bitmask buffer, at least `rows` rows of `words` (pinned for CUDA
        copies; the last step's copy is done: its sampled tokens were read)."""
        if self._host.shape[0] < rows or self._host.shape[1] != words:
            size = max(rows, 2 * self._host.shape[0])
            pin = self.device.type == "cuda"
            self._host = torch.zeros((size, words), dtype=torch.int32, pin_memory=pin)
        return self._host


class StepMask:
    """One step's bitmask: row i of `bits` [rows, words] (on the logits' device) holds
    the tokens logits row i may take, for the `rows` listed (None: all)."""

    def __init__(self, bits: torch.Tensor, rows: list[int] | None, owner: TokenMasks) -> None:
        self.bits = bits
        self.rows = rows
        self._owner = owner

    def apply(self, logits: torch.Tensor) -> None:
        """Set every token the mask does not allow to -inf in `logits` [rows, vocab], in
        place (xgrammar's kernel: C++ on CPU, Triton on CUDA)."""
        import xgrammar

        started = time.perf_counter()
        xgrammar.apply_token_bitmask_inplace(logits, self.bits, indices=self.rows)
        self._owner.seconds += time.perf_counter() - started
