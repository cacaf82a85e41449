"""`bench --host-overhead`: the phase timer's accounting and the bench's rows, tiny and on CPU
(what is measured and how it adds up, never how fast)."""

from __future__ import annotations

import itertools

import pytest

from pagedbatch.bench import host_overhead
from pagedbatch.bench.host_overhead import HOST_PHASES, WORKLOADS, measure_host_overhead
from pagedbatch.bench.phase_timer import PhaseTimer
from pagedbatch.engine import sampler


class Work:
    """Each call advances the fake clock: `outer` by 1 around `inner`, which takes 10."""

    def __init__(self, ticks: itertools.count) -> None:
        self.ticks = ticks

    def outer(self) -> None:
        next(self.ticks)
        self.inner()

    def inner(self) -> None:
        for _ in range(10):
            next(self.ticks)


def test_phase_times_are_exclusive_and_wrappers_are_removed():
    ticks = itertools.count()
    work = Work(ticks)
    timer = PhaseTimer(lambda: float(next(ticks)))
    with timer.wrapped(work, "outer", "a"), timer.wrapped(work, "inner", "b", device=True):
        work.outer()
        times = timer.take()
        assert timer.take() == {}
    # outer: 1 tick of its own + inner's clock reads; inner: 10 ticks + 1 for its first read
    assert times["b"] == 11
    assert times["a"] == 3  # its tick, the clock read that started inner, the one it ended with
    assert timer.device_phases == {"b"}
    assert "outer" not in vars(work) and "inner" not in vars(work)
    original = sampler.pack
    with timer.wrapped(sampler, "pack", "p"):
        assert sampler.pack is not original
    assert sampler.pack is original


@pytest.mark.parametrize("workload", WORKLOADS)
def test_every_workload_reports_every_phase(workload):
    r = measure_host_overhead(workload, running_seqs=8, blocks_per_seq=4, steps=3, repeats=2)
    assert (r.workload, r.running_seqs, r.blocks_per_seq, r.repeats) == (workload, 8, 4, 2)
    assert r.steps == 3 if workload != "choices" else 1 <= r.steps <= 3
    assert set(r.phases_ms) == set(HOST_PHASES)
    assert r.host_ms_per_step > 0 and r.forward_ms > 0
    assert r.phases_ms["schedule"] > 0 and r.phases_ms["prepare"] > 0
    assert min(v for k, v in r.phases_ms.items() if k != "other") >= 0


def test_shared_prompts_share_an_instruction_and_differ_in_length():
    shared = host_overhead._prompts("shared", 20, 100, 16, seed=0)
    assert len({tuple(p[:52]) for p in shared}) == 1  # 100 - 3 blocks of own text
    assert len({len(p) for p in shared}) == 16  # block boundaries come at different steps
    random = host_overhead._prompts("random", 20, 100, 16, seed=0)
    assert len({p[0] for p in random}) > 10
