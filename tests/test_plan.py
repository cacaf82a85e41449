"""`pagedbatch plan`: exact figures on a crafted job, and agreement with a real run."""

from __future__ import annotations

import json
import random

from typer.testing import CliRunner

from pagedbatch import LLM, SamplingParams
from pagedbatch.cli.app import app
from pagedbatch.job.plan import SharedPrefix, make_plan
from pagedbatch.job.reader import read_records


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
    assert plan.largest_shared_prefixes[0] == SharedPrefix(tokens=6, records=3)
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
    llm = LLM(model, device="cpu", num_blocks=256)
    llm.generate(read_records(src), SamplingParams(max_tokens=4))
    stats = llm.stats()
    assert plan["prompt_tokens"] == stats.prompt_tokens
    assert abs(plan["predicted_hit_rate"] - stats.prefix_hit_rate) <= 0.05
    assert plan["predicted_hit_rate"] > 0.5
