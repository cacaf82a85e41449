"""What rank 0 and a tensor-parallel worker say to each other, and how (engine/tensor_parallel.py).

Messages travel over a pipe per worker, plain-pickled (`send`, `receive`); a `Batch` goes
as it is on CPU, its tensors moved to the host and back (`portable`) on CUDA.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import pickle
import signal
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

import torch

from pagedbatch.engine.batch import Batch
from pagedbatch.engine.block_manager import BlockCopy
from pagedbatch.engine.config import EngineConfig
from pagedbatch.engine.kv_cache import KVCacheSpec

TIMEOUT_SECONDS = 60.0  # a collective or the start waiting longer ends the job


def collective_timeout() -> timedelta:
    """How long a rank waits in a collective (or for the others to start):
    PAGEDBATCH_TP_TIMEOUT seconds, else TIMEOUT_SECONDS. Rank 0 reads it; workers get its."""
    return timedelta(seconds=float(os.environ.get("PAGEDBATCH_TP_TIMEOUT", TIMEOUT_SECONDS)))


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to join the group and load its shard (its first message)."""

    config: EngineConfig
    rank: int
    world_size: int
    store_port: int
    threads: int | None
    timeout: timedelta


@dataclass(frozen=True)
class Joining:
    """A worker has imported everything and joins the process group now: rank 0 waits for
    this on the pipes (as long as the worker lives), so the group's rendezvous, timed
    by the collective timeout, never waits for a slow start."""


@dataclass(frozen=True)
class Loaded:
    """A worker loaded its shard: memory free on its device before, and its weight bytes."""

    free_before: int
    weight_bytes: int


@dataclass(frozen=True)
class Failed:
    """A worker's last word: why it stops (one line)."""

    message: str


@dataclass(frozen=True)
class StartEngine:
    """The KV pool every rank allocates (same block ids, each rank its own KV heads)."""

    spec: KVCacheSpec
    num_blocks: int
    max_model_len: int


@dataclass(frozen=True)
class Step:
    """One step's inputs: the copy-on-write block copies, then the batch to run."""

    copies: list[BlockCopy]
    batch: Batch


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r's device: cuda:r on CUDA, the CPU otherwise."""
    return torch.device("cuda", rank) if device.type == "cuda" else device


@contextlib.contextmanager
def local_rank_env(rank: int):
    """transformers reads LOCAL_RANK to place a sharded model; set it around a load only."""
    before = os.environ.get("LOCAL_RANK")
    os.environ["LOCAL_RANK"] = str(rank)
    try:
        yield
    finally:
        if before is None:
            del os.environ["LOCAL_RANK"]
        else:
            os.environ["LOCAL_RANK"] = before


def portable(obj: Any, device: torch.device) -> Any:
    """`obj` (a Batch and what it holds) with every tensor and device moved to `device`
    (frozen dataclasses rebuilt, so no cached property of the other device survives)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, torch.device):
        return device
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: portable(getattr(obj, f.name), device) for f in dataclasses.fields(obj)}
        return dataclasses.replace(obj, **changes)
    if isinstance(obj, tuple | list):
        return type(obj)(portable(x, device) for x in obj)
    return obj


def send(pipe: Connection, message: Any) -> None:
    """Plain pickle (tensors by value): `Connection.send` would pass tensors through shared
    memory, whose handshake needs a multiprocessing-started peer."""
    pipe.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def receive(pipe: Connection) -> Any:
    return pickle.loads(pipe.recv_bytes())


def die_with_parent() -> None:
    """Have the kernel kill this process when its parent dies (Linux; elsewhere the pipe's
    end-of-file stops a worker waiting for a step)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
