"""`pagedbatch bench`: workloads, contenders, random presets and the table, on CPU.

Every run here is tiny (a 2-layer model, a few prompts, short outputs): the tests check
what each contender produced and what pagedbatch's cache did, never how fast it was.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from pagedbatch.bench.baselines import (
    generated_lengths,
    hf_generate,
    padded_row_bytes,
    padding_fraction,
    static_batch_size,
    static_batches,
)
from pagedbatch.bench.decode_probe import DecodeTiming, weight_bytes
from pagedbatch.bench.result import BenchReport, BenchResult, token_count_error
from pagedbatch.bench.runner import (
    IN_PROCESS,
    BenchOptions,
    bench_llm,
    label_matches,
    load_llm,
    run_file_benchmark,
    run_workload_benchmark,
    vocab_size,
)
from pagedbatch.bench.workloads import (
    WORKLOADS,
    BenchPrompts,
    Workload,
    file_records,
    workload_prompts,
)
from pagedbatch.cli.app import app
from pagedbatch.cli.bench import choices_line, constrained_line, tables
from pagedbatch.constraint import Constraint
from pagedbatch.engine.config import EngineConfig
from pagedbatch.models.loader import load_model
from pagedbatch.models.random_presets import RANDOM_PRESETS, preset_config

SMALL_ENGINE = {"device": "cpu", "dtype": "float32", "num_blocks": 512}
TINY_WORKLOADS = {
    "label": WORKLOADS["label"].scaled(num_prompts=4, max_tokens=6),
    "share": WORKLOADS["share"].scaled(num_prompts=4, max_tokens=4),
    "mixed": dataclasses.replace(
        WORKLOADS["mixed"], num_prompts=3, unique_tokens=(10, 60), output_tokens=(2, 8)
    ),
}


def options(model_dir: Path, **kw: object) -> BenchOptions:
    return BenchOptions(EngineConfig(model=str(model_dir), **SMALL_ENGINE), **kw)


@pytest.fixture(scope="module")
def reports(tiny_model_dirs) -> dict[str, BenchReport]:
    """Every in-process contender on each tiny workload, once for the module."""
    opts = options(tiny_model_dirs["llama"])
    return {name: run_workload_benchmark(w, opts) for name, w in TINY_WORKLOADS.items()}


def test_workloads_are_those_of_the_design():
    assert WORKLOADS["label"] == Workload("label", 256, 250, (10, 80), (16, 16))
    assert WORKLOADS["share"] == Workload("share", 256, 512, (32, 160), (128, 128))
    assert WORKLOADS["mixed"] == Workload("mixed", 256, 0, (100, 1024), (100, 1024))
    with pytest.raises(ValueError, match="num_prompts"):
        WORKLOADS["label"].scaled(num_prompts=0)


def test_workload_prompts_are_seeded_shared_and_in_range():
    share = WORKLOADS["share"].scaled(num_prompts=5)
    prompts = workload_prompts(share, vocab_size=300, special_ids=(0, 1, 2), seed=3)
    assert prompts == workload_prompts(share, vocab_size=300, special_ids=(0, 1, 2), seed=3)
    assert prompts != workload_prompts(share, vocab_size=300, special_ids=(0, 1, 2), seed=4)
    ids = prompts.token_ids
    assert len(ids) == 5 and len({p[:512] for p in ids}) == 1
    assert all(32 <= len(p) - 512 <= 160 for p in ids)
    assert all(3 <= t < 300 for p in ids for t in p)
    assert prompts.max_tokens == (128,) * 5 and prompts.output_tokens == 640
    mixed = workload_prompts(WORKLOADS["mixed"], vocab_size=300)
    assert all(100 <= len(p) <= 1024 for p in mixed.token_ids)
    assert all(100 <= n <= 1024 for n in mixed.max_tokens) and len(set(mixed.max_tokens)) > 100
    records = prompts.records()
    assert records[2].prompt_token_ids == ids[2] and records[2].overrides == {"max_tokens": 128}


@pytest.mark.parametrize("name", TINY_WORKLOADS)
def test_every_contender_generates_every_token(reports, name):
    report = reports[name]
    assert [r.contender for r in report.results] == list(IN_PROCESS)
    assert report.prompts == TINY_WORKLOADS[name].num_prompts
    for result in report.results:
        assert result.error is None, result.error
        assert result.records == report.prompts, result.name
        assert result.output_tokens == report.output_tokens, result.name
        assert result.seconds > 0 and result.details["load_s"] > 0
    ours = report.get("pagedbatch").details
    assert ours["decode_steps"] > 0 and ours["decode_ms"] > 0
    assert "floor_fraction" not in ours  # CUDA only
    assert report.copy_bandwidth is None


def test_report_says_what_each_contender_was_given(reports, tiny_model_dirs):
    report = reports["mixed"]  # 3 prompts; the engine's defaults and 512 blocks
    # The prompts the report ran: one padded batch of 3 rows, each as wide as the longest
    # prompt plus the longest output; the padding is the share of slots no row uses.
    model, tokenizer = load_model(
        tiny_model_dirs["llama"], device=torch.device("cpu"), dtype=torch.float32
    )
    prompts = workload_prompts(
        TINY_WORKLOADS["mixed"], vocab_size(model), tokenizer.all_special_ids, seed=0
    )
    used = sum(len(p) + n for p, n in zip(prompts.token_ids, prompts.max_tokens))
    slots = 3 * (max(map(len, prompts.token_ids)) + max(prompts.max_tokens))
    assert 0 < used < slots
    generate = report.get("generate").given
    assert generate == {
        "batch_size": 256, "batches": 1, "order": "sorted by prompt length, then output length",
        "padding": f"{1 - used / slots:.1%}", "batch_size_from": "max_num_seqs",
    }  # fmt: skip
    assert report.get("generate").name == "generate (batch 3)"
    given = {"pagedbatch": ("by prompt token ids", True),
             "pagedbatch-no-cascade": ("by prompt token ids", False),
             "pagedbatch-no-sharing": ("input order", True)}  # fmt: skip
    for contender, (order, cascade) in given.items():
        assert report.get(contender).given == {
            "max_num_seqs": 256, "max_batch_tokens": 2048, "num_blocks": 512, "block_size": 16,
            "order": order, "cascade": cascade,
        }  # fmt: skip
    batching = report.get("generate_batch").given
    assert batching["max_batch_tokens"] == 2048 and batching["num_blocks"] >= 3
    assert batching["order"] == "descending token ids"
    console = Console(record=True, width=300)
    for table in tables(report):
        console.print(table)
    text = console.export_text()
    assert "What each contender was given" in text and text.count("exact") == 5
    assert "batch_size=256, batches=1, order=sorted by prompt length" in text
    assert "max_num_seqs=256, max_batch_tokens=2048, num_blocks=512" in text


def prompts_of(lengths: list[int], outputs: list[int]) -> BenchPrompts:
    return BenchPrompts(tuple((5,) * n for n in lengths), tuple(outputs))


def test_static_batches_are_sorted_by_prompt_then_output_length():
    prompts = prompts_of([30, 10, 20, 10, 40, 20, 10], [8, 9, 1, 2, 5, 1, 2])
    assert static_batches(prompts, 3) == [(3, 6, 1), (2, 5, 0), (4,)]
    assert static_batches(prompts, 7) == [(3, 6, 1, 2, 5, 0, 4)]
    assert static_batches(prompts, 1) == [(3,), (6,), (1,), (2,), (5,), (0,), (4,)]
    # Sorted, the batches pad less than in prompt order.
    in_order = [(0, 1, 2), (3, 4, 5), (6,)]
    assert padding_fraction(prompts, static_batches(prompts, 3)) < padding_fraction(
        prompts, in_order
    )
    assert padding_fraction(prompts_of([4, 4], [2, 2]), [(0, 1)]) == 0.0


def test_static_batch_size_is_max_num_seqs_as_far_as_memory_allows():
    config = preset_config("smollm2-135m-random")
    prompts = prompts_of([100, 300], [50, 20])
    row = padded_row_bytes(config, torch.float32, 300, 50)
    kv = 350 * 2 * 30 * 3 * 64 * 4  # tokens x K,V x layers x KV heads x head_dim x float32
    assert kv < row < 3 * kv
    assert static_batch_size(config, torch.float32, prompts, 256, 10**12) == (256, "max_num_seqs")
    size, reason = static_batch_size(config, torch.float32, prompts, 256, 40 * row)
    assert size == 36 and reason.startswith("memory: ") and "300+50 tokens a row" in reason
    assert static_batch_size(config, torch.float32, prompts, 256, row // 2).size == 1


def test_token_count_check_flags_a_short_contender():
    assert token_count_error((6, 6, 4), (6, 6, 4)) is None
    error = token_count_error((6, 6, 4), (6, 5, 4))
    assert (
        error == "1 of 3 prompts got the wrong number of tokens (15 of 16 in all); prompt 1: 5 of 6"
    )
    assert token_count_error((6, 6), (6, 6, 6)) == "returned 3 results for 2 prompts"
    short = BenchResult.counted("generate", "generate", 1.0, (6, 6), (6, 5), {"batch_size": 2})
    assert short.error.endswith("prompt 1: 5 of 6") and short.output_tokens == 11
    ok = BenchResult.counted("generate_batch", "generate_batch", 1.0, (6, 6), (6, 6), {})
    report = BenchReport("label", "tiny", "cpu", 2, 10, 12, None, (short, ok))
    assert report.errors == (f"generate: {short.error}",)
    console = Console(record=True, width=300)
    for table in tables(report):
        console.print(table)
    assert f"ERROR {short.error}" in console.export_text()


def test_generated_lengths_count_what_generate_returned():
    eos, pad = frozenset({2}), 0
    new_tokens = torch.tensor(
        [
            [7, 8, 9, 10],  # ran to the batch's longest output
            [7, 2, 0, 0],  # finished early: EOS, then pad fill
            [7, 0, 0, 0],  # generated pad ids, but no EOS: all its own
            [7, 2, 8, 0],  # an EOS it ran past (EOS ignored)
        ]
    )
    assert generated_lengths(new_tokens, [4, 4, 4, 4], eos, pad) == [4, 2, 4, 4]
    assert generated_lengths(new_tokens, [3, 1, 2, 4], eos, pad) == [3, 1, 2, 4]
    assert generated_lengths(new_tokens[:, :2], [3, 3, 3, 3], eos, pad) == [2, 2, 2, 2]


def test_generate_baseline_counts_its_output_not_the_request(tiny_model_dirs, monkeypatch):
    model, _ = load_model(tiny_model_dirs["llama"], device=torch.device("cpu"), dtype=torch.float32)
    prompts = prompts_of([5, 9, 7], [3, 2, 3])
    assert hf_generate(model, prompts, 2, pad_id=0).error is None
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: generate(**kw)[:, :-1])  # one short
    short = hf_generate(model, prompts, 2, pad_id=0)
    assert short.output_tokens == 5 and short.error.startswith("3 of 3 prompts")


def test_label_decode_steps_are_counted_exactly(reports):
    """Without sharing, all 4 prompts are computed in the first step (which samples their
    first tokens), so each of the 5 later tokens is a decode step of all 4."""
    details = reports["label"].get("pagedbatch-no-sharing").details
    assert details["decode_steps"] == 5 and details["decode_batch"] == 4


def test_share_hits_the_prefix_cache_only_with_sharing(reports):
    report = reports["share"]
    shared, plain = report.get("pagedbatch").details, report.get("pagedbatch-no-sharing").details
    # The first prompt computes the 512 shared tokens; all the others find them cached.
    expected = (report.prompts - 1) * 512 / report.prompt_tokens
    assert shared["prefix_hit_rate"] == pytest.approx(expected) and expected > 0.6
    assert plain["prefix_hit_rate"] == 0.0
    assert shared["peak_blocks"] < plain["peak_blocks"]
    # Cascade: every decode step reads the 512 shared tokens once for all the prompts.
    uncascaded = report.get("pagedbatch-no-cascade").details
    assert shared["cascade_saved_token_reads"] > 0
    assert uncascaded["cascade_saved_token_reads"] == plain["cascade_saved_token_reads"] == 0
    assert uncascaded["prefix_hit_rate"] == shared["prefix_hit_rate"]
    # What a decode step read: the same steps, the prefix read once per group.
    assert uncascaded["decode_steps"] == shared["decode_steps"] > 0
    assert 0 < shared["decode_kv_bytes"] < uncascaded["decode_kv_bytes"]


def test_cascade_groups_times_each_shape_with_and_without_the_plan():
    from pagedbatch.bench.cascade_groups import AttentionShape, GroupShape, measure_cascade_groups

    tiny = AttentionShape(layers=2, heads=4, kv_heads=2, head_dim=8, block_size=16)
    shapes = [GroupShape("decode", "all", 2, 1, 4), GroupShape("decode", "one", 3, 32, 4),
              GroupShape("extend", "all", 3, 32, 5)]  # fmt: skip
    timings = measure_cascade_groups(shapes, seqs=6, repeats=1, attention=tiny)
    # 3 pairs x 16 tokens; one trio x 2 x 512 tokens; two trios (per layer)
    assert [(t.groups, t.saved_token_reads) for t in timings] == [(3, 48), (1, 1024), (2, 2048)]
    # The torch rule: decodes and extends behind 256 tokens or more.
    assert [t.taken for t in timings] == [False, True, True]
    assert all(t.plain_ms > 0 and t.cascade_ms > 0 for t in timings)
    with pytest.raises(ValueError, match="fewer than a group of 3"):
        measure_cascade_groups(shapes, seqs=2, repeats=1, attention=tiny)
    result = CliRunner().invoke(app, ["bench", "--cascade-groups", "--num-prompts", "4"])
    assert result.exit_code == 2
    assert "4 sequences are fewer than a group of 8" in result.output


def test_skip_leaves_contenders_out(tiny_model_dirs):
    skip = frozenset({"pagedbatch", "pagedbatch-no-cascade", "generate_batch"})
    opts = options(tiny_model_dirs["qwen3"], skip=skip)
    report = run_workload_benchmark(TINY_WORKLOADS["label"].scaled(2, max_tokens=2), opts)
    assert [r.contender for r in report.results] == ["pagedbatch-no-sharing", "generate"]
    with pytest.raises(ValueError, match="unknown contender"):
        options(tiny_model_dirs["llama"], skip=frozenset({"vllm"}))
    with pytest.raises(ValueError, match="leaves none"):
        options(tiny_model_dirs["llama"], skip=frozenset(IN_PROCESS))


def test_file_input_runs_the_whole_process_too(tiny_model_dirs, tmp_path):
    rows = [
        {"id": "a", "prompt": "The quick brown fox", "max_tokens": 99},  # 99: overridden
        {"id": "bad"},  # no prompt: left out
        {"id": "b", "messages": [{"role": "user", "content": "Label the review."}]},
        {"id": "c", "prompt": "Once upon a time"},
        {"id": "d", "prompt": "beyond num_records"},
    ]
    source = tmp_path / "job.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    opts = options(tiny_model_dirs["llama"])
    report = run_file_benchmark(str(source), 5, opts, num_records=3)
    assert report.title.endswith("job.jsonl (3 records)")
    assert [r.contender for r in report.results] == ["run", *IN_PROCESS]
    assert all(r.records == 3 and r.output_tokens == 15 for r in report.results)


def test_choices_contender_scores_the_same_records(tiny_model_dirs, tmp_path):
    rows = [{"id": i, "prompt": f"record number {i} is"} for i in range(3)]
    source = tmp_path / "job.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    skip = frozenset({"run", "pagedbatch-no-cascade", "pagedbatch-no-sharing", "generate_batch"})
    opts = options(tiny_model_dirs["llama"], skip=skip, choices=("yes", "no"))
    report = run_file_benchmark(str(source), 4, opts)
    assert [r.contender for r in report.results] == ["pagedbatch", "pagedbatch-choices", "generate"]
    scored = report.get("pagedbatch-choices")
    assert scored.error is None and scored.records == 3 and scored.output_tokens == 0
    assert scored.given["choices"] == 2
    assert 0 <= scored.details["label_agreement"] <= 1
    line = choices_line(report)
    assert "x pagedbatch generating" in line and "x transformers generate" in line, line


def test_profile_splits_prefill_and_decode_steps_at_each_dtype(tiny_model_dirs, tmp_path):
    from pagedbatch.bench.step_profile import PARTS, profile_steps

    shared = "Label the review as positive, negative or mixed. " * 4
    rows = [{"id": i, "prompt": shared + f"review {i}: it broke after {i} days"} for i in range(4)]
    source = tmp_path / "job.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = EngineConfig(model=str(tiny_model_dirs["llama"]), threads=1, **SMALL_ENGINE)
    records = file_records(str(source))
    profiles = profile_steps(records, config, 5, ["float32", "bfloat16"])
    assert [(p.dtype, p.kind) for p in profiles] == [
        (d, k) for d in ("float32", "bfloat16") for k in ("prefill-heavy", "decode-heavy")
    ]
    for p in profiles:
        prefill = p.kind == "prefill-heavy"
        assert p.tokens > 2 * p.seqs if prefill else p.tokens <= 2 * p.seqs
        assert p.matmul > 0 and p.attention > 0 and p.other_ops > 0 and p.matmul_gflops > 0
        assert sum(getattr(p, part) for part in PARTS) == pytest.approx(p.ms, rel=0.05)
    # after the prompts, one new token per sequence and step, up to 4 sequences
    decode = [p for p in profiles if p.kind == "decode-heavy"]
    assert all(p.steps >= 4 and p.tokens == p.seqs and 1 <= p.seqs <= 4 for p in decode), decode


def test_cli_profile_prints_the_table(tiny_model_dirs, tmp_path):
    source = tmp_path / "job.jsonl"
    source.write_text("".join(json.dumps({"id": i, "prompt": f"text {i} " * 9}) + "\n"
                              for i in range(3)))  # fmt: skip
    args = ["bench", str(source), "--profile", "--dtype", "bfloat16", "--max-tokens", "3",
            "--model", str(tiny_model_dirs["llama"]), "--config", small_config(tmp_path),
            "--threads", "1"]  # fmt: skip
    result = CliRunner().invoke(app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "Where a step goes: 3 records, 3 tokens each" in result.output
    for text in ("prefill-heavy", "decode-heavy", "matmul %", "attn %", "sample %", "host %"):
        assert text in result.output
    assert "float32" not in result.output  # --dtype: that one only
    result = CliRunner().invoke(app, ["bench", "--workload", "label", "--profile"])
    assert result.exit_code == 2 and "--profile needs an INPUT file" in result.output


def test_constrained_contender_reports_its_masks_against_unconstrained(tiny_model_dirs, tmp_path):
    pytest.importorskip("xgrammar")
    rows = [{"id": i, "prompt": f"record number {i} is"} for i in range(3)]
    source = tmp_path / "job.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    skip = frozenset({"run", "pagedbatch-no-cascade", "pagedbatch-no-sharing", "generate",
                      "generate_batch"})  # fmt: skip
    constraint = Constraint.regex("(yes|no), [0-9]")
    report = run_file_benchmark(str(source), 12, options(tiny_model_dirs["llama"], skip=skip,
                                                          constraint=constraint))  # fmt: skip
    assert [r.contender for r in report.results] == ["pagedbatch", "pagedbatch-constrained"]
    ours = report.get("pagedbatch-constrained")
    assert ours.error is None and ours.records == 3 and ours.given["constraint"] == "regex"
    # Each output is 4 or 5 tokens of the regex, then its grammar ends it (EOS ignored or not).
    assert 3 * 4 <= ours.output_tokens < report.get("pagedbatch").output_tokens == 3 * 12
    assert ours.details["complete"] == 3 and ours.details["masked_steps"] >= 4
    assert ours.details["mask_ms"] > 0
    line = constrained_line(report)
    assert line.startswith("Constrained (regex): ") and "x unconstrained, whose" in line, line
    assert "3 of 3 outputs complete" in line


def test_label_matches_the_first_word_of_a_generation():
    assert label_matches("positive", "Positive: great phone")
    assert label_matches("mixed", " mixed.")
    assert not label_matches("positive", "The review is positive")
    assert not label_matches(None, "positive") and not label_matches("yes", "")


def test_random_presets_have_the_real_shapes():
    small, big = preset_config("smollm2-135m-random"), preset_config("llama-1b-random")
    assert (small.num_hidden_layers, small.hidden_size, small.intermediate_size) == (30, 576, 1536)
    assert (small.num_attention_heads, small.num_key_value_heads, small.head_dim) == (9, 3, 64)
    assert (big.num_hidden_layers, big.hidden_size, big.intermediate_size) == (16, 2048, 8192)
    assert (big.num_attention_heads, big.num_key_value_heads, big.head_dim) == (32, 8, 64)
    assert (small.vocab_size, big.vocab_size) == (49152, 128256) and big.tie_word_embeddings
    with torch.device("meta"):  # shapes only: no 1B-parameter init on this CPU
        from transformers import AutoModelForCausalLM

        llama = AutoModelForCausalLM.from_config(big)
    assert sum(p.numel() for p in llama.parameters()) == 1_235_814_400  # Llama-3.2-1B
    assert set(RANDOM_PRESETS) == {"tiny-random", "smollm2-135m-random", "llama-1b-random"}


def test_random_preset_loads_seeded_with_a_tokenizer_for_every_id():
    cpu = torch.device("cpu")
    model, tokenizer = load_model("smollm2-135m-random", device=cpu, dtype=torch.float32)
    again, _ = load_model("smollm2-135m-random", device=cpu, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # SmolLM2-135M
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    assert 0.019 < model.model.layers[0].mlp.up_proj.weight.std() < 0.021
    assert len(tokenizer) == 49152 and tokenizer.eos_token_id == model.config.eos_token_id == 2
    assert isinstance(tokenizer.decode(list(range(49152))), str)
    text = "Label: héllo"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    # weight bytes of a decode step: tied embeddings are read once, as the LM head
    assert weight_bytes(model) == 4 * 134_515_008


def test_weight_bytes_leave_out_an_untied_input_embedding(tiny_model_dirs):
    model, _ = load_model(tiny_model_dirs["llama"], device=torch.device("cpu"), dtype=torch.float32)
    embedding = model.get_input_embeddings().weight.numel()
    assert weight_bytes(model) == 4 * (sum(p.numel() for p in model.parameters()) - embedding)


def test_bandwidth_floor_of_decode_steps():
    timing = DecodeTiming(steps=10, seconds=0.02, sequences=40, context_tokens=4000)
    assert timing.ms_per_step == 2.0 and timing.mean_batch == 4.0
    # 10 steps x 1 MB weights + 4000 tokens x 1 kB of K/V = 14 MB at 1 TB/s: 14 us
    assert timing.kv_bytes(10**3, num_layers=4) == 4 * 10**6
    assert timing.floor_seconds(10**6, 4 * 10**6, 1e12) == pytest.approx(14e-6)
    # Cascade left out 1000 layer-tokens (250 tokens of all 4 layers): 250 kB less.
    cascaded = timing._replace(saved_token_reads=1000)
    assert cascaded.kv_bytes(10**3, num_layers=4) == 4 * 10**6 - 250_000


def test_bandwidth_floor_path_without_cuda(tiny_model_dirs):
    """The CUDA-only figures, computed from a given copy bandwidth, and their table column."""
    llm, load_s = load_llm(EngineConfig(model=str(tiny_model_dirs["llama"]), **SMALL_ENGINE))
    prompts = workload_prompts(TINY_WORKLOADS["label"].scaled(2), vocab_size(llm.model))
    result = bench_llm(llm, prompts, load_s, copy_bw=1e12)
    assert 0 < result.details["floor_fraction"] < 1
    last = llm.engine.last_step  # the last step of a run decodes the last tokens
    assert last.decode_only and last.num_tokens == last.num_seqs > 0 and last.seconds > 0
    report = BenchReport("label", "tiny", "cuda", 2, 1, 12, 3e12, (result,))
    console = Console(record=True, width=200)
    for table in tables(report):
        console.print(table)
    text = console.export_text()
    assert "% floor" in text and f"{result.details['floor_fraction']:.0%}" in text


def small_config(tmp_path: Path) -> str:
    path = tmp_path / "small.toml"
    path.write_text('device = "cpu"\nnum_blocks = 256\n')
    return str(path)


def test_cli_prints_the_tables(tiny_model_dirs, tmp_path):
    model = str(tiny_model_dirs["mistral"])
    args = ["bench", "--workload", "share", "--num-prompts", "3", "--max-tokens", "3",
            "--batch-size", "2", "--model", model, "--config", small_config(tmp_path)]  # fmt: skip
    result = CliRunner().invoke(app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "share workload (3 prompts)" in out and "3 prompts, " in out and "9 output tokens" in out
    for text in (
        "x generate",
        "x generate_batch",
        "hit rate",
        "ms/step",
        "runs for INPUT files only",
        "What each contender was given",
        "batch_size=2, batches=2",
        "batch_size_from=--batch-size",
    ):
        assert text in out
    for name in ("pagedbatch ", "pagedbatch-no-sharing", "generate (batch 2)", "generate_batch"):
        assert name in out
    assert "% floor" not in out  # CUDA only


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "not both or neither"),
        (["--workload", "chat"], "unknown workload 'chat'"),
        (["--workload", "label", "--skip", "vllm"], "unknown contender(s) to skip: vllm"),
    ],
)
def test_cli_refuses_bad_arguments(args, message):
    result = CliRunner().invoke(app, ["bench", *args, "--device", "cpu"], terminal_width=200)
    assert result.exit_code == 2 and message in result.output, result.output


BLOCKED = """
import sys
sys.modules.update(datasets=None, gguf=None)  # as on the GPU machines: not installed
import torch
from pagedbatch.cli.app import app
from pagedbatch.cli.bench import choices_line, tables
from pagedbatch.models.loader import load_model
load_model("smollm2-135m-random", device=torch.device("cpu"), dtype=torch.float32)
app(sys.argv[1:])
"""


def test_bench_runs_without_datasets_and_gguf(tiny_model_dirs, tmp_path):
    model = str(tiny_model_dirs["llama"])
    args = ["bench", "--workload", "label", "--num-prompts", "2", "--max-tokens", "2",
            "--model", model, "--config", small_config(tmp_path)]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", BLOCKED, *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "generate_batch" in done.stdout


def test_scale_workload_measures_run_and_plan_on_its_job(tmp_path):
    from pagedbatch.bench.scale import SHARED_PREFIX, measure_scale, scale_job

    job = tmp_path / "scale.jsonl"
    scale_job(job, 1000)
    prompts = [json.loads(line)["prompt"] for line in job.read_text().splitlines()]
    assert len(prompts) == 1000 and all(30 <= len(p) <= 60 for p in prompts)
    assert 0.85 < sum(p.startswith(SHARED_PREFIX) for p in prompts) / 1000 < 0.95
    report = measure_scale(300)
    run, plan = report.run, report.plan
    assert run.exit_code == 0 and run.lines == 300 and 0 < run.first_line_s <= run.seconds
    assert run.peak_rss_mb > 50 and plan.exit_code == 0 and plan.peak_rss_mb > 50
    assert set(report.to_json()) == {"records", "run", "plan"}


def test_run_memory_grows_by_a_few_bytes_a_record():
    """A job's memory is its window of running records, not its records: the peak RSS of
    `pagedbatch run` over 30,000 records exceeds that over 2,000 by a few hundred bytes a
    record (about 2.2 KB a record when the whole job was held as Python objects; 300-450
    now, most of it the depth-first sort's arrays for a moment)."""
    from pagedbatch.bench.scale import measure_scale

    small, large = (measure_scale(n, plan=False).run for n in (2_000, 30_000))
    assert small.exit_code == 0 and small.lines == 2_000
    assert large.exit_code == 0 and large.lines == 30_000
    per_record = (large.peak_rss_mb - small.peak_rss_mb) * 2**20 / 28_000
    assert per_record < 700, f"{per_record:.0f} bytes of peak RSS a record"


STUB_VLLM = '''
"""A stand-in for vllm with its offline API's shape: each prompt gets its first ids back."""
__version__ = "0.0-stub"


class SamplingParams:
    def __init__(self, temperature, max_tokens, ignore_eos):
        assert temperature == 0.0 and ignore_eos
        self.max_tokens = max_tokens


class _Out:
    def __init__(self, ids):
        self.token_ids = ids


class _Request:
    def __init__(self, ids):
        self.outputs = [_Out(ids)]


class LLM:
    def __init__(self, model, dtype, enable_prefix_caching, seed, max_model_len):
        import os
        assert os.path.isdir(model) and dtype in ("float32", "bfloat16")
        assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0-0"

    def generate(self, prompts, params, use_tqdm):
        return [_Request(p["prompt_token_ids"][: s.max_tokens]) for p, s in zip(prompts, params)]
'''


def test_vllm_contender_runs_in_the_python_given_on_the_same_token_ids(
    tiny_model_dirs, tmp_path, monkeypatch
):
    from pagedbatch.bench.vllm_peer import PYTHON_ENV, vllm_python

    monkeypatch.delenv(PYTHON_ENV, raising=False)

    stub = tmp_path / "stub"
    (stub / "vllm").mkdir(parents=True)
    (stub / "vllm" / "__init__.py").write_text(STUB_VLLM)
    python = tmp_path / "python-with-vllm"  # an interpreter that imports vllm
    python.write_text(f'#!/bin/sh\nPYTHONPATH={stub} exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    assert vllm_python(str(python)) == str(python)
    assert vllm_python() is None  # neither $PAGEDBATCH_VLLM_PYTHON nor vllm here
    rows = [{"id": i, "prompt": f"record number {i} " * 4} for i in range(3)]
    source = tmp_path / "job.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    skip = frozenset({"run", "pagedbatch-no-cascade", "pagedbatch-no-sharing", "generate",
                      "generate_batch"})  # fmt: skip
    engine = EngineConfig(model=str(tiny_model_dirs["llama"]), threads=1, **SMALL_ENGINE)
    opts = BenchOptions(engine, skip=skip, vllm_python=str(python))
    report = run_file_benchmark(str(source), 4, opts)
    assert [r.contender for r in report.results] == ["pagedbatch", "vllm-cpu"]
    peer = report.get("vllm-cpu")
    # the stub returns each prompt's first 4 ids: the right count, never pagedbatch's tokens
    assert peer.error is None and peer.output_tokens == 12 and peer.name == "vLLM-CPU 0.0-stub"
    assert peer.given["dtype"] == "float32" and peer.given["threads"] == 1
    assert peer.details["same_tokens"] == 0 and peer.details["process_s"] > peer.seconds
    assert report.matmul_peak > 0 and report.get("pagedbatch").details["achieved_flops"] > 0
    from pagedbatch.cli.bench import peak_line, peer_line

    assert "the same tokens as pagedbatch for 0% of the prompts" in peer_line(report)
    assert "of this machine's matmul peak in its dtype" in peak_line(report)
