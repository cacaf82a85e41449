"""Scheduler on tiny pools, without a model: admission, chunked prefill, decode,
preemption, cleanup, and the step's postprocess (commit, forks, append, stop, finish)."""

from __future__ import annotations

from tiny_models import build_tiny_tokenizer

from pagedbatch.engine.block_manager import BlockManager
from pagedbatch.engine.block_pool import BlockPool
from pagedbatch.engine.scheduler import Scheduler
from pagedbatch.engine.sequence import Sequence, SequenceStatus
from pagedbatch.engine.stopping import StopChecker
from pagedbatch.sampling_params import SamplingParams

EOS = 2  # the tiny tokenizer's <|im_end|>
STOP = StopChecker(build_tiny_tokenizer(), frozenset({EOS}))


def make_scheduler(num_blocks: int, budget: int, block_size: int = 4, max_seqs: int = 8):
    pool = BlockPool(num_blocks)
    return Scheduler(BlockManager(pool, block_size), budget, max_seqs), pool


def make_seq(seq_id: int, prompt_len: int, max_new: int, **params: object) -> Sequence:
    return Sequence(
        seq_id,
        [1] * prompt_len,
        prompt_len,
        SamplingParams(max_tokens=max_new, **params),
        prompt_len + max_new,
    )


def step(scheduler: Scheduler, token: int = 0) -> list[tuple[int, int]]:
    """One engine step without a model: every sampling sequence samples `token`."""
    out = scheduler.schedule()
    plan = [(s.seq.seq_id, s.num_new_tokens) for s in out.scheduled]
    sampling = [s.seq for s in out.scheduled if s.samples]
    assert out.sampling == sampling  # worked out as they were scheduled, by the same rule
    scheduler.commit(out, sampling)
    scheduler.postprocess(sampling, [token] * len(sampling), STOP)
    return plan


def test_admits_first_come_first_served_and_chunks_the_prompt_that_overflows_the_budget():
    scheduler, pool = make_scheduler(num_blocks=16, budget=16)
    seqs = [make_seq(i, 10, 3) for i in range(3)]
    for s in seqs:
        scheduler.add(s)
    assert step(scheduler) == [(0, 10), (1, 6)]
    assert seqs[0].block_table == [0, 1, 2]
    assert seqs[1].block_table == [3, 4]
    assert seqs[0].num_output_tokens == 1  # its prompt is done: it sampled
    assert seqs[1].num_output_tokens == 0  # chunk 1 of 2: nothing sampled
    # Decode of seq 0 first, then the rest of seq 1's prompt, then seq 2 gets what is left.
    assert step(scheduler) == [(0, 1), (1, 4), (2, 10)]
    assert seqs[2].status is SequenceStatus.RUNNING


def test_decodes_one_token_per_running_sequence_each_step():
    scheduler, _ = make_scheduler(num_blocks=16, budget=64)
    seqs = [make_seq(i, 5, 4) for i in range(3)]
    for s in seqs:
        scheduler.add(s)
    assert step(scheduler) == [(0, 5), (1, 5), (2, 5)]
    assert step(scheduler) == [(0, 1), (1, 1), (2, 1)]
    assert [s.num_output_tokens for s in seqs] == [2, 2, 2]


def test_preempts_the_most_recently_admitted_sequence_when_blocks_run_out():
    scheduler, pool = make_scheduler(num_blocks=4, budget=64)
    old, new = make_seq(0, 8, 6), make_seq(1, 7, 6)
    scheduler.add(old)
    scheduler.add(new)
    assert step(scheduler) == [(0, 8), (1, 7)]  # blocks 0,1 and 2,3: pool full
    assert (old.block_table, new.block_table) == ([0, 1], [2, 3])
    # old's 9th token needs a third block: new is preempted and its blocks freed.
    assert step(scheduler) == [(0, 1)]
    assert scheduler.num_preemptions == 1
    assert scheduler.num_recomputed_tokens == 7
    assert new.status is SequenceStatus.WAITING and new.block_table == []
    assert new.num_computed_tokens == 0 and new.num_output_tokens == 1
    assert old.block_table == [0, 1, 2]
    assert list(scheduler.waiting) == [new]


def test_a_lone_sequence_that_cannot_grow_preempts_itself_and_resumes():
    scheduler, pool = make_scheduler(num_blocks=3, budget=64)
    a, b = make_seq(0, 4, 5), make_seq(1, 4, 5)
    scheduler.add(a)
    scheduler.add(b)
    while scheduler.has_unfinished():
        step(scheduler)
        pool.check_integrity()
    assert a.num_output_tokens == 5 and b.num_output_tokens == 5
    assert scheduler.num_preemptions >= 1
    assert pool.num_free == 3


def test_every_block_is_free_after_a_run_with_chunking_and_preemption():
    scheduler, pool = make_scheduler(num_blocks=10, budget=7, max_seqs=4)
    seqs = [make_seq(i, 3 + 5 * i % 13, 8 + 3 * (i % 4)) for i in range(9)]
    for s in seqs:
        scheduler.add(s)
    steps = 0
    while scheduler.has_unfinished():
        plan = step(scheduler)
        assert sum(n for _, n in plan) <= 7
        assert len(scheduler.running) <= 4
        pool.check_integrity()
        steps += 1
        assert steps < 500, "no progress: the scheduler deadlocked"
    assert all(s.num_output_tokens == s.max_len - s.num_prompt_tokens for s in seqs)
    assert pool.num_free == 10
    assert scheduler.num_preemptions > 0


def test_postprocess_appends_and_finishes_on_eos_or_length_and_frees_the_blocks():
    scheduler, pool = make_scheduler(num_blocks=8, budget=64)
    short, long, deaf = make_seq(0, 3, 1), make_seq(1, 3, 5), make_seq(2, 3, 5, ignore_eos=True)
    for s in (short, long, deaf):
        scheduler.add(s)
    out = scheduler.schedule()
    scheduler.commit(out, [short, long, deaf])
    assert [s.num_computed_tokens for s in (short, long, deaf)] == [3, 3, 3]
    assert scheduler.postprocess([short, long, deaf], [7, 8, 9], STOP) == [short]
    assert short.token_ids == [1, 1, 1, 7] and short.finish_reason == "length"
    assert short.status is SequenceStatus.FINISHED and short.block_table == []
    assert list(scheduler.running) == [long, deaf] and pool.num_free == 6
    out = scheduler.schedule()
    scheduler.commit(out, [long, deaf])
    assert scheduler.postprocess([long, deaf], [EOS, EOS], STOP) == [long]
    assert long.finish_reason == "stop" and long.token_ids[-1] == EOS
    assert deaf.finish_reason is None and list(scheduler.running) == [deaf]  # ignore_eos
    pool.check_integrity()


def test_commit_starts_the_forks_on_the_computed_prompt():
    scheduler, pool = make_scheduler(num_blocks=8, budget=64)
    parent = make_seq(0, 6, 3)
    parent.forks = [make_seq(1, 6, 3), make_seq(2, 6, 3)]
    scheduler.add(parent)
    out = scheduler.schedule()
    assert [(s.seq.seq_id, s.num_new_tokens) for s in out.scheduled] == [(0, 6)]
    children = list(parent.forks)
    scheduler.commit(out, [parent, *children])
    assert parent.forks == [] and list(scheduler.running) == [parent, *children]
    assert all(c.block_table == [0, 1] and c.num_computed_tokens == 6 for c in children)
    assert [pool.refcount(b) for b in (0, 1)] == [3, 3]
    assert scheduler.postprocess([parent, *children], [4, 5, 6], STOP) == []
    assert [s.token_ids[-1] for s in (parent, *children)] == [4, 5, 6]
    # The next write lands in shared block 1 (2 of its 4 slots used): all but one copy it.
    out = scheduler.schedule()
    assert len(out.copies) == 2 and {c.src for c in out.copies} == {1}
    pool.check_integrity()
