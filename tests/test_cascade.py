"""Cascade attention: the plan's groups, and the same tokens and logits as without it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from job_helpers import ROOT
from tiny_models import ARCHS

from pagedbatch import LLM, SamplingParams
from pagedbatch.engine.cascade import (
    ANY_GROUP,
    TORCH_RULE,
    CascadeGroup,
    CascadeRule,
    plan_cascade,
)

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


def any_group(llm: LLM) -> LLM:
    """`llm` planning every group the Triton backend would (any whole block shared,
    extends too): the exactness tests' short prompts cascade in decode and extend steps,
    which the torch backend's own rule (`TORCH_RULE`, tested below) would not take."""
    llm.engine.runner.cascade_rule = ANY_GROUP
    return llm


def run(model_dir, cascade: bool, **kw):
    llm = any_group(
        LLM(model_dir, device="cpu", dtype="float32", block_size=BS, cascade=cascade, **kw)
    )
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
        llm = any_group(LLM(tiny_model_dirs["llama"], device="cpu", dtype="float32", block_size=BS,
                            cascade=cascade, **engine))  # fmt: skip
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
        llm = LLM(
            model_dir, device="cpu", dtype="float32", block_size=BS, num_blocks=128, cascade=cascade
        )
        any_group(llm)
        prompts = shared_prompts(llm.model.config.vocab_size, seed=3)
        outputs = llm.generate(prompts, SamplingParams(max_tokens=5, ignore_eos=True))
        tokens[cascade] = [o.completions[0].token_ids for o in outputs]
        saved[cascade] = llm.stats().cascade_saved_token_reads
    assert tokens[True] == tokens[False]
    assert saved == {True: 0, False: 0}


def test_the_cli_turns_cascade_off(tmp_path, tiny_model_dirs):
    from job_helpers import invoke, read_lines, tiny_args, write_jsonl

    # Long enough for the torch backend's rule (a prefix of TORCH_RULE.min_prefix_tokens).
    instruction = "Read the review below and say whether it is positive or negative. " * 18
    records = [{"id": i, "prompt": instruction + f"Review {i}: it was fine."} for i in range(4)]
    source = write_jsonl(tmp_path / "in.jsonl", records)
    lines = {}
    for flag in ("--cascade", "--no-cascade"):
        out = tmp_path / f"out{flag}.jsonl"
        args = tiny_args(tiny_model_dirs["llama"], flag, "--block-size", "4", "--num-blocks", "512")
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
        llm = LLM(str(smollm2_dir), device="cpu", dtype="float32", num_blocks=512, cascade=cascade)
        outputs = llm.generate(rows, params)
        return [o.completions[0].token_ids for o in outputs], llm.stats()

    with_cascade, stats = run(True)
    without, plain = run(False)
    assert with_cascade == without
    assert stats.cascade_saved_token_reads > 0 and plain.cascade_saved_token_reads == 0


def test_the_torch_rule_groups_sequences_behind_long_prefixes_only():
    size = 16
    need = TORCH_RULE.min_prefix_tokens // size  # blocks of the shortest prefix it takes
    long, short = np.arange(need), 100 + np.arange(need - 1)
    rows = np.array([[*long, 50 + i] for i in range(4)]
                    + [[*short, 60 + i, 0] for i in range(2)], dtype=np.int32)  # fmt: skip
    begins = np.array([need * size + 3] * 4 + [(need - 1) * size + 3] * 2)
    ends = begins + 1
    ends[2] = begins[2] + 5  # 2 extends: 5 new tokens
    decoding = ends - begins == 1
    num_blocks = -(-ends // size)
    # The extending member joins; the shorter prefix's pair does not.
    assert plan_cascade(rows, num_blocks, begins, size, TORCH_RULE, decoding) == [
        CascadeGroup((0, 1, 2, 3), need)
    ]
    # Any group: the shorter prefix's pair too.
    assert plan_cascade(rows, num_blocks, begins, size, ANY_GROUP, decoding) == [
        CascadeGroup((0, 1, 2, 3), need),
        CascadeGroup((4, 5), need - 1),
    ]
    decodes_only = CascadeRule(TORCH_RULE.min_prefix_tokens, extends=False)
    assert plan_cascade(rows, num_blocks, begins, size, decodes_only, decoding) == [
        CascadeGroup((0, 1, 3), need)
    ]
    with pytest.raises(ValueError, match="decoding"):
        plan_cascade(rows, num_blocks, begins, size, decodes_only)


def test_the_torch_backend_cascades_behind_a_long_prefix_and_nothing_else(tiny_model_dirs):
    llm = LLM(
        tiny_model_dirs["qwen3"], device="cpu", dtype="float32", block_size=BS, num_blocks=512
    )
    assert llm.engine.runner.cascade_rule == TORCH_RULE
    vocab = llm.model.config.vocab_size
    gen = torch.Generator().manual_seed(2)
    instruction = torch.randint(3, vocab, (TORCH_RULE.min_prefix_tokens + 3,), generator=gen)
    long = [instruction.tolist() + torch.randint(3, vocab, (2 + i,), generator=gen).tolist()
            for i in range(5)]  # fmt: skip
    plans = []
    prepare = llm.engine.runner.prepare  # the real one, its plans recorded

    def recording(out):
        batch = prepare(out)
        plans.append((batch.cascade, batch.query_lens_host))
        return batch

    llm.engine.runner.prepare = recording
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    tokens = [o.completions[0].token_ids for o in llm.generate(long, params)]
    made = [(p, lens) for p, lens in plans if p is not None]
    assert made and llm.stats().cascade_saved_token_reads > 0
    for plan, _ in made:
        for group in plan.groups:
            assert group.num_prefix_blocks * BS >= TORCH_RULE.min_prefix_tokens
    # the prompts after the first extend behind the cached instruction, in its group
    assert any(lens[i] > 1 for plan, lens in made for g in plan.groups for i in g.seqs)
    plain = LLM(tiny_model_dirs["qwen3"], device="cpu", dtype="float32", block_size=BS,
                num_blocks=512, cascade=False)  # fmt: skip
    assert [o.completions[0].token_ids for o in plain.generate(long, params)] == tokens
    # The tiny prompts' 21- and 9-token instructions are too short for the rule.
    plans.clear()
    before = llm.stats().cascade_saved_token_reads
    llm.generate(shared_prompts(vocab, seed=7), params)
    assert all(p is None for p, _ in plans)
    assert llm.stats().cascade_saved_token_reads == before
