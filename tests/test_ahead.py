"""ahead(): work one batch ahead in a worker thread, results in order, errors raised."""

from __future__ import annotations

import threading

import pytest

from pagedbatch.requests.ahead import ahead


def test_results_come_in_order_from_one_worker_thread_one_batch_ahead():
    read, threads = [], set()

    def batches():
        for i in range(5):
            read.append(i)
            yield i

    def work(batch: int) -> int:
        threads.add(threading.get_ident())
        return batch * 10

    seen = []
    for batch, result in ahead(batches(), work):
        seen.append((batch, result))
        assert len(read) == min(batch + 2, 5)  # the next batch was read before this came
    assert seen == [(i, i * 10) for i in range(5)]
    assert len(threads) == 1 and threading.get_ident() not in threads


def test_an_error_in_the_work_is_raised_to_the_caller():
    def work(batch: int) -> int:
        if batch == 2:
            raise ValueError("bad batch")
        return batch

    got = []
    with pytest.raises(ValueError, match="bad batch"):
        for batch, _ in ahead(range(4), work):
            got.append(batch)
    assert got == [0, 1]


def test_no_batches_no_results():
    assert list(ahead([], lambda b: b)) == []
