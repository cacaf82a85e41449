"""The engine's persistent step state agrees with a recount from the Python block tables
after every step: the KV usage counters and the rows of the in-place block tables."""

from __future__ import annotations

import random

import pytest
import torch
from kv_counts import count_snapshot

from pagedbatch import LLM, Record, SamplingParams
from pagedbatch.engine.block_tables import BlockTables
from pagedbatch.engine.staging import Uploads


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
def test_step_state_equals_a_recount_after_every_step(tiny_model_dirs, seed):
    # A small pool (preemption, eviction), small steps (chunked prefill), shared prefixes
    # (cached blocks), n > 1 (forks and copy-on-write of a shared partial block).
    llm = LLM(tiny_model_dirs["llama"], device="cpu", dtype="float32", block_size=4, num_blocks=16,
              max_batch_tokens=16, max_num_seqs=6)  # fmt: skip
    engine = llm.engine
    usage = engine.block_manager.usage
    checked = []

    def on_step(stats) -> None:
        running = engine.scheduler.running
        pool = engine.pool
        now = usage.snapshot(stats.steps, running.figures, pool.num_used, pool.num_free)
        recount = count_snapshot(stats.steps, running, pool.num_used, pool.num_free, 4)
        assert now == recount, f"step {stats.steps}"
        assert stats.blocks_in_use == recount.in_use
        assert stats.cached_blocks == recount.cached and stats.free_blocks == recount.free
        tables = engine.block_manager.tables
        device_rows = tables.device(Uploads(torch.device("cpu")))
        rows = [tables.row(seq.seq_id) for seq in running]
        assert len(set(rows)) == len(rows), "two sequences share a row"
        for seq, row in zip(running, rows):
            n = len(seq.block_table)
            assert tables.host[row, :n].tolist() == seq.block_table, f"step {stats.steps}"
            assert device_rows[row, :n].tolist() == seq.block_table
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
        llm = LLM(tiny_model_dirs["llama"], device="cpu", dtype="float32", block_size=4,
                  num_blocks=40, memory_report=keep)  # fmt: skip
        llm.generate(_jobs(5, 10), SamplingParams(temperature=0.5, seed=1, ignore_eos=True))
        reports.append(llm.memory_report())
    with_timeline, without = reports
    assert with_timeline["timeline"] and not without["timeline"]
    with_timeline.pop("timeline"), without.pop("timeline")
    assert with_timeline == without


def test_block_tables_reuse_rows_and_grow_keeping_every_row():
    tables = BlockTables(num_rows=2, width=2)
    tables.write(10, 0, [5, 6])
    tables.write(11, 0, [7])
    view = tables.device(Uploads(torch.device("cpu")))
    assert (tables.row(10), tables.row(11)) == (0, 1)
    tables.write(10, 2, [8, 9, 4])  # past the width: doubles it, rows kept
    tables.write(12, 0, [3])  # past the rows: doubles them
    assert tables.host.shape == (4, 5)
    assert tables.host[tables.row(10), :5].tolist() == [5, 6, 8, 9, 4]
    assert tables.host[tables.row(11), :1].tolist() == [7]
    assert tables.row(12) == 2
    grown = tables.device(Uploads(torch.device("cpu")))
    assert grown is not view  # made anew: the old copy is too small
    assert grown[tables.row(10), :5].tolist() == [5, 6, 8, 9, 4]
    tables.release(11)
    tables.write(13, 0, [1])
    assert tables.row(13) == 1  # the freed row is taken again
    tables.host[0, 0] = 42  # on the CPU the device copy is the array itself
    assert tables.device(Uploads(torch.device("cpu")))[0, 0].item() == 42
