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
        place. xgrammar's kernel (Triton on CUDA, C++ on CPU) writes each masked entry; on
        CPU a row that allows few tokens (a label's, a number's) is filled with -inf and
        its allowed logits put back instead, several times faster there."""
        import xgrammar

        started = time.perf_counter()
        rows = self.rows
        with torch.inference_mode():  # the forward's logits are inference tensors
            if logits.device.type == "cpu":
                rows = _keep_sparse_rows(logits, self.bits, rows)
            if rows is None or rows:
                xgrammar.apply_token_bitmask_inplace(logits, self.bits, indices=rows)
        self._owner.seconds += time.perf_counter() - started


# A row whose allowed tokens lie in at most 1/_SPARSE of its bitmask words is sparse.
_SPARSE = 8
_BITS = torch.arange(32, dtype=torch.int32)


def _keep_sparse_rows(
    logits: torch.Tensor, bits: torch.Tensor, rows: list[int] | None
) -> list[int]:
    """Mask the sparse rows among `rows` (None: all) of `logits` by keeping their allowed
    entries alone; return the rows left to mask."""
    index = torch.arange(bits.shape[0]) if rows is None else torch.tensor(rows)
    words = bits[index]  # [k, words]
    sparse = (words != 0).sum(dim=1) * _SPARSE <= words.shape[1]
    if sparse.any():
        sparse_rows, words = index[sparse], words[sparse]
        r, w = words.nonzero(as_tuple=True)  # the words holding allowed tokens
        hit = (words[r, w][:, None] >> _BITS).bitwise_and_(1).bool()  # [m, 32]
        e, b = hit.nonzero(as_tuple=True)
        at_rows, at_tokens = sparse_rows[r[e]], w[e] * 32 + b
        inside = at_tokens < logits.shape[1]
        at_rows, at_tokens = at_rows[inside], at_tokens[inside]
        kept = logits[at_rows, at_tokens]
        logits.index_fill_(0, sparse_rows, float("-inf"))
        logits[at_rows, at_tokens] = kept
    return index[~sparse].tolist()
