"""The memory report's figures, checked against a job small enough to count by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from pagedbatch import LLM, Record, SamplingParams
from pagedbatch.inputs.reader import read_records

SHARED = list(range(10, 18))  # 8 tokens: two full blocks of 4


def test_crafted_job_figures(tiny_model_dirs):
    llm = LLM(
        tiny_model_dirs["llama"], device="cpu", dtype="float32", block_size=4, memory_report=True
    )
    job = [
        Record(id="a", prompt_token_ids=tuple(SHARED + [30, 31])),
        Record(id="b", prompt_token_ids=tuple(SHARED + [40, 41])),
        Record(id="c", prompt_token_ids=tuple(SHARED + [50, 51, 52])),
    ]
    llm.generate(job, SamplingParams(max_tokens=3, ignore_eos=True))
    report = llm.memory_report()
    assert report["dtype"] == "float32"
    # Step 1: only a runs (b and c wait for the prefix a computes). Step 2: a decodes,
    # b and c start from a's two cached blocks: blocks 0,1 shared by three, a's block 2,
    # b's block 3, c's block 4 -> 5 in use, 9 logical; empty slots a 1, b 2, c 1.
    assert [s["running"] for s in report["timeline"]] == [1, 3, 3, 2]
    assert report["peak_blocks"] == 5 and report["peak_step"] == 2
    assert report["kv_waste_peak"] == pytest.approx(4 / 20)
    assert report["sharing_saving"] == pytest.approx(1 - 5 / 9)
    assert report["prefix_hit_rate"] == pytest.approx(16 / 31)
    per_token = llm.kv_cache.spec.bytes_per_token
    assert report["kv_bytes_per_token"] == per_token == 2 * 2 * 2 * 16 * 4
    assert report["paged_peak_bytes"] == 5 * 4 * per_token
    assert report["naive_contiguous_bytes"] == (13 + 13 + 14) * per_token
    assert report["padded_batch_bytes"] == 3 * 14 * per_token
    first = report["timeline"][0]
    assert (first["private"], first["shared"], first["live_slots"]) == (3, 0, 10)
    waste = [s["kv_waste"] for s in report["timeline"]]
    assert report["kv_waste_mean"] == pytest.approx(sum(waste) / len(waste))
    assert report["num_blocks"] == llm.kv_cache.num_blocks
    assert report["preemptions"] == 0 and report["evictions"] == 0


@pytest.mark.slow
def test_labelling_job_on_the_embedded_model_wastes_less_than_a_block_per_sequence(smollm2_dir):
    job = read_records(Path(__file__).parent.parent / "examples" / "label_job.jsonl")[:24]
    # Block size 8: each record's private tail is ~30 tokens (unique text, the partly
    # shared last block, 8 output tokens), so 16-token blocks leave ~17% of slots empty at
    # the peak (0.10 on average over the run); 8-token blocks leave ~4%.
    llm = LLM(str(smollm2_dir), device="cpu", dtype="float32", memory_report=True, block_size=8)
    llm.generate(job, SamplingParams(max_tokens=8))
    report = llm.memory_report()
    size = report["block_size"]
    for s in report["timeline"]:
        wasted = (s["private"] + s["shared"]) * size - s["live_slots"]
        assert wasted < size * s["running"], s
    assert report["kv_waste_peak"] < 0.1
    assert report["sharing_saving"] > 0.5
    assert report["paged_peak_bytes"] * 4 < report["naive_contiguous_bytes"]
    assert report["prefix_hit_rate"] > 0.8
