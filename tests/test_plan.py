"""`pagedbatch plan`: exact figures on a crafted job, and agreement with a real run."""

from __future__ import annotations

import json
import random

from typer.testing import CliRunner

from pagedbatch import LLM, SamplingParams
from pagedbatch.cli.app import app
from pagedbatch.inputs.reader import read_records
from pagedbatch.plan.plan import SharedPrefix, make_plan, near_duplicate_tokens


def test_crafted_plan_figures():
    prompts = [
        ("a", [1, 2, 3, 4, 5, 6, 7, 8, 9], 4),
        ("b", [1, 2, 3, 4, 5, 6, 7, 8, 10], 4),
        ("c", [1, 2, 3, 4, 5, 6, 11], 4),
        ("d", [20, 21], 4),
        ("e", list(range(50)), 4),
    ]
    plan = make_plan(prompts, block_size=4, num_blocks=100, max_model_len=40)
    # Sorted: a, b, c, d. b reuses a's 2 full blocks (8 tokens); c shares 6 tokens with b,
    # one whole block (4); d shares nothing; e is too long.
    assert plan.too_long == ["e"]
    assert plan.prompt_tokens == 9 + 9 + 7 + 2
    assert plan.tokens_to_compute == 27 - 8 - 4
    assert plan.predicted_hit_rate == 12 / 27
    assert plan.blocks_needed == 4 + 4 + 3 + 2  # ceil((len + 4) / 4) each
    assert plan.blocks_needed_shared == 4 + (4 - 2) + (3 - 1) + 2
    # a and b share 8 tokens, 2 more than all three: one group, 6 to 8 tokens.
    assert plan.largest_shared_prefixes == [SharedPrefix(tokens=6, records=3, longest_tokens=8)]
    unshared = make_plan(
        prompts, block_size=4, num_blocks=100, max_model_len=40, prefix_sharing=False
    )
    assert unshared.tokens_to_compute == 27 and unshared.predicted_hit_rate == 0


def test_plan_predicts_the_hit_rate_of_the_run(tiny_model_dirs, tmp_path):
    rng = random.Random(5)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    instructions = [" ".join(rng.choices(words, k=n)) for n in (40, 90, 7)]
    lines = []
    for i in range(30):
        text = " ".join(rng.choices(words, k=rng.randint(2, 12)))
        lines.append({"id": i, "prompt": f"{instructions[i % 3]}\nInput: {text}\nAnswer:"})
    src = tmp_path / "job.jsonl"
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    model = str(tiny_model_dirs["qwen2"])
    result = CliRunner().invoke(
        app, ["plan", str(src), "-m", model, "--device", "cpu", "--num-blocks", "256", "--json"]
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["records"] == 30 and plan["too_long"] == []
    llm = LLM(model, device="cpu", dtype="float32", num_blocks=256)
    llm.generate(read_records(src), SamplingParams(max_tokens=4))
    stats = llm.stats()
    assert plan["prompt_tokens"] == stats.prompt_tokens
    assert abs(plan["predicted_hit_rate"] - stats.prefix_hit_rate) <= 0.05
    assert plan["predicted_hit_rate"] > 0.5


def test_crafted_plan_of_a_record_that_scores_choices():
    # a scores two choices of 1 and 3 tokens; b generates 4 tokens. Sorted: a, b; b
    # reuses a's 2 whole blocks.
    prompts = [
        ("a", [1, 2, 3, 4, 5, 6, 7, 8, 9], 4, 1, (1, 3)),
        ("b", [1, 2, 3, 4, 5, 6, 7, 8, 10], 4),
    ]
    plan = make_plan(prompts, block_size=4, num_blocks=100, max_model_len=40)
    assert plan.output_tokens == 4  # b's only: a choice is scored, not generated
    # Each choice computes its tokens but the last (the prompt's last logits score the first).
    assert plan.tokens_to_compute == 18 - 8 + (1 - 1) + (3 - 1)
    # Unshared, each choice holds the prompt and its tokens but the last: 9 and 11 tokens.
    assert plan.blocks_needed == (3 + 3) + 4
    # Shared: a's 2 whole prompt blocks once, each choice its blocks from the partial one
    # on (1 each); b takes a's 2 whole blocks from the cache.
    assert plan.blocks_needed_shared == (2 + 1 + 1) + (4 - 2)
    unshared = make_plan(
        prompts, block_size=4, num_blocks=100, max_model_len=40, prefix_sharing=False
    )
    assert unshared.tokens_to_compute == 18 + (9 + 0) + (9 + 2) - 9
    assert unshared.blocks_needed_shared == unshared.blocks_needed == 10


def test_plan_of_a_choices_job_counts_the_tokens_the_run_computes(tiny_model_dirs, tmp_path):
    rng = random.Random(5)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota"]
    instructions = [" ".join(rng.choices(words, k=n)) for n in (40, 90, 7)]
    lines = []
    for i in range(30):
        text = " ".join(rng.choices(words, k=rng.randint(2, 12)))
        lines.append({"id": i, "prompt": f"{instructions[i % 3]}\nInput: {text}\nAnswer:"})
        if i % 5 == 0:
            lines[-1]["choices"] = ["alpha beta", "gamma"]  # a record's own choices win
    src = tmp_path / "job.jsonl"
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    model = str(tiny_model_dirs["llama"])
    result = CliRunner().invoke(app, [
        "plan", str(src), "-m", model, "--device", "cpu", "--num-blocks", "256", "--json",
        "--no-estimate", "--choices", "yes,no way",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["output_tokens"] == 0
    llm = LLM(model, device="cpu", dtype="float32", num_blocks=256)
    outputs = llm.generate(read_records(src), SamplingParams(choices=("yes", "no way")))
    assert all(o.error is None and o.label for o in outputs)
    assert plan["tokens_to_compute"] == llm.stats().computed_tokens


INSTRUCTION = list(range(100, 400))  # 300 tokens


def test_one_instruction_with_near_duplicate_tails_is_one_group():
    # 20 records: the instruction, then pairs that go on alike for j tokens (the label job's
    # 645/644/643/642-token pairs), then a tail of their own.
    prompts = [
        (i, INSTRUCTION + list(range(500, 500 + i // 2)) + [1000 + i, 7, 8], 4) for i in range(20)
    ]
    plan = make_plan(prompts, block_size=16, num_blocks=1000, max_model_len=1000)
    assert plan.largest_shared_prefixes == [
        SharedPrefix(tokens=300, records=20, longest_tokens=309)
    ]


def test_instructions_that_differ_only_at_the_end_are_one_group():
    ends = ([1, 2], [3, 4, 5])
    prompts = [(i, INSTRUCTION + ends[i % 2] + [1000 + i], 4) for i in range(10)]
    plan = make_plan(prompts, block_size=16, num_blocks=1000, max_model_len=1000)
    assert plan.largest_shared_prefixes == [
        SharedPrefix(tokens=300, records=10, longest_tokens=303)
    ]


def test_distinct_instructions_after_a_common_preamble_are_groups_of_their_own():
    preamble = list(range(20))
    a, b = preamble + list(range(100, 300)), preamble + list(range(300, 480))
    prompts = [(i, (a if i % 2 else b) + [1000 + i], 4) for i in range(20)]
    plan = make_plan(prompts, block_size=16, num_blocks=1000, max_model_len=1000)
    assert plan.largest_shared_prefixes == [
        SharedPrefix(tokens=220, records=10, longest_tokens=220),
        SharedPrefix(tokens=200, records=10, longest_tokens=200),
        SharedPrefix(tokens=20, records=20, longest_tokens=20),
    ]
    # A prefix shorter than a block shares no KV block: no group.
    short = make_plan(prompts, block_size=32, num_blocks=1000, max_model_len=1000)
    assert [g.tokens for g in short.largest_shared_prefixes] == [220, 200]


def test_near_duplicate_rule():
    assert near_duplicate_tokens(100, 16) == 32  # two blocks
    assert near_duplicate_tokens(621, 16) == 77  # an eighth


def test_plan_table_shows_one_group_for_one_instruction(tmp_path):
    # tiny-random's tokenizer is byte-level: one token per byte.
    instruction = "Label the review as positive, negative or mixed. " * 8  # 400 bytes
    starts = ["The blender", "The blanket", "The lamp", "I returned it", "Great", "Awful"]
    lines = [
        {"id": i, "prompt": f"{instruction}\nReview: {starts[i % 6]} {'x' * i}\nLabel:"}
        for i in range(24)
    ]
    src = tmp_path / "job.jsonl"
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    args = ["plan", str(src), "-m", "tiny-random", "--device", "cpu", "--num-blocks", "4096"]
    result = CliRunner().invoke(app, [*args, "--no-estimate", "--json"])
    assert result.exit_code == 0, result.output
    groups = json.loads(result.stdout)["largest_shared_prefixes"]
    assert len(groups) == 1 and groups[0]["records"] == 24
    assert 400 <= groups[0]["tokens"] < groups[0]["longest_tokens"] <= 400 + 50
    table = CliRunner().invoke(app, [*args, "--no-estimate"])
    assert table.exit_code == 0, table.output
    expected = f"{groups[0]['tokens']}-{groups[0]['longest_tokens']} tokens x 24 records"
    assert expected in table.stdout and "shared prefix #2" not in table.stdout
