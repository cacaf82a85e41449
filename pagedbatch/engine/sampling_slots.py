"""Each running sequence's sampling params in a row of host arrays, written when it joins.

The row is the sequence's row of the block tables (`BlockTables.row`): the model runner
already has it for every scheduled sequence, so a step gathers its sampling rows' params
with numpy (no loop over the sequences, nothing rebuilt from their SamplingParams) and
uploads them in one copy. A sequence writes its row when it joins the running set
(admitted, or forked); a row it leaves keeps stale values until the next sequence that
takes it joins.
"""

from __future__ import annotations

import numpy as np

from pagedbatch.engine.sampler import RowParams, int64_bits
from pagedbatch.engine.sequence import Sequence
from pagedbatch.engine.staging import Uploads

# Each array's value in a row nobody has joined (and its dtype).
_FIELDS = {
    "seed": (0, np.int64),  # the seed's low 64 bits
    "top_k": (0, np.int64),
    "temperature": (0.0, np.float64),
    "top_p": (1.0, np.float64),
    "min_p": (0.0, np.float64),
    "logprobs": (-1, np.int64),  # alternatives per token; -1: no logprobs
    "max_len": (0, np.int64),
    "ignore_eos": (False, np.bool_),
    # stop strings, stop token ids or a constraint: StopChecker.check every step
    "has_stop": (False, np.bool_),
    "processes": (False, np.bool_),  # the LogitsProcessor changes its logits
}


class SamplingSlots:
    """Per block-table row: how its sequence samples (seed, top-k, temperature, top-p,
    min-p, logits changes), reports (logprobs) and stops (max_len, ignore_eos, stop
    strings, stop token ids, a constraint's end)."""

    def __init__(self, num_rows: int = 8) -> None:
        for name, (fill, dtype) in _FIELDS.items():
            setattr(self, name, np.full(max(num_rows, 1), fill, dtype=dtype))
        # Rows (any, left or not) that sample at random, ask for logprobs, have stop
        # strings, heed EOS, have their logits changed: when none does, a step skips that
        # work without a look.
        self.num_random = self.num_logprobs = self.num_stop = self.num_eos = 0
        self.num_processes = 0

    def join(self, row: int, seq: Sequence) -> None:
        """`seq` runs in `row` from now on."""
        if row >= len(self.seed):
            self._grow(max(row + 1, 2 * len(self.seed)))
        self._count(row, -1)
        p = seq.params
        self.seed[row] = int64_bits(seq.seed)
        self.top_k[row], self.temperature[row], self.top_p[row] = p.top_k, p.temperature, p.top_p
        self.min_p[row] = p.min_p
        self.logprobs[row] = -1 if p.logprobs is None else p.logprobs
        self.max_len[row], self.ignore_eos[row] = seq.max_len, p.ignore_eos
        self.has_stop[row] = bool(p.stop or p.stop_token_ids) or seq.matcher is not None
        self.processes[row] = p.processes_logits
        self._count(row, 1)

    def _count(self, row: int, sign: int) -> None:
        self.num_random += sign * bool(self.temperature[row] > 0)
        self.num_logprobs += sign * bool(self.logprobs[row] >= 0)
        self.num_stop += sign * bool(self.has_stop[row])
        self.num_eos += sign * (self.max_len[row] > 0 and not self.ignore_eos[row])
        self.num_processes += sign * bool(self.processes[row])

    def packed(self, rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """[n, 6] int64 for the rows `rows` sampling at `positions`: seed, position, top-k,
        then temperature, top-p and min-p as float64 bits (the sampler's `RowParams.packed`)."""
        return np.stack(
            [
                self.seed[rows],
                positions,
                self.top_k[rows],
                self.temperature[rows].view(np.int64),
                self.top_p[rows].view(np.int64),
                self.min_p[rows].view(np.int64),
            ],
            axis=1,
        )

    def row_params(
        self, rows: np.ndarray, positions: np.ndarray, vocab_size: int, uploads: Uploads
    ) -> RowParams | None:
        """The sampler's params for sampling rows `rows` at `positions`, on the device;
        None when every one of them is greedy."""
        if not self.num_random:
            return None
        random = self.temperature[rows] > 0
        if not random.any():
            return None
        top_k, top_p = self.top_k[rows][random], self.top_p[rows][random]
        min_p = bool((self.min_p[rows][random] > 0).any())
        if not ((top_k > 0) | (top_p < 1)).any():
            width = None
        elif (top_k > 0).all():  # the rule of `sampler.sort_width`, on arrays
            width = min(vocab_size, int(top_k.max()))
        else:
            width = vocab_size
        return RowParams(uploads.put(self.packed(rows, positions)), width, min_p)

    def _grow(self, num_rows: int) -> None:
        for name, (fill, dtype) in _FIELDS.items():
            old = getattr(self, name)
            new = np.full(num_rows, fill, dtype=dtype)
            new[: len(old)] = old
            setattr(self, name, new)
