"""A step's host-device copies through pinned buffers allocated once: uploads and the one
readback.

On CUDA an asynchronous copy needs page-locked host memory (from pageable memory CUDA
copies through a staging buffer of its own, and a blocking copy waits for the device).
Pinning a new tensor every step costs a page-locked allocation; these buffers are
allocated once, grown when a step needs more, and reused. Before a buffer is written
again, the event recorded after its last copy is waited for (long done in practice: the
step that used it has been read back since). On the CPU there is nothing to copy: an
upload is the array itself and a readback the tensor's own memory.
"""

from __future__ import annotations

import numpy as np
import torch

_ALIGN = 8  # bytes: every upload starts on a boundary that any dtype it holds can view


class Uploads:
    """Host-to-device copies: each step's go through one of two pinned byte buffers (in
    turn, so a step may be prepared while the last one's copies run)."""

    def __init__(self, device: torch.device, nbytes: int = 1 << 16) -> None:
        self.device = device
        self._pinned = device.type == "cuda"
        self._buffers = [_Pinned(nbytes), _Pinned(nbytes)] if self._pinned else []
        self._turn = 0

    def begin_step(self) -> None:
        """Start a step's uploads in the other buffer (waiting for its last copies)."""
        if self._pinned:
            self._turn ^= 1
            self._buffers[self._turn].rewind()

    def put(self, array: np.ndarray) -> torch.Tensor:
        """`array` on the device (an asynchronous copy from the pinned buffer on CUDA; the
        array itself, shared, on the CPU: the caller must not change it afterwards)."""
        if not self._pinned:
            return torch.from_numpy(array)
        return self._buffers[self._turn].upload(np.ascontiguousarray(array), self.device)


class _Pinned:
    """A pinned byte buffer filled front to back within a step."""

    def __init__(self, nbytes: int) -> None:
        self.bytes = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        self.host = self.bytes.numpy()
        self.used = 0
        self.event: torch.cuda.Event | None = None

    def rewind(self) -> None:
        if self.event is not None:
            self.event.synchronize()
        self.used = 0

    def upload(self, array: np.ndarray, device: torch.device) -> torch.Tensor:
        start = -(-self.used // _ALIGN) * _ALIGN
        end = start + array.nbytes
        if end > len(self.host):
            self._grow(end)
            start, end = 0, array.nbytes
        self.host[start:end] = array.reshape(-1).view(np.uint8)
        self.used = end
        dtype = torch.from_numpy(array[:0]).dtype
        staged = self.bytes[start:end].view(dtype).view(array.shape)
        on_device = staged.to(device, non_blocking=True)
        if self.event is None:
            self.event = torch.cuda.Event()
        self.event.record()
        return on_device

    def _grow(self, nbytes: int) -> None:
        """A bigger buffer: the old one stays alive until its copies ran (torch's pinned
        allocator holds a block until the copies that read it are done)."""
        self.bytes = torch.empty(
            max(nbytes, 2 * len(self.host)), dtype=torch.uint8, pin_memory=True
        )
        self.host = self.bytes.numpy()
        self.used = 0


class Readback:
    """The step's one device-to-host copy: int32 and float32 tensors packed into one int32
    tensor, copied into a pinned buffer allocated once, waited for on an event (the step's
    only wait for the device)."""

    def __init__(self, device: torch.device, size: int = 1 << 12) -> None:
        self._pinned = device.type == "cuda"
        self._host: torch.Tensor | None = None
        self._event: torch.cuda.Event | None = None
        if self._pinned:
            self._allocate(size)

    def fetch(self, parts: list[torch.Tensor]) -> list[np.ndarray]:
        """Each of `parts` (int32, int64 with values that fit int32, or float32; any shape)
        on the host, flattened: int32 or float32 arrays, valid until the next fetch."""
        if len(parts) == 1 and not self._pinned:  # the tokens alone, already on the host
            return [parts[0].reshape(-1).numpy()]
        packed = torch.cat([_as_int32(p).reshape(-1) for p in parts])
        if self._pinned:
            if packed.numel() > self._host.numel():
                self._allocate(2 * packed.numel())
            host = self._host[: packed.numel()]
            host.copy_(packed, non_blocking=True)
            self._event.record()
            self._event.synchronize()
            flat = self._host_np[: packed.numel()]
        else:
            flat = packed.numpy()
        out, start = [], 0
        for part in parts:
            end = start + part.numel()
            chunk = flat[start:end]
            out.append(chunk.view(np.float32) if part.dtype == torch.float32 else chunk)
            start = end
        return out

    def _allocate(self, size: int) -> None:
        self._host = torch.empty(size, dtype=torch.int32, pin_memory=True)
        self._host_np = self._host.numpy()
        self._event = torch.cuda.Event()


def _as_int32(part: torch.Tensor) -> torch.Tensor:
    if part.dtype == torch.float32:
        return part.view(torch.int32)
    return part.to(torch.int32)
