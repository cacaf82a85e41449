"""CUDA-graph decode: the host-side logic runs on the CPU; replay is checked on a GPU
(tests/test_gpu_engine.py, scripts/gpu_checks.sh)."""

from __future__ import annotations

import torch

from pagedbatch.engine.batch import Batch
from pagedbatch.engine.cuda_graphs import (
    PAD_SLOT,
    batch_buckets,
    bucket_for,
    first_rows,
    is_graph_step,
    load_rows,
    static_batch,
)


def _batch(query_lens: list[int], context_lens: list[int], width: int, sampled: int) -> Batch:
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    t, s = starts[-1], len(query_lens)
    return Batch(
        input_ids=torch.arange(100, 100 + t),
        positions=torch.arange(t) + 7,
        slot_mapping=torch.arange(t) + 40,
        block_tables=torch.arange(s * width, dtype=torch.int32).reshape(s, width) + 1,
        context_lens=torch.tensor(context_lens, dtype=torch.int32),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        logits_indices=torch.arange(sampled),
        context_lens_host=context_lens,
        query_start_loc_host=starts,
    )


def test_buckets_cover_every_batch_size_up_to_the_maximum():
    assert batch_buckets(256)[:6] == [1, 2, 4, 8, 16, 32] and batch_buckets(256)[-1] == 256
    assert batch_buckets(5) == [1, 2, 4, 5]
    assert batch_buckets(1) == [1]
    buckets = batch_buckets(100)
    for n in range(1, 101):
        b = bucket_for(n, buckets)
        assert b is not None and b >= n and b - n < 16
    assert bucket_for(101, buckets) is None


def test_only_decode_only_steps_replay():
    assert is_graph_step(_batch([1, 1, 1], [5, 9, 3], width=3, sampled=3))
    assert not is_graph_step(_batch([1, 4], [5, 9], width=3, sampled=2))  # a prefill chunk
    assert not is_graph_step(_batch([1, 1], [5, 9], width=3, sampled=1))  # one not sampling


def test_load_rows_copies_the_batch_and_pads_the_rest():
    static = static_batch(8, width=6, max_len=96, device=torch.device("cpu"))
    assert static.max_context_len == 96  # launches are sized for any context
    load_rows(static, _batch([1] * 5, [3, 4, 5, 6, 7], width=4, sampled=5), size=8)
    small = _batch([1, 1], [9, 2], width=2, sampled=2)
    load_rows(static, small, size=4)  # rows 2, 3 held the previous batch: now padding
    view = first_rows(static, 4)
    assert view.input_ids.tolist() == [100, 101, 102, 103]  # rows 2-3 are never read
    assert view.slot_mapping.tolist() == [40, 41, PAD_SLOT, PAD_SLOT]
    assert view.context_lens.tolist() == [9, 2, 1, 1]
    assert view.block_tables[:2, :2].tolist() == small.block_tables.tolist()
    assert view.block_tables[2:, 0].tolist() == [0, 0]
    assert view.query_start_loc.tolist() == [0, 1, 2, 3, 4]
    assert view.logits_indices.tolist() == [0, 1, 2, 3]
    assert static.slot_mapping[4:].tolist() == [44, PAD_SLOT, PAD_SLOT, PAD_SLOT]  # untouched
    assert view.input_ids.data_ptr() == static.input_ids.data_ptr()  # views, one storage
