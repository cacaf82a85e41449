"""A tensor-parallel worker: rank r > 0 of engine/tensor_parallel.py, a process of its own.

`python -m pagedbatch.engine.tp_worker FD`: FD is its end of a pipe to rank 0. It reads a
`WorkerSpec`, says `Joining` and joins the process group, loads its shard of the model,
reports `Loaded`; reads `StartEngine` and allocates its KV pool (its own KV heads); then
runs every `Step` it is sent (block copies, then the forward, whose collectives meet rank
0's) until it reads None or the pipe closes. Whatever stops it otherwise is sent back as
`Failed`. SIGINT and SIGHUP are ignored: rank 0 decides when the job stops.
"""

from __future__ import annotations

import signal
import sys
import traceback
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist

from pagedbatch.engine.attention import ATTN_IMPLEMENTATION, PagedAttention
from pagedbatch.engine.kv_cache import KVCache, free_memory
from pagedbatch.engine.model_runner import ModelRunner
from pagedbatch.engine.tp_protocol import (
    Failed,
    Joining,
    Loaded,
    StartEngine,
    Step,
    WorkerSpec,
    backend_for,
    die_with_parent,
    local_rank_env,
    portable,
    rank_device,
    receive,
    send,
)
from pagedbatch.engine.tp_shards import local_weight_bytes
from pagedbatch.models.loader import load_model


def serve(pipe: Connection, spec: WorkerSpec) -> None:
    """Join the group, load the shard, run steps until told to stop."""
    config = spec.config
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    device = rank_device(config.torch_device, spec.rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    send(pipe, Joining())
    store = dist.TCPStore("127.0.0.1", spec.store_port, spec.world_size, is_master=False,
                          timeout=spec.timeout)  # fmt: skip
    dist.init_process_group(backend_for(device), store=store, rank=spec.rank,
                            world_size=spec.world_size, timeout=spec.timeout)  # fmt: skip
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (spec.world_size,))
        free = free_memory(device)
        with local_rank_env(spec.rank):
            model, _ = load_model(
                config.model, device=device, dtype=config.torch_dtype,
                attn_implementation=ATTN_IMPLEMENTATION, cache_dir=config.cache_dir,
                device_mesh=mesh,
            )  # fmt: skip
        send(pipe, Loaded(free, local_weight_bytes(model)))
        start = receive(pipe)
        if not isinstance(start, StartEngine):
            return
        kv_cache = KVCache(start.spec, start.num_blocks, device)
        attention = PagedAttention(kv_cache, "torch", start.max_model_len)
        runner = ModelRunner(model, attention, block_manager=None)  # type: ignore[arg-type]
        while isinstance(step := receive(pipe), Step):
            if step.copies:
                ids = torch.tensor([(c.src, c.dst) for c in step.copies], device=device)
                kv_cache.copy_blocks(ids[:, 0], ids[:, 1])
            batch = step.batch if device.type == "cpu" else portable(step.batch, device)
            runner.forward(batch)
    finally:
        dist.destroy_process_group()


def main(argv: list[str]) -> int:
    # A terminal's Ctrl-C or hang-up reaches the whole process group: rank 0 decides (it
    # stops after the step, then closes the pipes); a worker stops when told or orphaned.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    die_with_parent()
    pipe = Connection(int(argv[1]))
    try:
        spec = receive(pipe)
        serve(pipe, spec)
    except EOFError:  # rank 0 is gone: nothing to report to
        return 1
    except BaseException as e:
        lines = str(e).strip().splitlines()
        message = f"{type(e).__name__}: {lines[0] if lines else ''}"
        try:
            send(pipe, Failed(message))
        except OSError:
            traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
