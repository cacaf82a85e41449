"""KV usage counters, kept as blocks move, agree with a recount after every step."""

from __future__ import annotations

import random

import pytest

from pagedbatch import LLM, Record, SamplingParams
from pagedbatch.engine.memory import count_snapshot


def _jobs(seed: int, count: int) -> list[Record]:
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, 200) for _ in range(rng.randrange(1, 14))] for _ in range(3)]
    records = []
    for i in range(count):
        tail = [rng.randrange(3, 200) for _ in range(rng.randrange(1, 9))]
        records.append(
            Record(
                id=i,
                prompt_token_ids=tuple(rng.choice(prefixes) + tail),
                overrides={"n": rng.choice([1, 1, 2, 3]), "max_tokens": rng.randrange(1, 12)},
            )
        )
    return records


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_counters_equal_a_recount_after_every_step(tiny_model_dirs, seed):
    # A small pool (preemption, eviction), small steps (chunked prefill), shared prefixes
    # (cached blocks), n > 1 (forks and copy-on-write of a shared partial block).
    llm = LLM(tiny_model_dirs["llama"], device="cpu", block_size=4, num_blocks=16,
              max_batch_tokens=16, max_num_seqs=6)  # fmt: skip
    engine = llm.engine
    usage = engine.block_manager.usage
    checked = []

    def on_step(stats) -> None:
        running = engine.scheduler.running
        pool = engine.pool
        now = usage.snapshot(stats.steps, running, pool.num_used, pool.num_free)
        recount = count_snapshot(stats.steps, running, pool.num_used, pool.num_free, 4)
        assert now == recount, f"step {stats.steps}"
        assert stats.blocks_in_use == recount.in_use
        assert stats.cached_blocks == recount.cached and stats.free_blocks == recount.free
        checked.append(recount.shared)

    params = SamplingParams(temperature=0.8, seed=seed, ignore_eos=True)
    llm.generate(_jobs(seed, 14), params, on_step=on_step)
    stats = llm.stats()
    assert len(checked) == stats.steps > 10
    assert stats.preemptions > 0 and any(checked), "the run did not exercise sharing/preemption"
    assert (usage.in_use, usage.shared, usage.logical, usage.live_slots) == (0, 0, 0, 0)


def test_peak_is_the_same_with_and_without_the_timeline(tiny_model_dirs):
    reports = []
    for keep in (True, False):
        llm = LLM(tiny_model_dirs["llama"], device="cpu", block_size=4, num_blocks=40,
                  memory_report=keep)  # fmt: skip
        llm.generate(_jobs(5, 10), SamplingParams(temperature=0.5, seed=1, ignore_eos=True))
        reports.append(llm.memory_report())
    with_timeline, without = reports
    assert with_timeline["timeline"] and not without["timeline"]
    with_timeline.pop("timeline"), without.pop("timeline")
    assert with_timeline == without
