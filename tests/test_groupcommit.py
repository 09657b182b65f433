from __future__ import annotations

import threading
import time

import pytest

from broker.groupcommit import GroupCommit


def test_concurrent_submissions_are_flushed_together_each_with_its_own_result():
    batches = []

    def flush(batch):
        time.sleep(0.01)  # let others queue behind this flush
        batches.append([t.payload for t in batch])
        for t in batch:
            t.result = t.payload * 2

    gc = GroupCommit(flush)
    results = {}
    barrier = threading.Barrier(16)

    def one(i):
        barrier.wait()
        results[i] = gc.submit(i).result

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: 2 * i for i in range(16)}
    assert sorted(p for b in batches for p in b) == list(range(16))  # each flushed once
    assert len(batches) < 16


def test_a_flush_that_raises_fails_every_ticket_and_the_next_batch_still_runs():
    calls = []

    def flush(batch):
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("boom")
        for t in batch:
            t.result = "ok"

    gc = GroupCommit(flush)
    with pytest.raises(RuntimeError):
        gc.submit("a")  # the leader re-raises
    ticket = gc.submit("b")
    assert ticket.error is None and ticket.result == "ok"
