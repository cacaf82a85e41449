"""Decode steps replayed from CUDA graphs captured for padded batch sizes.

Why capture the model's own forward: a decode step of a transformers model is ~40
kernel launches per layer, and at a few hundred sequences the host needs longer to
issue them than the GPU needs to run them. The forward is capturable as it is: the
attention interface hands our `Batch` to every layer, transformers builds no mask for
our implementation (so no host sync), the Triton decode launch depends only on the batch
size and `max_model_len` (split count, preallocated split buffers), and every input is a
tensor. So the graph is the model's real forward, for every architecture the engine runs
eagerly; a thin re-implementation of the layers (nano-vllm's way) would have to be kept
in step with each architecture, and `torch.compile` adds minutes of compile per shape
and its own guards. Prefill and mixed steps stay eager.

A graph holds static input buffers sized for its bucket; a step copies its batch into the
first rows and pads the rest with rows that write nowhere (slot -1) and read one slot of
block 0 (their outputs are dropped; rows never mix in a decoder layer).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pagedbatch.engine.batch import Batch

PAD_SLOT = -1  # the store kernel skips negative slots


def batch_buckets(max_num_seqs: int) -> list[int]:
    """Padded batch sizes to capture: 1, 2, 4, 8, then multiples of 16 up to max_num_seqs."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    sizes += range(16, max_num_seqs, 16)
    return [*sizes, max_num_seqs]


def bucket_for(num_seqs: int, buckets: list[int]) -> int | None:
    """The smallest bucket that holds `num_seqs` sequences (None: too many, run eagerly)."""
    return next((b for b in buckets if b >= num_seqs), None)


def static_batch(size: int, width: int, max_len: int, device: torch.device) -> Batch:
    """Input buffers for `size` padding rows (every graph uses views of the first rows).

    The host lengths say `max_len`: launches are sized for any context up to it.
    """
    long, int32 = torch.long, torch.int32
    return Batch(
        input_ids=torch.zeros(size, dtype=long, device=device),
        positions=torch.zeros(size, dtype=long, device=device),
        slot_mapping=torch.full((size,), PAD_SLOT, dtype=long, device=device),
        block_tables=torch.zeros((size, width), dtype=int32, device=device),
        context_lens=torch.ones(size, dtype=int32, device=device),
        query_start_loc=torch.arange(size + 1, dtype=int32, device=device),
        logits_indices=torch.arange(size, dtype=long, device=device),
        context_lens_host=[max_len] * size,
        query_start_loc_host=list(range(size + 1)),
    )


def first_rows(batch: Batch, size: int) -> Batch:
    """The batch of the first `size` rows of `batch` (views: same storage)."""
    return Batch(
        input_ids=batch.input_ids[:size],
        positions=batch.positions[:size],
        slot_mapping=batch.slot_mapping[:size],
        block_tables=batch.block_tables[:size],
        context_lens=batch.context_lens[:size],
        query_start_loc=batch.query_start_loc[: size + 1],
        logits_indices=batch.logits_indices[:size],
        context_lens_host=batch.context_lens_host[:size],
        query_start_loc_host=batch.query_start_loc_host[: size + 1],
    )


def load_rows(static: Batch, batch: Batch, size: int) -> None:
    """Copy `batch` into the first rows of `static`; rows up to `size` become padding."""
    n, width = batch.num_seqs, batch.block_tables.shape[1]
    static.input_ids[:n].copy_(batch.input_ids)
    static.positions[:n].copy_(batch.positions)
    static.slot_mapping[:n].copy_(batch.slot_mapping)
    static.block_tables[:n, :width].copy_(batch.block_tables)
    static.context_lens[:n].copy_(batch.context_lens)
    if n < size:
        static.slot_mapping[n:size].fill_(PAD_SLOT)
        static.block_tables[n:size, 0].fill_(0)
        static.context_lens[n:size].fill_(1)


class CudaGraphRunner:
    """Captures `forward(batch) -> logits` for each bucket, then replays decode steps."""

    def __init__(
        self,
        forward: Callable[[Batch], torch.Tensor],
        max_num_seqs: int,
        max_blocks_per_seq: int,
        max_model_len: int,
        device: torch.device,
    ) -> None:
        self.forward = forward
        self.buckets = batch_buckets(max_num_seqs)
        size = self.buckets[-1]
        self.static = static_batch(size, max_blocks_per_seq, max_model_len, device)
        self.device = device
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.replays = 0  # decode steps run from a graph

    def capture(self) -> None:
        """Capture every bucket, largest first: it sizes the shared memory pool and the
        decode split workspace, which the smaller graphs then reuse."""
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.buckets):
            batch = first_rows(self.static, size)
            batch.max_query_len, batch.max_context_len  # noqa: B018  (host facts, cached now)
            self.forward(batch)  # warm-up: Triton compiles, buffers grow
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self.forward(batch)
            self.graphs[size] = (graph, logits)
        torch.cuda.synchronize(self.device)

    def takes(self, num_seqs: int, decode_only: bool) -> bool:
        """Whether a batch of `num_seqs` sequences runs from a graph: a decode-only step
        (every sequence samples its one new token: `Batch.decode_only`) of a captured
        bucket's size or less."""
        return decode_only and bucket_for(num_seqs, self.buckets) is not None

    def run(self, batch: Batch) -> torch.Tensor | None:
        """Replay the graph of `batch`'s bucket; None when the step must run eagerly."""
        if not self.takes(batch.num_seqs, batch.decode_only):
            return None
        size = bucket_for(batch.num_seqs, self.buckets)
        graph, logits = self.graphs[size]
        load_rows(self.static, batch, size)
        graph.replay()
        self.replays += 1
        return logits[: batch.num_seqs]
