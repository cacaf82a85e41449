"""`pagedbatch plan` over a job file: the streaming pipeline's figures are those that the
record-by-record plan of before gave (recorded from it), and its sums match a plain
Python recount on random prompts."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pagedbatch.cli.app import app
from pagedbatch.cli.plan import plan_job
from pagedbatch.engine.block_pool import blocks_for
from pagedbatch.job.settings import resolve_settings
from pagedbatch.plan.plan import PlanPrompts, make_plan
from pagedbatch.requests.prompt_store import common_prefix

ROOT = Path(__file__).resolve().parent.parent
INSTRUCTION = "Sort the support ticket into billing, shipping or other. Answer with one word. "
TAILS = (
    "my card was charged twice", "my card was declined", "the parcel is late",
    "the parcel never came", "the parcel came broken", "where is my refund",
    "I want to change my address", "thanks!",
)  # fmt: skip


def _crafted_job(path: Path) -> Path:
    """8 records after one instruction (one with its own max_tokens, one with n=3), two
    too long, four left out (bad params, empty, no prompt, a broken message), a chat one
    and one on its own."""
    rows = [{"id": f"t{i}", "prompt": INSTRUCTION + "Ticket: " + t} for i, t in enumerate(TAILS)]
    rows[1]["max_tokens"], rows[2]["n"] = 40, 3
    rows += [
        {"id": "long-1", "prompt": INSTRUCTION * 4},
        {"id": "bad-params", "prompt": INSTRUCTION + "x", "max_tokens": "many"},
        {"id": "empty", "prompt": ""},
        {"id": "no-prompt", "text": "hello"},
        {"id": "chat", "messages": [{"role": "user", "content": "Ticket: the parcel is late"}]},
        {"id": "bad-chat", "messages": [{"role": "user"}]},
        {"id": "long-2", "prompt": "z" * 400},
        {"id": "alone", "prompt": "Translate to French: good morning"},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


CRAFTED = ["-m", "tiny-random", "--device", "cpu", "--num-blocks", "64",
           "--max-model-len", "256", "--max-tokens", "8"]  # fmt: skip
CRAFTED_PLAN = {  # what the plan of before gave for this job
    "records": 16, "would_run": 10,
    "invalid": {"invalid_params": 1, "invalid_record": 3},
    "prompt_tokens": 932, "tokens_to_compute": 324,
    "predicted_hit_rate": 0.6523605150214592, "too_long": ["long-1", "long-2"],
    "blocks_needed": 72, "blocks_needed_shared": 34, "num_blocks": 64,
    "concurrent_sequences": 18,
    "largest_shared_prefixes": [{"tokens": 87, "records": 8, "longest_tokens": 99}],
    "output_tokens": 128, "max_model_len": 256, "estimate": None,
    "weight_bytes": 271168, "weights": "full precision", "kv_dtype": "float32",
    "kv_bytes_per_token": 128,
    "constrained_records": 0, "constraint_problems": [],
    "tensor_parallel": 1, "rank_weight_bytes": None, "rank_kv_bytes": None,
    "pool_from_job": False,  # --num-blocks given
}  # fmt: skip


def test_plan_of_a_job_is_the_plan_of_before(tmp_path):
    src = _crafted_job(tmp_path / "job.jsonl")
    result = CliRunner().invoke(app, ["plan", str(src), *CRAFTED, "--no-estimate", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == CRAFTED_PLAN


def test_plan_job_reports_reading_and_tokenizing(tmp_path):
    src = _crafted_job(tmp_path / "job.jsonl")
    flags = {"model": "tiny-random", "device": "cpu", "num_blocks": 64, "max_model_len": 256}
    settings = resolve_settings({**flags, "max_tokens": 8})
    read, tokenized = [], []
    plan, prompts = plan_job(str(src), settings, read.append, lambda *d: tokenized.append(d))
    assert read[-1] == 16 and tokenized[-1] == (16, 16)
    assert plan.to_json() == CRAFTED_PLAN
    assert (len(prompts.store), prompts.samples, prompts.records) == (10, 12, 16)
    first = prompts.first(3)  # what the probe gets: the first prompts in sorted order
    assert first == sorted(first) and len(first) == 3


def test_label_job_plan_json_is_as_before():
    args = ["plan", str(ROOT / "examples" / "label_job.jsonl"), "-m", "tiny-random"]
    args += ["--device", "cpu", "--num-blocks", "4096", "--no-estimate", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "records": 120, "would_run": 120, "invalid": {},
        "prompt_tokens": 327559, "tokens_to_compute": 10615,
        "predicted_hit_rate": 0.9675936243546964, "too_long": [],
        "blocks_needed": 20588, "blocks_needed_shared": 779, "num_blocks": 4096,
        "concurrent_sequences": 630,
        "largest_shared_prefixes": [{"tokens": 2651, "records": 120, "longest_tokens": 2734}],
        "output_tokens": 960, "max_model_len": 8192, "estimate": None,
        "weight_bytes": 271168, "weights": "full precision", "kv_dtype": "float32",
        "kv_bytes_per_token": 128,
        "constrained_records": 0, "constraint_problems": [],
        "tensor_parallel": 1, "rank_weight_bytes": None, "rank_kv_bytes": None,
        "pool_from_job": False,  # --num-blocks given
    }  # fmt: skip


def _recount(prompts, block_size: int, max_model_len: int) -> dict[str, int]:
    """The plan's sums, as the plan of before made them: Python lists, sorted."""
    runs = sorted((p for p in prompts if len(p[1]) < max_model_len), key=lambda p: p[1])
    lcps = [0] + [common_prefix(a[1], b[1]) for a, b in zip(runs, runs[1:])]
    cached = [min(c, len(p[1]) - 1) // block_size * block_size for c, p in zip(lcps, runs)]
    needed = [blocks_for(min(len(p[1]) + p[2], max_model_len), block_size) for p in runs]
    return {
        "records": len(prompts),
        "prompt_tokens": sum(len(p[1]) for p in runs),
        "tokens_to_compute": sum(len(p[1]) for p in runs) - sum(cached),
        "blocks_needed": sum(needed),
        "blocks_needed_shared": sum(needed) - sum(cached) // block_size,
        "output_tokens": sum(min(p[2], max_model_len - len(p[1])) * p[3] for p in runs),
    }


@pytest.mark.parametrize("seed", range(5))
def test_plan_sums_match_a_recount(seed):
    rng = random.Random(seed)
    heads = [[rng.randrange(4) for _ in range(rng.randint(0, 50))] for _ in range(3)]
    prompts = []
    for i in range(rng.randint(1, 80)):
        head = rng.choice(heads)[: rng.randint(0, 50)]
        ids = head + [rng.randrange(4) for _ in range(rng.randint(1, 20))]
        prompts.append((i, ids, rng.randint(1, 30), rng.randint(1, 3)))
    block_size, max_model_len = rng.choice([1, 4, 16]), rng.randint(10, 70)
    plan = make_plan(prompts, block_size=block_size, num_blocks=99, max_model_len=max_model_len)
    figures = {k: v for k, v in plan.to_json().items() if k in _recount(prompts, 1, 1)}
    assert figures == _recount(prompts, block_size, max_model_len)
    assert plan.too_long == [p[0] for p in prompts if len(p[1]) >= max_model_len]


def test_prompts_sorted_out_for_another_context_are_refused():
    prompts = PlanPrompts.of([("a", [1, 2, 3], 4)], max_model_len=10)
    with pytest.raises(ValueError, match="context of 10 tokens"):
        make_plan(prompts, block_size=4, num_blocks=10, max_model_len=20)
