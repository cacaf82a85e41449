"""Cascade attention: the plan's groups, and the same tokens and logits as without it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from job_helpers import ROOT
from tiny_models import ARCHS

from pagedbatch import LLM, SamplingParams
from pagedbatch.engine.cascade import CascadeGroup, plan_cascade

BS = 4


def test_plan_groups_by_shared_leading_blocks_and_stops_before_new_tokens():
    rows = np.array(
        [
            [7, 8, 9, 20, 0],  # 0: shares 7, 8, 9 with 2 and 7, 8 with 4
            [3, 4, 0, 0, 0],  # 1: alone
            [7, 8, 9, 21, 0],
            [5, 6, 10, 0, 0],  # 3: shares 5 with 5, but 5 computes from position 2
            [7, 8, 30, 31, 32],
            [5, 11, 0, 0, 0],
        ],
        dtype=np.int32,
    )
    num_blocks = np.array([4, 2, 4, 3, 5, 2])
    begins = np.array([13, 5, 14, 9, 17, 2])  # new tokens start here
    groups = plan_cascade(rows, num_blocks, begins, BS)
    assert groups == [CascadeGroup((0, 2, 4), 2)]
    # Without 4, the group shares three blocks.
    assert plan_cascade(rows[[0, 2]], num_blocks[[0, 2]], begins[[0, 2]], BS) == [
        CascadeGroup((0, 1), 3)
    ]
    # A prefix never reaches a member's new tokens: 2 starts in its third block.
    begins_early = np.array([13, 5, 9, 9, 17, 2])
    assert plan_cascade(rows, num_blocks, begins_early, BS) == [CascadeGroup((0, 2, 4), 2)]
    # 2 now has one whole block: (0, 4) x 2 blocks saves as much as (0, 2, 4) x 1 block,
    # and the longer prefix wins the tie.
    begins_earlier = np.array([13, 5, 5, 9, 17, 2])
    assert plan_cascade(rows, num_blocks, begins_earlier, BS) == [CascadeGroup((0, 4), 2)]
    assert plan_cascade(rows[:1], num_blocks[:1], begins[:1], BS) == []


def shared_prompts(vocab: int, seed: int) -> list[list[int]]:
    """Two families of prompts behind shared instructions of 21 and 9 tokens, plus loners."""
    gen = torch.Generator().manual_seed(seed)

    def rand(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=gen).tolist()

    first, second = rand(21), rand(9)
    return ([first + rand(3 + i) for i in range(5)] + [second + rand(2 + i) for i in range(4)]
            + [rand(7), rand(12)])  # fmt: skip


def run(model_dir, cascade: bool, **kw):
    llm = LLM(model_dir, device="cpu", block_size=BS, cascade=cascade, **kw)
    logits = []
    forward = llm.engine.runner.forward  # the real forward, its logits recorded

    def recording(batch):
        out = forward(batch)
        logits.append(out.clone())
        return out

    llm.engine.runner.forward = recording
    prompts = shared_prompts(llm.model.config.vocab_size, seed=7)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    return llm, [[c.token_ids for c in o.completions] for o in outputs], logits


@pytest.mark.parametrize("arch", ARCHS)
def test_cascade_gives_the_tokens_and_logits_of_the_plain_path(arch, tiny_model_dirs):
    on, tokens_on, logits_on = run(tiny_model_dirs[arch], True, num_blocks=128)
    off, tokens_off, logits_off = run(tiny_model_dirs[arch], False, num_blocks=128)
    assert tokens_on == tokens_off
    assert len(logits_on) == len(logits_off)
    for a, b in zip(logits_on, logits_off):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert on.stats().cascade_saved_token_reads > 0
    assert off.stats().cascade_saved_token_reads == 0


@pytest.mark.parametrize(
    "engine",
    [
        {"num_blocks": 24, "max_num_seqs": 6},  # preemption and eviction
        {"num_blocks": 128, "max_batch_tokens": 16},  # chunked prefill
    ],
    ids=["small-pool", "chunked"],
)
def test_cascade_with_forks_preemption_and_chunked_prefill(engine, tiny_model_dirs):
    results = {}
    for cascade in (True, False):
        llm = LLM(tiny_model_dirs["llama"], device="cpu", block_size=BS, cascade=cascade,
                  **engine)  # fmt: skip
        prompts = shared_prompts(llm.model.config.vocab_size, seed=11)
        params = SamplingParams(max_tokens=8, ignore_eos=True, n=3, temperature=0.8, seed=5)
        outputs = llm.generate(prompts, params)
        results[cascade] = [[c.token_ids for c in o.completions] for o in outputs]
        stats = llm.stats()
        assert (stats.cascade_saved_token_reads > 0) == cascade
        llm.engine.check_integrity()
    assert results[True] == results[False]
    if engine.get("num_blocks") == 24:
        assert stats.preemptions > 0


def test_a_sliding_window_narrower_than_the_context_takes_the_plain_path(tmp_path):
    from tiny_models import build_tiny_model

    model_dir = build_tiny_model("mistral", tmp_path / "m", sliding_window=8)
    tokens, saved = {}, {}
    for cascade in (True, False):
        llm = LLM(model_dir, device="cpu", block_size=BS, num_blocks=128, cascade=cascade)
        prompts = shared_prompts(llm.model.config.vocab_size, seed=3)
        outputs = llm.generate(prompts, SamplingParams(max_tokens=5, ignore_eos=True))
        tokens[cascade] = [o.completions[0].token_ids for o in outputs]
        saved[cascade] = llm.stats().cascade_saved_token_reads
    assert tokens[True] == tokens[False]
    assert saved == {True: 0, False: 0}


def test_the_cli_turns_cascade_off(tmp_path, tiny_model_dirs):
    from job_helpers import invoke, read_lines, tiny_args, write_jsonl

    instruction = "Read the review below and say whether it is positive or negative. "
    records = [{"id": i, "prompt": instruction + f"Review {i}: it was fine."} for i in range(4)]
    source = write_jsonl(tmp_path / "in.jsonl", records)
    lines = {}
    for flag in ("--cascade", "--no-cascade"):
        out = tmp_path / f"out{flag}.jsonl"
        args = tiny_args(tiny_model_dirs["llama"], flag, "--block-size", "4")
        result = invoke(source, "-o", out, "--memory-report", *args)
        assert result.exit_code == 0, result.output
        report = json.loads(out.with_name(out.name.removesuffix(".jsonl") + ".memory.json")
                            .read_text())  # fmt: skip
        lines[flag] = ([line["choices"] for line in read_lines(out)],
                       report["cascade_saved_token_reads"])  # fmt: skip
    assert lines["--cascade"][0] == lines["--no-cascade"][0]
    assert lines["--cascade"][1] > 0 and lines["--no-cascade"][1] == 0


def test_a_member_sharing_little_is_left_out_rather_than_cutting_the_prefix():
    rows = np.array([[7, 8, 9, 10, 11, 40], [7, 8, 9, 10, 11, 41], [7, 8, 9, 10, 11, 42],
                     [7, 50, 0, 0, 0, 0]], dtype=np.int32)  # fmt: skip
    num_blocks = np.array([6, 6, 6, 2])
    begins = np.array([21, 21, 22, 5])
    # Three members x 5 blocks beat four members x 1 block: 3 runs alone.
    assert plan_cascade(rows, num_blocks, begins, BS) == [CascadeGroup((0, 1, 2), 5)]
    # With only two sharing the long prefix, four sharing one block save more: (4-1)x1 >
    # (2-1)x... no: 1 x 5 = 5 > 3. Shorten the long prefix to 2 blocks instead.
    short = begins.copy()
    short[:3] = 9
    assert plan_cascade(rows, num_blocks, short, BS) == [CascadeGroup((0, 1, 2), 2)]
    one_block = np.array([6, 6, 6, 2])
    early = np.array([5, 5, 5, 5])  # everyone has one whole block before its new tokens
    assert plan_cascade(rows, one_block, early, BS) == [CascadeGroup((0, 1, 2, 3), 1)]


@pytest.mark.slow
def test_smollm2_labelling_records_give_the_same_tokens_with_and_without_cascade(smollm2_dir):
    rows = [json.loads(line) for line in (ROOT / "examples" / "label_job.jsonl").open()][:12]
    params = SamplingParams(max_tokens=6)

    def run(cascade: bool):
        llm = LLM(str(smollm2_dir), device="cpu", num_blocks=512, cascade=cascade)
        outputs = llm.generate(rows, params)
        return [o.completions[0].token_ids for o in outputs], llm.stats()

    with_cascade, stats = run(True)
    without, plain = run(False)
    assert with_cascade == without
    assert stats.cascade_saved_token_reads > 0 and plain.cascade_saved_token_reads == 0
