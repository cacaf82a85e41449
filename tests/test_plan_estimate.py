"""`pagedbatch plan`'s time estimate: its arithmetic, the probe, the last run's stored rates.

Nothing here depends on how fast this machine is: rates are checked for being positive and
for being used as the arithmetic says, never for their size.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from pagedbatch import LLM, SamplingParams
from pagedbatch.bench.rate_probe import CPU_PREFILL_TOKENS, probe_prompts, probe_rates
from pagedbatch.cli.app import app
from pagedbatch.cli.plan import duration
from pagedbatch.engine.config import EngineConfig
from pagedbatch.engine.stats import EngineStats
from pagedbatch.plan.estimate import estimate_time
from pagedbatch.plan.rates import (
    LAST_RUN,
    PROBE,
    Rates,
    last_run_rates,
    load_rates,
    rates_from_stats,
    rates_key,
    rates_path,
    store_rates,
)


def test_estimate_arithmetic():
    rates = Rates(prefill_tok_s=2000.0, decode_tok_s=240.0, decode_seqs=64.0, source=PROBE)
    e = estimate_time(4031, 960, rates, running_seqs=120, load_seconds=1.5)
    assert e.prefill_seconds == 4031 / 2000 == 2.0155
    assert e.decode_seconds == 960 / 240 == 4.0
    assert e.seconds == 2.0155 + 4.0
    assert (e.prefill_tokens, e.output_tokens, e.running_seqs) == (4031, 960, 120)
    assert e.to_json()["rates"] == {
        "prefill_tok_s": 2000.0, "decode_tok_s": 240.0, "decode_seqs": 64.0,
        "source": "probe", "measured_at": "",
    }  # fmt: skip
    assert e.to_json()["load_seconds"] == 1.5


def test_rates_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        Rates(prefill_tok_s=0.0, decode_tok_s=1.0, decode_seqs=1.0, source=PROBE)


def test_duration_text():
    assert [duration(s) for s in (0.44, 12.4, 185, 7620)] == [
        "0.4 s", "12 s", "3 min 05 s", "2 h 07 min",
    ]  # fmt: skip


def _stats(**timed: float) -> EngineStats:
    zeros = {f.name: 0 for f in dataclasses.fields(EngineStats)}
    return EngineStats(**{**zeros, **timed})


def test_rates_from_step_totals():
    stats = _stats(
        prefill_step_seconds=2.0, prefill_step_tokens=5000,
        decode_step_seconds=4.0, decode_step_tokens=800, decode_steps=10,
    )  # fmt: skip
    rates = rates_from_stats(stats, LAST_RUN)
    assert (rates.prefill_tok_s, rates.decode_tok_s, rates.decode_seqs) == (2500, 200, 80)
    assert rates.source == LAST_RUN and rates.measured_at
    assert rates_from_stats(_stats(prefill_step_seconds=1.0, prefill_step_tokens=9), PROBE) is None


def test_stored_rates_round_trip_by_key(tmp_path):
    path = tmp_path / "cache" / "rates.json"
    a = Rates(100.0, 20.0, 8.0, LAST_RUN, "2025-01-31 14:05")
    b = Rates(300.0, 50.0, 64.0, PROBE, "2025-02-01 09:00")
    assert load_rates(path, "a") is None  # no file yet
    store_rates(path, "a", a)
    store_rates(path, "b", b)
    assert load_rates(path, "a") == a
    assert load_rates(path, "b") == dataclasses.replace(b, source=LAST_RUN)  # read back: stored
    assert load_rates(path, "c") is None
    store_rates(path, "a", b)  # a newer run replaces its key's rates only
    assert load_rates(path, "a").prefill_tok_s == 300.0
    assert load_rates(path, "b").prefill_tok_s == 300.0
    assert sorted(json.loads(path.read_text())) == ["a", "b"]
    path.write_text("{torn")
    assert load_rates(path, "a") is None
    store_rates(path, "a", a)  # an unreadable file is replaced
    assert load_rates(path, "a") == a


def test_rates_key_names_model_device_dtype_threads(tmp_path):
    config = EngineConfig(model="tiny-random", device="cpu", dtype="float32")
    key = rates_key(config, 3)
    assert key == "tiny-random | cpu | float32 | 3 threads"
    assert rates_key(config, 2) != key
    assert rates_key(config.replace(dtype="bfloat16"), 3) != key
    assert rates_key(config.replace(model="smollm2-135m"), 3) != key
    assert rates_path(config.replace(cache_dir=str(tmp_path))) == tmp_path / "rates.json"


def test_probe_prompts_fill_one_step_and_end_one_token_past_a_block():
    shared = list(range(100, 140))  # 40 tokens
    prompts = [shared + [i] * 10 for i in range(10)]  # 50 tokens, 10 of them their own
    chosen = probe_prompts(prompts, budget=80, max_len=1000, block_size=16, most=8)
    # Each cut to 49 tokens (3 blocks + 1); the first costs 49, the next 9 each: 49 + 3 x 9.
    assert [len(p) for p in chosen] == [49] * 4
    assert chosen == [p[:49] for p in sorted(prompts)[:4]]
    assert len(probe_prompts(prompts, budget=80, max_len=1000, block_size=16, most=2)) == 2
    long = probe_prompts([list(range(3, 500))], budget=100, max_len=1000, block_size=16, most=4)
    assert [len(p) for p in long] == [97]  # one prompt, cut to the budget


def test_probe_measures_positive_rates_at_the_batch_asked(tmp_path):
    config = EngineConfig(
        model="tiny-random", device="cpu", dtype="float32", num_blocks=512, cache_dir=str(tmp_path)
    )
    prompts = [[3 + (i * 7 + j) % 200 for j in range(40 + i)] for i in range(12)]
    result = probe_rates(config, prompts, running_seqs=12, max_model_len=8192)
    rates = result.rates
    assert rates.source == PROBE
    assert rates.prefill_tok_s > 0 and rates.decode_tok_s > 0
    assert rates.decode_seqs == 12  # every decode-only step ran the whole batch
    assert 0 < result.load_seconds <= result.seconds


def test_a_probe_on_a_cpu_prefills_a_few_hundred_tokens_not_a_whole_step(tmp_path):
    """One 2048-token step took most of a minute with a 135M model on one CPU thread."""
    config = EngineConfig(
        model="tiny-random", device="cpu", num_blocks=512, cache_dir=str(tmp_path)
    )
    prompts = [[3 + (i * 7 + j) % 200 for j in range(300)] for i in range(12)]
    result = probe_rates(config, prompts, running_seqs=12, max_model_len=8192)
    assert config.max_batch_tokens == 2048
    assert 0 < result.prefill_tokens <= CPU_PREFILL_TOKENS


def test_engine_splits_step_time_into_prefill_and_decode():
    llm = LLM("tiny-random", device="cpu", dtype="float32", num_blocks=256)
    llm.generate([[3, 4, 5, 6, 7]] * 3, SamplingParams(max_tokens=6, ignore_eos=True))
    s = llm.stats()
    assert s.prefill_step_tokens + s.decode_step_tokens == s.computed_tokens
    assert s.decode_steps == 5 and s.decode_step_tokens == 15  # 3 sequences, 5 decode steps
    assert s.prefill_step_seconds > 0 and s.decode_step_seconds > 0


def _job(tmp_path, records: int = 6) -> str:
    src = tmp_path / "job.jsonl"
    lines = [
        {"id": i, "prompt": f"Say yes or no. Item {i}:", "max_tokens": 5} for i in range(records)
    ]
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(src)


def test_plan_json_has_the_estimate_from_a_probe_then_from_the_last_run(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDBATCH_CACHE", str(tmp_path / "cache"))
    src = _job(tmp_path)
    args = ["plan", src, "-m", "tiny-random", "--device", "cpu", "--threads", "1", "--json"]
    probed = CliRunner().invoke(app, args)
    assert probed.exit_code == 0, probed.output
    plan = json.loads(probed.stdout)
    e = plan["estimate"]
    assert e["rates"]["source"] == "probe" and e["load_seconds"] > 0
    assert e["prefill_tokens"] == plan["tokens_to_compute"]
    assert e["output_tokens"] == plan["output_tokens"] == 6 * 5
    assert e["running_seqs"] == 6

    run = CliRunner().invoke(
        app, ["run", src, "-m", "tiny-random", "--device", "cpu", "--threads", "1",
              "--ignore-eos", "--no-progress", "-o", str(tmp_path / "out.jsonl")],
    )  # fmt: skip
    assert run.exit_code == 0, run.output
    stored = last_run_rates(EngineConfig(model="tiny-random", device="cpu", threads=1))
    assert stored is not None and stored.source == LAST_RUN

    again = json.loads(CliRunner().invoke(app, args).stdout)["estimate"]
    assert again["rates"] == dataclasses.asdict(stored)
    assert again["load_seconds"] is None
    assert again["seconds"] == pytest.approx(
        plan["tokens_to_compute"] / stored.prefill_tok_s + 30 / stored.decode_tok_s
    )
    forced = json.loads(CliRunner().invoke(app, [*args, "--probe"]).stdout)["estimate"]
    assert forced["rates"]["source"] == "probe"


def test_plan_without_estimate_loads_no_model(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDBATCH_CACHE", str(tmp_path / "cache"))
    import pagedbatch.llm

    monkeypatch.setattr(pagedbatch.llm.LLM, "__init__", lambda *a, **k: pytest.fail("loaded"))
    args = ["plan", _job(tmp_path), "-m", "tiny-random", "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--no-estimate", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["estimate"] is None
    table = CliRunner().invoke(app, [*args, "--no-estimate"])
    assert "not asked (--no-estimate)" in table.stdout


def test_probe_keeps_prompts_shorter_than_a_block_whole():
    chosen = probe_prompts(
        [[5, 6, 7], [5, 6, 8, 9]], budget=80, max_len=1000, block_size=16, most=4
    )
    assert chosen == [[5, 6, 7], [5, 6, 8, 9]]


@pytest.mark.parametrize("texts", [["hi 1", "hi 2", "hi 3"], ["a", "b"]])
def test_plan_probe_measures_prompts_shorter_than_a_block(tmp_path, texts):
    """Every prompt shorter than one KV block (even of one token): the probe measures
    them as they are (it used to cut each to one token and fail: "ran no prefill step")."""
    src = tmp_path / "short.jsonl"
    src.write_text("".join(json.dumps({"id": t, "prompt": t}) + "\n" for t in texts))
    env = {**os.environ, "PAGEDBATCH_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "-m", "pagedbatch", "plan", str(src), "-m", "tiny-random", "--device",
         "cpu", "--threads", "1", "--probe", "--json"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert "estimate_problem" not in plan
    rates = plan["estimate"]["rates"]
    assert rates["source"] == "probe" and rates["prefill_tok_s"] > 0 and rates["decode_tok_s"] > 0
    assert plan["estimate"]["prefill_tokens"] == plan["prompt_tokens"]
