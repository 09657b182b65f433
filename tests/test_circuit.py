"""Unit tests of broker.circuit: the Redis-shared circuit breaker and the per-worker bulkhead."""

from __future__ import annotations

import threading

import fakeredis
import pytest
import redis

from broker.circuit import Bulkhead, CircuitBreaker, CircuitPolicy, Permit
from broker.errors import TemporarilyUnavailable
from tests.support import FakeClock

POLICY = CircuitPolicy(failure_threshold=3, cool_down_s=5.0, max_cool_down_s=20.0)


class Clock(FakeClock):
    def __init__(self, now: float = 1_000_000.0) -> None:
        super().__init__(now)


@pytest.fixture
def r() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


def breaker(r: redis.Redis, clock: Clock, policy: CircuitPolicy = POLICY) -> CircuitBreaker:
    return CircuitBreaker(r, prefix="t:", policy=policy, clock=clock)


def fail(cb: CircuitBreaker, n: int) -> None:
    for _ in range(n):
        cb.record_failure(cb.before_call())


def test_closed_until_threshold_then_open_refuses_without_calling() -> None:
    clock, r = Clock(), fakeredis.FakeRedis()
    cb = breaker(r, clock)
    fail(cb, 2)
    assert cb.snapshot().state == "closed"
    assert cb.before_call() == Permit(probe=False)
    fail(cb, 1)
    snap = cb.snapshot()
    assert (snap.state, snap.failures) == ("open", 3)
    clock.now += 2.2
    with pytest.raises(TemporarilyUnavailable) as info:
        cb.before_call()
    assert info.value.reason == "iam_circuit_open"
    assert info.value.status == 503
    assert info.value.retry_after == 3  # what is left of the 5 s cool-down, rounded up


def test_a_success_resets_the_count() -> None:
    clock, r = Clock(), fakeredis.FakeRedis()
    cb = breaker(r, clock)
    fail(cb, 2)
    cb.record_success(cb.before_call())
    fail(cb, 2)
    assert cb.snapshot().state == "closed"
    assert cb.snapshot().failures == 2


def test_failures_further_apart_than_the_window_do_not_add_up() -> None:
    clock, r = Clock(), fakeredis.FakeRedis()
    cb = breaker(r, clock, CircuitPolicy(failure_threshold=3, failure_window_s=10.0))
    fail(cb, 2)
    clock.now += 11
    assert cb.snapshot().failures == 0
    fail(cb, 2)  # a new run: 2, not 4
    assert cb.snapshot().state == "closed"
    fail(cb, 1)
    assert cb.snapshot().state == "open"


def test_half_open_lets_exactly_one_probe_through_across_replicas() -> None:
    clock, r = Clock(), fakeredis.FakeRedis()
    a, b = breaker(r, clock), breaker(r, clock)  # two replicas, one Redis
    fail(a, 3)
    with pytest.raises(TemporarilyUnavailable):
        b.before_call()  # b sees a's circuit
    clock.now += 5.0
    assert a.snapshot().state == "half_open"
    probe = b.before_call()
    assert probe.probe
    for cb in (a, b):
        with pytest.raises(TemporarilyUnavailable) as info:
            cb.before_call()  # one probe at a time
        assert info.value.retry_after == 1
    b.record_success(probe)
    assert a.snapshot().state == "closed"
    assert a.before_call() == Permit(probe=False)
    assert r.exists("t:{circuit:iam}:probe") == 0


def test_failed_probe_reopens_with_doubling_cool_down_capped() -> None:
    clock, r = Clock(), fakeredis.FakeRedis()
    cb = breaker(r, clock)
    fail(cb, 3)
    waits = []
    for _ in range(4):
        clock.now = cb.snapshot().open_until
        probe = cb.before_call()
        assert probe.probe
        cb.record_failure(probe)
        snap = cb.snapshot()
        assert snap.state == "open"
        waits.append(snap.open_until - clock.now)
    assert waits == [10.0, 20.0, 20.0, 20.0]
    assert r.exists("t:{circuit:iam}:probe") == 0  # the slot is free for the next probe


def test_release_frees_the_probe_slot_without_a_verdict() -> None:
    clock, r = Clock(), fakeredis.FakeRedis()
    cb = breaker(r, clock)
    fail(cb, 3)
    clock.now += 5
    probe = cb.before_call()
    cb.release(probe)
    assert cb.snapshot().state == "half_open"
    assert cb.before_call().probe  # another caller may probe now


def test_calls_in_flight_when_it_opened_do_not_extend_it() -> None:
    clock, r = Clock(), fakeredis.FakeRedis()
    cb = breaker(r, clock)
    permits = [cb.before_call() for _ in range(5)]  # five calls in flight
    for p in permits[:3]:
        cb.record_failure(p)
    opened = cb.snapshot().open_until
    clock.now += 1
    for p in permits[3:]:
        cb.record_failure(p)
    assert cb.snapshot().open_until == opened


def test_redis_failure_lets_calls_through() -> None:
    class Dead(fakeredis.FakeRedis):  # type: ignore[misc]
        def execute_command(self, *args: object, **kwargs: object) -> object:
            raise redis.ConnectionError("down")

    cb = breaker(Dead(), Clock())
    permit = cb.before_call()
    assert permit == Permit(probe=False)
    cb.record_failure(permit)  # never raises
    cb.record_success(permit)
    cb.release(Permit(probe=True))


def test_policy_validation() -> None:
    with pytest.raises(ValueError):
        CircuitPolicy(failure_threshold=0)
    with pytest.raises(ValueError):
        CircuitPolicy(cool_down_s=10, max_cool_down_s=5)
    with pytest.raises(ValueError):
        CircuitPolicy(probe_ttl_s=0)


# -- bulkhead -----------------------------------------------------------------------------------


def test_bulkhead_admits_up_to_its_slots_with_the_full_wait() -> None:
    clock = Clock(0.0)
    bh = Bulkhead(2, grace_s=2.0, clock=clock)
    with bh.admit(15.0) as w1, bh.admit(15.0) as w2:
        assert (w1, w2) == (15.0, 15.0)
        assert bh.in_use == (2, 0)
    assert bh.in_use == (0, 0)


def test_bulkhead_full_admits_short_waits_only_while_waits_are_young() -> None:
    clock = Clock(0.0)
    bh = Bulkhead(2, grace_s=2.0, clock=clock)
    with bh.admit(15.0):
        clock.now = 0.5
        with bh.admit(15.0):
            clock.now = 0.75
            with bh.admit(15.0) as wait, bh.admit(15.0) as wait2:
                assert wait == wait2 == 1.25  # the rest of the oldest wait's grace period
                assert bh.in_use == (2, 2)
            clock.now = 2.0
            with pytest.raises(TemporarilyUnavailable) as info:
                with bh.admit(15.0):
                    pass  # the oldest wait is 2 s old: IAM is slow, refuse at once
            assert (info.value.reason, info.value.retry_after, info.value.status) == (
                "busy",
                1,
                503,
            )
    assert bh.in_use == (0, 0)
    with bh.admit(15.0) as wait:
        assert wait == 15.0


def test_bulkhead_releases_on_exceptions() -> None:
    bh = Bulkhead(1)
    with pytest.raises(RuntimeError), bh.admit(1.0):
        raise RuntimeError("boom")
    assert bh.in_use == (0, 0)


def test_bulkhead_keeps_a_thread_free_under_concurrency() -> None:
    """Threads beyond the slots are refused at once; none of them blocks."""
    bh = Bulkhead(3, grace_s=0.0)
    release = threading.Event()
    inside = threading.Barrier(4)
    refused: list[str] = []

    def hold() -> None:
        with bh.admit(30.0):
            inside.wait(30)
            release.wait(30)

    holders = [threading.Thread(target=hold) for _ in range(3)]
    for t in holders:
        t.start()
    inside.wait(30)
    for _ in range(10):
        try:
            with bh.admit(30.0):
                pass
        except TemporarilyUnavailable as exc:
            refused.append(exc.reason)
    release.set()
    for t in holders:
        t.join(30)
    assert refused == ["busy"] * 10
    assert bh.in_use == (0, 0)


def test_bulkhead_needs_a_slot() -> None:
    with pytest.raises(ValueError):
        Bulkhead(0)


def test_exchange_refuses_excess_waiters_at_once_but_serves_hits(make_broker) -> None:
    """Through the exchange: a full bulkhead (and IAM slow: grace 0) refuses misses with 503
    at once; hits never queue."""
    from tests.support import exchange_form

    b = make_broker()
    exchange = b.app.extensions["broker"].exchange
    exchange._bulkhead = Bulkhead(1, grace_s=0.0)
    entered, release = threading.Event(), threading.Event()
    real_mint = b.minter.mint

    def slow_mint(request):  # type: ignore[no-untyped-def]
        if request.service_account.startswith("batch-b"):
            entered.set()
            release.wait(30)
        return real_mint(request)

    b.minter.mint = slow_mint  # type: ignore[method-assign]
    hot = b.client.post("/v1/token", data=exchange_form(b.issuer.token()))
    assert hot.status_code == 200  # flux-source-reader is now cached
    results: list[int] = []
    runner = b.issuer.token("team-x", "runner")
    slow = threading.Thread(
        target=lambda: results.append(
            b.client.post("/v1/token", data=exchange_form(runner, audience="batch-b")).status_code
        )
    )
    slow.start()
    try:
        assert entered.wait(30)  # the only slot waits on IAM
        busy = b.client.post("/v1/token", data=exchange_form(runner, audience="batch-a"))
        assert busy.status_code == 503
        assert busy.json["error"] == "temporarily_unavailable"
        assert busy.headers["Retry-After"] == "1"
        again = b.client.post("/v1/token", data=exchange_form(b.issuer.token()))
        assert again.status_code == 200  # a hit needs no slot
        assert again.json["access_token"] == hot.json["access_token"]
    finally:
        release.set()
        slow.join(30)
    assert results == [200]
    assert {r["reason"] for r in b.audit() if r["decision"] == "error"} == {"busy"}
