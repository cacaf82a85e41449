"""CUDA-graph decode: the host-side logic runs on the CPU; replay is checked on a GPU
(tests/test_gpu_engine.py, scripts/gpu_checks.sh)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from job_helpers import invoke, one_line_error

from pagedbatch import LLM, SamplingParams
from pagedbatch.engine.batch import Batch
from pagedbatch.engine.config import EngineConfig
from pagedbatch.engine.cuda_graphs import (
    PAD_SLOT,
    batch_buckets,
    bucket_for,
    first_rows,
    load_rows,
    static_batch,
)
from pagedbatch.engine.scoring import Scoring


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
    assert _batch([1, 1, 1], [5, 9, 3], width=3, sampled=3).decode_only
    assert not _batch([1, 4], [5, 9], width=3, sampled=2).decode_only  # a prefill chunk
    assert not _batch([1, 1], [5, 9], width=3, sampled=1).decode_only  # one not sampling
    # Two logits rows, but the second scores a choice token: one sequence does not sample.
    scoring = Scoring(1, torch.tensor([0]), torch.tensor([7]), [], [], [])
    scored = dataclasses.replace(_batch([1, 1], [5, 9], width=3, sampled=2), scores=scoring)
    assert scored.num_sampled == 1 and not scored.decode_only


def test_load_rows_copies_the_batch_and_pads_the_rest():
    static = static_batch(8, width=6, max_len=96, device=torch.device("cpu"))
    assert static.max_context_len == 96  # launches are sized for any context
    # What earlier replays may have left in the buffers: slots and tables of other batches.
    static.slot_mapping.copy_(torch.arange(8) + 500)
    static.block_tables.fill_(77)
    static.context_lens.fill_(50)
    small = _batch([1, 1], [9, 2], width=2, sampled=2)
    load_rows(static, small, size=4)
    view = first_rows(static, 4)
    # The batch's rows are the batch's; whatever padding rows compute is thrown away, so
    # what matters of rows 2-3 is that they write no KV (PAD_SLOT) and read one valid
    # block: block 0, one token.
    assert view.input_ids[:2].tolist() == [100, 101]
    assert view.positions[:2].tolist() == [7, 8]
    assert view.slot_mapping.tolist() == [40, 41, PAD_SLOT, PAD_SLOT]
    assert view.context_lens.tolist() == [9, 2, 1, 1]
    assert view.block_tables[:2, :2].tolist() == small.block_tables.tolist()
    assert view.block_tables[2:, 0].tolist() == [0, 0]
    assert view.query_start_loc.tolist() == [0, 1, 2, 3, 4]
    assert view.logits_indices.tolist() == [0, 1, 2, 3]
    assert view.input_ids.data_ptr() == static.input_ids.data_ptr()  # views, one storage


def test_cuda_graphs_default_on_only_for_cuda_with_triton_and_are_refused_elsewhere():
    assert EngineConfig(device="cpu", dtype="float32").use_cuda_graphs is False
    assert EngineConfig(device="cpu", dtype="float32", cuda_graphs=False).use_cuda_graphs is False
    with pytest.raises(ValueError, match="needs a CUDA device and triton attention, got "
                       "device cpu and attention auto"):  # fmt: skip
        EngineConfig(device="cpu", dtype="float32", cuda_graphs=True)
    if not torch.cuda.is_available():  # auto resolves to the CPU here: refused when used
        with pytest.raises(ValueError, match="got device cpu and attention torch"):
            _ = EngineConfig(cuda_graphs=True).use_cuda_graphs
    message = one_line_error(invoke("in.jsonl", "--device", "cpu", "--cuda-graphs"))
    assert "cuda_graphs needs a CUDA device" in message


def test_a_failed_capture_falls_back_to_eager_unless_graphs_were_asked_for(tiny_model_dirs):
    # On the CPU the capture itself fails (no CUDA graph pool), as a GPU capture can fail.
    llm = LLM(
        tiny_model_dirs["llama"], device="cpu", dtype="float32", num_blocks=32, max_num_seqs=4
    )
    llm._capture_cuda_graphs()
    assert llm.cuda_graphs_problem and llm.cuda_graphs_problem.count("\n") == 0
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, ignore_eos=True))
    assert out[0].completion_tokens == 3 and llm.stats().graph_steps == 0
    asked = LLM(
        tiny_model_dirs["llama"], device="cpu", dtype="float32", num_blocks=32, max_num_seqs=4
    )
    # As if asked for on a CUDA machine (the config refuses True on a CPU).
    object.__setattr__(asked.config, "cuda_graphs", True)
    with pytest.raises(ValueError, match=r"capturing the CUDA graphs failed \(.+\); run with "
                       "--no-cuda-graphs"):  # fmt: skip
        asked._capture_cuda_graphs()


def test_help_shows_cuda_graphs():
    result = invoke("--help")
    assert result.exit_code == 0 and "--cuda-graphs" in result.output
