"""Every block table in one array, a row per sequence, mirrored on the device in place."""

from __future__ import annotations

import numpy as np
import torch

from pagedbatch.engine.staging import Uploads


class BlockTables:
    """Rows of physical block ids, `[num_rows, width]` int32, one row per sequence that holds
    blocks; the BlockManager writes a row's entries as the sequence's table changes.

    The device copy is updated in place: only rows written since the last `device()` call
    travel (one host-to-device copy), so a step's batch reads its block tables by row
    with no table rebuilt on the host. On the CPU the device copy is the array itself.
    Rows and width grow (doubling) if a sequence needs more; the device copy is then
    made anew (a step gathers its rows from the current copy; CUDA graphs copy those into
    buffers of their own, so none holds the old one).
    """

    def __init__(self, num_rows: int = 8, width: int = 8) -> None:
        self.host = np.zeros((max(num_rows, 1), max(width, 1)), dtype=np.int32)
        self._free_rows = list(range(self.host.shape[0]))[::-1]  # pop() gives row 0 first
        self._row_of: dict[int, int] = {}
        self._dirty: set[int] = set()
        self._device: torch.Tensor | None = None

    @property
    def width(self) -> int:
        return self.host.shape[1]

    def row(self, seq_id: int) -> int:
        return self._row_of[seq_id]

    def rows(self, seq_ids: list[int]) -> np.ndarray:
        """The rows of `seq_ids` [n] int64."""
        row_of = self._row_of
        return np.array([row_of[i] for i in seq_ids], dtype=np.int64)

    def write(self, seq_id: int, start: int, blocks: list[int]) -> None:
        """Entries `start ..` of the sequence's table are now `blocks` (a row if it had none)."""
        row = self._row_of.get(seq_id)
        if row is None:
            row = self._row_of[seq_id] = self._take_row()
        end = start + len(blocks)
        if end > self.width:
            self._grow(self.host.shape[0], max(end, 2 * self.width))
        self.host[row, start:end] = blocks
        self._dirty.add(row)

    def release(self, seq_id: int) -> None:
        """The sequence holds no blocks any more: its row is free (its entries are stale)."""
        row = self._row_of.pop(seq_id, None)
        if row is not None:
            self._free_rows.append(row)

    def device(self, uploads: Uploads) -> torch.Tensor:
        """`[num_rows, width]` int32 on the uploads' device, current with every write so
        far (the rows written since the last call go up through `uploads`)."""
        device = uploads.device
        if self._device is None or self._device.device != device:
            self._device = self._new_device_copy(uploads)
        elif self._dirty and device.type != "cpu":
            rows = np.fromiter(self._dirty, dtype=np.int64, count=len(self._dirty))
            self._device.index_copy_(0, uploads.put(rows), uploads.put(self.host[rows]))
        self._dirty.clear()
        return self._device

    def _new_device_copy(self, uploads: Uploads) -> torch.Tensor:
        if uploads.device.type == "cpu":
            return torch.from_numpy(self.host)  # shares memory: writes show at once
        return uploads.put(self.host)

    def _take_row(self) -> int:
        if not self._free_rows:
            rows = self.host.shape[0]
            self._grow(2 * rows, self.width)
        return self._free_rows.pop()

    def _grow(self, num_rows: int, width: int) -> None:
        old = self.host
        self.host = np.zeros((num_rows, width), dtype=np.int32)
        self.host[: old.shape[0], : old.shape[1]] = old
        self._free_rows = list(range(num_rows - 1, old.shape[0] - 1, -1)) + self._free_rows
        self._device = None  # remade, whole, at the next device() call
        self._dirty.clear()
