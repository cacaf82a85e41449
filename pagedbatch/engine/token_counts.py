"""What the penalties and the logit bias need of each sequence, kept on the device.

A sequence that asks for a repetition, presence or frequency penalty or a logit bias gets a
slot (a row) in each tensor it needs, when it first samples: `seen` marks the tokens of
its prompt and output (the repetition penalty's), `counts` counts its output tokens (the
presence and frequency penalties'), `bias` holds its logit bias. The slot is filled once
from the sequence's tokens, then each sampled token is added on the device (`add`): no
step rebuilds them from the sequence's token list. A preempted sequence keeps its slot
(recomputing its tokens samples none), so its counts are those of its own tokens alone, in
any batch. The slot of a finished sequence is taken back when a slot is next needed.
"""

from __future__ import annotations

import numpy as np
import torch

from pagedbatch.engine.sampler import upload
from pagedbatch.engine.sequence import Sequence

_KINDS = {"seen": torch.bool, "counts": torch.int32, "bias": torch.float32}


class TokenCounts:
    """Per-sequence rows of token marks, counts and biases, `vocab_size` wide, on `device`."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.tensors: dict[str, torch.Tensor] = {}  # kind -> [capacity, vocab], made when needed
        self._owners: list[Sequence | None] = []  # slot -> the sequence holding it
        self._slot: dict[int, int] = {}  # seq_id -> slot
        self._free: list[int] = []
        self._capacity = 0  # rows of every tensor: at least the slots

    def __getitem__(self, kind: str) -> torch.Tensor:
        return self.tensors[kind]

    def slots(self, seqs: list[Sequence]) -> torch.Tensor:
        """The slot of each of `seqs` [len(seqs)] int64 on the device (a sequence new
        here gets one, filled from its tokens)."""
        slots = []
        for seq in seqs:
            slot = self._slot.get(seq.seq_id)
            if slot is None:
                slot = self._take(seq)
                self._fill(slot, seq)
            slots.append(slot)
        return upload(torch.tensor(slots), self.device)

    def add(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """Each slot's sequence sampled its token in `tokens` (both on the device)."""
        if "seen" in self.tensors:
            self.tensors["seen"][slots, tokens] = True
        if "counts" in self.tensors:
            self.tensors["counts"][slots, tokens] += 1  # one token a slot: no repeated index

    def _take(self, seq: Sequence) -> int:
        """A slot for `seq`: a free one, one a finished sequence held, or a new one."""
        if not self._free:
            for slot, owner in enumerate(self._owners):
                if owner is not None and owner.is_finished:
                    del self._slot[owner.seq_id]
                    self._owners[slot] = None
                    self._free.append(slot)
        if not self._free:
            self._free.append(len(self._owners))
            self._owners.append(None)
            if len(self._owners) > self._capacity:
                self._grow(max(16, 2 * self._capacity))
        slot = self._free.pop()
        self._owners[slot] = seq
        self._slot[seq.seq_id] = slot
        return slot

    def _fill(self, slot: int, seq: Sequence) -> None:
        """Slot `slot` as `seq`'s tokens and params make it, in the tensors it needs."""
        params = seq.params
        if params.repetition_penalty != 1:
            seen = self._tensor("seen")
            seen[slot] = False
            seen[slot, self._ids(seq.token_ids)] = True
        if params.presence_penalty or params.frequency_penalty:
            counts = self._tensor("counts")
            counts[slot] = 0
            output = self._ids(seq.output_ids)
            counts[slot].index_add_(0, output, torch.ones_like(output, dtype=torch.int32))
        if params.logit_bias or "bias" in self.tensors:  # a bias row is added as it is
            bias = self._tensor("bias")
            bias[slot] = 0.0
        if params.logit_bias:
            tokens, values = zip(*params.logit_bias, strict=True)
            bias[slot, self._ids(tokens)] = upload(torch.tensor(values), self.device)

    def _tensor(self, kind: str) -> torch.Tensor:
        """The `kind` tensor (made at the first sequence that needs it)."""
        if kind not in self.tensors:
            self.tensors[kind] = self._zeros(self._capacity, kind)
        return self.tensors[kind]

    def _grow(self, capacity: int) -> None:
        """Every tensor with `capacity` rows, the new ones zero."""
        for kind, tensor in self.tensors.items():
            grown = self._zeros(capacity, kind)
            grown[: len(tensor)] = tensor
            self.tensors[kind] = grown
        self._capacity = capacity

    def _zeros(self, rows: int, kind: str) -> torch.Tensor:
        shape = (rows, self.vocab_size)
        return torch.zeros(shape, dtype=_KINDS[kind], device=self.device)

    def _ids(self, token_ids) -> torch.Tensor:
        """Token ids on the device, int64."""
        host = torch.from_numpy(np.asarray(token_ids, dtype=np.int64))
        return upload(host, self.device)
