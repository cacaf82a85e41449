"""Tensor parallelism on torch.distributed: one model sharded over N ranks of one node.

Rank 0 is this process: it owns the block tables, the scheduler, the radix cache and the
sampler, exactly as without tensor parallelism. Ranks 1..N-1 are worker processes
(engine/tp_worker.py) that hold their shard of every weight and the KV blocks of their own
KV heads (the same block ids as rank 0, so one block table serves every rank). Each step,
rank 0 sends the step's block copies and its `Batch` to every worker over a pipe, then all
ranks run the same forward; the model's collectives (gloo on CPU, NCCL on CUDA) join them
inside it. The weights are sharded by the architecture's own transformers plan
(`base_model_tp_plan`: attention heads and MLP columnwise, `o_proj` and `down_proj`
rowwise with an all-reduce, the LM head gathered to full-vocab logits), so what runs is
the model's own code with fewer heads per rank.

A rank that dies ends the job: its pipe closes or a collective fails (a dead peer at
once, a stuck one after `collective_timeout()`), and rank 0 raises `TensorParallelError` naming the
rank; the job layer keeps every line written before. A worker whose parent dies is
killed by the kernel (PR_SET_PDEATHSIG) and sees its pipe close. Workers' stderr is
discarded (their reasons come back as `Failed`) unless PAGEDBATCH_TP_DEBUG is set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed as dist

from pagedbatch.engine.attention import PagedAttention
from pagedbatch.engine.batch import Batch
from pagedbatch.engine.block_manager import BlockCopy, BlockManager
from pagedbatch.engine.config import EngineConfig
from pagedbatch.engine.kv_cache import KVCacheSpec
from pagedbatch.engine.model_runner import ModelRunner
from pagedbatch.engine.scheduler import SchedulerOutput
from pagedbatch.engine.tp_protocol import (
    Failed,
    Joining,
    Loaded,
    StartEngine,
    Step,
    WorkerSpec,
    backend_for,
    collective_timeout,
    local_rank_env,
    portable,
    rank_device,
    receive,
    send,
)
from pagedbatch.engine.tp_shards import (
    local_weight_bytes,
    pool_blocks,
    support_problem,
)

_EXIT_GRACE = 3.0  # seconds rank 0 waits for a failing worker to say why, or exit


class TensorParallelError(Exception):
    """A rank failed or died; the message is one line naming it."""


class TensorParallel:
    """Rank 0's side of the group: the worker processes, their pipes and the process group.

    Start it before loading the model (the workers load theirs meanwhile), then
    `load_model`, `size_pool`, `start_engines`; the engine's `TensorParallelRunner` sends
    each step. `close()` stops the workers and leaves torch.distributed uninitialised.
    """

    def __init__(self, config: EngineConfig) -> None:
        if dist.is_initialized():
            raise ValueError(
                "tensor_parallel needs this process's torch.distributed to itself: another "
                "tensor-parallel LLM is open (close() it) or the caller initialised it"
            )
        self.config = config
        self.world_size = n = config.tensor_parallel
        self.device = rank_device(config.torch_device, 0)
        if self.device.type == "cuda" and torch.cuda.device_count() < n:
            raise ValueError(
                f"tensor_parallel {n} needs {n} GPUs, torch sees {torch.cuda.device_count()}"
            )
        self.closed = False
        self.failed: TensorParallelError | None = None
        self.timeout = timeout = collective_timeout()
        store = dist.TCPStore("127.0.0.1", 0, n, is_master=True, timeout=timeout,
                              wait_for_workers=False)  # fmt: skip
        threads = config.torch_threads  # measured once, here: the ranks' count
        # Every rank runs the dtype rank 0 resolved (auto: from this process's view of the CPU).
        config = config.replace(dtype=str(config.torch_dtype).removeprefix("torch."))
        self.workers: list[subprocess.Popen] = []
        self.pipes: list[Connection] = []
        try:
            for rank in range(1, n):
                self._spawn(WorkerSpec(config, rank, n, store.port, threads, timeout))
            for rank in range(1, n):
                self._receive(rank, Joining)
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(
                backend_for(self.device), store=store, rank=0, world_size=n, timeout=timeout
            )
            from torch.distributed.device_mesh import init_device_mesh

            self.mesh = init_device_mesh(self.device.type, (n,))
        except Exception as e:
            raise self.failure(e) from e
        threading.Thread(target=self._watch, name="pagedbatch-tp-watchdog", daemon=True).start()

    def _watch(self) -> None:
        """Notice a worker's death while this rank may wait in a collective: NCCL would wait
        out the timeout, so its group is aborted at once and the collective fails (gloo
        fails by itself, as the dead peer's sockets close)."""
        while not self.closed:
            if any(worker.poll() is not None for worker in self.workers):
                if self.device.type == "cuda":
                    with contextlib.suppress(Exception):
                        dist.distributed_c10d._abort_process_group()
                return
            time.sleep(0.2)

    def _spawn(self, spec: WorkerSpec) -> None:
        ours, theirs = Pipe()
        env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        worker = subprocess.Popen(
            [sys.executable, "-m", "pagedbatch.engine.tp_worker", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=None if os.environ.get("PAGEDBATCH_TP_DEBUG") else subprocess.DEVNULL,
            env=env,
        )  # fmt: skip
        theirs.close()
        self.workers.append(worker)
        self.pipes.append(ours)
        send(ours, spec)

    def load_model(self, **kw: Any):
        """Rank 0's shard of the model (and the tokenizer): models.loader.load_model."""
        from pagedbatch.models.loader import load_model

        with local_rank_env(0):
            return load_model(self.config.model, device_mesh=self.mesh, **kw)

    def size_pool(
        self, spec: KVCacheSpec, model: torch.nn.Module, free: int
    ) -> tuple[KVCacheSpec, int]:
        """Each rank's KV spec and the pool's blocks (tp_shards.pool_blocks), from every
        rank's weights and, on CUDA, the least memory free before loading."""
        reports = [self._receive(rank, Loaded) for rank in range(1, self.world_size)]
        if self.device.type != "cpu":  # the GPU with least room decides
            free = min([free, *(r.free_before for r in reports)])
        weights = max([local_weight_bytes(model), *(r.weight_bytes for r in reports)])
        return pool_blocks(spec, self.config, self.device, weights, free)

    def start_engines(self, spec: KVCacheSpec, num_blocks: int, max_model_len: int) -> None:
        """Every worker allocates its KV pool and waits for steps."""
        self._broadcast(StartEngine(spec, num_blocks, max_model_len))

    def send(self, copies: list[BlockCopy], batch: Batch) -> None:
        """The step's inputs to every worker (scoring stays on rank 0)."""
        batch = dataclasses.replace(batch, scores=None)
        if self.device.type != "cpu":
            batch = portable(batch, torch.device("cpu"))
        self._broadcast(Step(copies, batch))

    def _broadcast(self, message: Any) -> None:
        if self.failed is not None:
            raise self.failed
        try:
            for pipe in self.pipes:
                send(pipe, message)
        except OSError as e:
            raise self.failure(e) from e

    def _receive(self, rank: int, kind: type) -> Any:
        try:
            message = receive(self.pipes[rank - 1])
        except (OSError, EOFError) as e:
            raise self.failure(e) from e
        if isinstance(message, Failed):
            raise self.failure(reason=f"rank {rank} failed: {message.message}")
        if not isinstance(message, kind):
            raise self.failure(reason=f"rank {rank} sent {type(message).__name__}")
        return message

    def failure(
        self, error: BaseException | None = None, reason: str | None = None
    ) -> TensorParallelError:
        """The one-line error of a failed step or start: `reason`, else which rank failed
        and how (a worker's own reason, its exit), else `error`. Ends the group."""
        if self.failed is not None:
            return self.failed
        deadline = time.monotonic() + _EXIT_GRACE
        while reason is None and time.monotonic() < deadline:
            reason = self._worker_reason()
            if reason is None:
                time.sleep(0.05)
        if reason is None and "timed out" in str(error).lower():
            reason = (
                f"a collective waited longer than {self.timeout.total_seconds():.0f} s: a rank "
                "is stuck or too slow (PAGEDBATCH_TP_TIMEOUT sets the limit)"
            )
        if reason is None:
            lines = str(error).strip().splitlines()
            reason = f"a collective failed ({type(error).__name__}: {lines[0] if lines else ''})"
        self.failed = TensorParallelError(f"tensor parallel stopped: {reason}")
        self.close()
        return self.failed

    def _worker_reason(self) -> str | None:
        """The first worker's reason to stop: a Failed message, or its exit."""
        for rank, (worker, pipe) in enumerate(zip(self.workers, self.pipes), start=1):
            with contextlib.suppress(OSError, EOFError):
                if pipe.poll():
                    message = receive(pipe)
                    if isinstance(message, Failed):
                        return f"rank {rank} failed: {message.message}"
            code = worker.poll()
            if code is not None:
                return f"rank {rank} (pid {worker.pid}) {_exit_text(code)}"
        return None

    def close(self) -> None:
        """Stop the workers (a goodbye, then SIGKILL after a grace) and the process group."""
        if self.closed:
            return
        self.closed = True
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                send(pipe, None)
        deadline = time.monotonic() + _EXIT_GRACE
        for worker in self.workers:
            try:
                worker.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        for pipe in self.pipes:
            pipe.close()
        if self.failed is not None:  # a peer is gone: nothing may wait for it
            with contextlib.suppress(Exception):
                dist.distributed_c10d._abort_process_group()
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()

    def runner(self, model, attention: PagedAttention, block_manager: BlockManager,
               cascade: bool = False) -> TensorParallelRunner:  # fmt: skip
        """The engine's model runner (Engine's `make_runner`)."""
        return TensorParallelRunner(model, attention, block_manager, cascade, group=self)


class TensorParallelRunner(ModelRunner):
    """Rank 0's runner: sends each prepared step to the workers; a collective that fails
    raises the group's TensorParallelError."""

    def __init__(self, model, attention: PagedAttention, block_manager: BlockManager,
                 cascade: bool = False, *, group: TensorParallel) -> None:  # fmt: skip
        super().__init__(model, attention, block_manager, cascade)
        self.group = group

    def prepare(self, out: SchedulerOutput) -> Batch:
        batch = super().prepare(out)
        self.group.send(out.copies, batch)
        return batch

    def forward(self, batch: Batch) -> torch.Tensor:
        try:
            return super().forward(batch)
        except (RuntimeError, OSError) as e:  # dist errors are RuntimeErrors
            raise self.group.failure(e) from e


def _exit_text(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def start_tensor_parallel(config: EngineConfig) -> TensorParallel | None:
    """The started group of `config.tensor_parallel` ranks (None for one): the model's
    config is checked first (ModelLoadError naming what cannot be split)."""
    if config.tensor_parallel == 1:
        return None
    from pagedbatch.models.loader import load_tokenizer_and_config

    _, model_config = load_tokenizer_and_config(config.model, config.cache_dir)
    check_splits(config, model_config)
    return TensorParallel(config)


def check_splits(config: EngineConfig, model_config: Any) -> None:
    """ModelLoadError naming why `config.model` (its transformers config: `model_config`)
    cannot be split over `config.tensor_parallel` ranks; the Ray driver asks too, before
    any replica starts."""
    from pagedbatch.models.loader import ModelLoadError
    from pagedbatch.models.random_presets import RANDOM_PRESETS

    if config.model in RANDOM_PRESETS:
        raise ModelLoadError(f"tensor parallel runs checkpoints, not random preset {config.model}")
    problem = support_problem(model_config, config.tensor_parallel)
    if problem is not None:
        raise ModelLoadError(problem)
