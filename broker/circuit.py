"""Guards around IAM (DESIGN.md §6): a circuit breaker shared by replicas, and a bulkhead.

:class:`CircuitBreaker` stops the whole fleet from hammering IAM while it is down. Its state is
one Redis hash, so every worker of every replica sees the same circuit:

* **closed** — calls pass. Each transient failure (429, 5xx, deadline) counts; a success resets
  the count; failures further apart than ``failure_window_s`` do not add up.
* **open** — after ``failure_threshold`` consecutive failures, calls fail at once with
  :class:`~broker.errors.TemporarilyUnavailable` (``reason="iam_circuit_open"``, ``retry_after``
  = what is left of the cool-down) without reaching IAM.
* **half-open** — once the cool-down is over, exactly one call across the fleet (a Redis
  ``SET NX`` slot that a crashed prober frees after ``probe_ttl_s``) probes IAM; the others are
  still refused. A probe that succeeds closes the circuit; one that fails opens it again with the
  cool-down doubled, up to ``max_cool_down_s``.

Times are the injected wall clock, stored in Redis, so replicas agree within their clock skew
and unit tests can drive it. When Redis itself fails, the circuit lets calls through: it is a
protection of IAM, not a dependency of minting (the cache reports the Redis failure anyway).

:class:`Bulkhead` keeps waiting callers from starving a worker: gunicorn's gthread worker has a
fixed pool of threads and queues requests FIFO, so if every thread waits on a slow IAM, even
``/healthz`` waits. The bulkhead lets at most ``slots`` threads (the worker's threads minus one)
wait on token minting for as long as minting may take. A thread beyond that may still wait
while the oldest wait in the worker is younger than ``grace_s`` (IAM answers normally: a
restart storm is served, not refused), but only until that grace period ends — its own mint,
if it starts one, carries on on a thread of its own (``TokenCache.get_or_mint(detach=True)``).
Once waits are older than that, IAM is slow, and extra callers are refused at once with a 503:
the last thread is back for health checks within ``grace_s``.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import redis

from broker.errors import TemporarilyUnavailable

log = logging.getLogger(__name__)

CircuitState = Literal["closed", "open", "half_open"]


@dataclass(frozen=True, slots=True)
class CircuitPolicy:
    """When the circuit opens and how it probes IAM back."""

    failure_threshold: int = 5  # consecutive transient failures (fleet-wide) that open it
    failure_window_s: float = 60.0  # failures further apart than this start a new count
    cool_down_s: float = 5.0  # first open period; doubles after each failed probe
    max_cool_down_s: float = 60.0
    probe_ttl_s: float = 15.0  # a crashed prober's slot frees after this (> one IAM attempt)

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if min(self.failure_window_s, self.cool_down_s, self.probe_ttl_s) <= 0:
            raise ValueError("circuit durations must be positive")
        if self.max_cool_down_s < self.cool_down_s:
            raise ValueError("max_cool_down_s must be at least cool_down_s")

    def cool_down(self, level: int) -> float:
        """The open period after ``level`` failed probes: doubling, capped."""
        return min(self.max_cool_down_s, self.cool_down_s * (2.0 ** min(level, 32)))


@dataclass(frozen=True, slots=True)
class CircuitSnapshot:
    """What the circuit looks like now (for tests, logs and metrics)."""

    state: CircuitState
    failures: int
    open_until: float  # unix seconds; 0 when never opened
    level: int  # failed probes since it last closed


@dataclass(frozen=True, slots=True)
class Permit:
    """Handed out by :meth:`CircuitBreaker.before_call`; pass it back with the outcome."""

    probe: bool


class CircuitBreaker:
    """A circuit breaker for IAM whose state lives in Redis, shared by every replica."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str = "tb:",
        name: str = "iam",
        policy: CircuitPolicy | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = client
        self.policy = policy or CircuitPolicy()
        self._clock = clock
        # One hash tag: state and probe slot live in one Cluster slot.
        self._state_key = f"{prefix}{{circuit:{name}}}:state"
        self._probe_key = f"{prefix}{{circuit:{name}}}:probe"
        self._name = name

    def __repr__(self) -> str:
        return f"CircuitBreaker(name={self._name!r}, policy={self.policy!r})"

    def before_call(self) -> Permit:
        """Permit one call to IAM, or raise :class:`TemporarilyUnavailable` while open."""
        try:
            snap = self._read()
            if snap.state == "closed":
                return Permit(probe=False)
            if snap.state == "open":
                raise self._refusal(snap.open_until - self._clock())
            ttl_ms = max(1, int(self.policy.probe_ttl_s * 1000))
            if self._redis.set(self._probe_key, "1", nx=True, px=ttl_ms):
                log.info("IAM circuit half-open: probing IAM with one call")
                return Permit(probe=True)
        except redis.RedisError as exc:
            log.warning(
                "IAM circuit state unavailable (%s); letting the call through", type(exc).__name__
            )
            return Permit(probe=False)
        raise self._refusal(1.0)  # another caller is probing right now

    def record_success(self, permit: Permit) -> None:
        """IAM answered (a token, or a permanent refusal): close the circuit."""
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.hget(self._state_key, "fails")
            pipe.delete(self._state_key)
            if permit.probe:
                pipe.delete(self._probe_key)
            fails = pipe.execute()[0]
        except redis.RedisError as exc:
            log.warning("IAM circuit: could not record a success (%s)", type(exc).__name__)
            return
        if fails is not None and int(fails) >= self.policy.failure_threshold:
            log.warning("IAM circuit closed: IAM answers again")

    def record_failure(self, permit: Permit) -> None:
        """IAM failed transiently: count it; open (or re-open after a probe) at the threshold."""
        now = self._clock()
        policy = self.policy
        keep_ms = int((policy.failure_window_s + policy.max_cool_down_s) * 2000)
        try:
            raw_fails, snap = self._read_raw()
            if snap.state == "closed" and raw_fails and not snap.failures:
                # The earlier failures are too old to count: this one starts a new run.
                self._redis.hset(self._state_key, "fails", 0)
            pipe = self._redis.pipeline(transaction=False)
            pipe.hincrby(self._state_key, "fails", 1)
            pipe.hset(self._state_key, "last", repr(now))
            pipe.pexpire(self._state_key, keep_ms)
            fails = int(pipe.execute()[0])
            if permit.probe:
                level = snap.level + 1
                until = now + policy.cool_down(level)
                pipe = self._redis.pipeline(transaction=False)
                pipe.hset(self._state_key, mapping={"open_until": repr(until), "level": level})
                pipe.delete(self._probe_key)
                pipe.execute()
                log.warning(
                    "IAM circuit re-opened: the probe failed; next probe in %.0fs", until - now
                )
            elif fails == policy.failure_threshold:
                # Exactly one caller sees the crossing (HINCRBY is atomic): it opens the circuit.
                until = now + policy.cool_down(0)
                self._redis.hset(self._state_key, mapping={"open_until": repr(until), "level": 0})
                log.warning(
                    "IAM circuit opened after %d consecutive failures; probing again in %.0fs",
                    fails,
                    until - now,
                )
        except redis.RedisError as exc:
            log.warning("IAM circuit: could not record a failure (%s)", type(exc).__name__)

    def release(self, permit: Permit) -> None:
        """The call ended without telling anything about IAM: free the probe slot if held."""
        if not permit.probe:
            return
        try:
            self._redis.delete(self._probe_key)
        except redis.RedisError as exc:
            log.warning("IAM circuit: could not free the probe slot (%s)", type(exc).__name__)

    def snapshot(self) -> CircuitSnapshot:
        """The current state (raises :class:`redis.RedisError` when Redis fails)."""
        return self._read()

    # -- internals ----------------------------------------------------------------------------

    def _read(self) -> CircuitSnapshot:
        return self._read_raw()[1]

    def _read_raw(self) -> tuple[int, CircuitSnapshot]:
        raw = self._redis.hmget(self._state_key, ["fails", "last", "open_until", "level"])
        fails, last, open_until, level = (_num(v) for v in raw)
        now = self._clock()
        policy = self.policy
        if fails < policy.failure_threshold:
            # Failures too far apart are not "consecutive": the count starts again.
            counted = 0 if now - last > policy.failure_window_s else fails
            return int(fails), CircuitSnapshot("closed", int(counted), open_until, int(level))
        state: CircuitState = "open" if now < open_until else "half_open"
        return int(fails), CircuitSnapshot(state, int(fails), open_until, int(level))

    def _refusal(self, remaining_s: float) -> TemporarilyUnavailable:
        retry_after = max(1, math.ceil(remaining_s))
        return TemporarilyUnavailable(
            "IAM Credentials is failing; the broker stopped calling it for a while "
            f"(circuit open); retry after {retry_after}s",
            reason="iam_circuit_open",
            retry_after=retry_after,
        )


def _num(value: object) -> float:
    if value is None:
        return 0.0
    try:
        return float(value.decode() if isinstance(value, bytes) else str(value))
    except ValueError:
        return 0.0


class Bulkhead:
    """Bounds how many threads of one worker wait on token minting (see the module docstring)."""

    def __init__(
        self,
        slots: int,
        *,
        grace_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if slots < 1:
            raise ValueError("a bulkhead needs at least one slot")
        self.slots = slots
        self.grace_s = grace_s
        self._clock = clock
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._holders: dict[int, float] = {}  # id → when it entered
        self._overflow = 0

    def __repr__(self) -> str:
        return f"Bulkhead(slots={self.slots}, grace_s={self.grace_s})"

    @property
    def in_use(self) -> tuple[int, int]:
        """``(slot holders, overflow waiters)`` right now."""
        with self._lock:
            return len(self._holders), self._overflow

    @contextmanager
    def admit(self, wait_s: float) -> Iterator[float]:
        """Enter; yield how long the caller may wait for a token.

        A free slot yields ``wait_s``. With every slot taken, while the oldest slot holder has
        waited less than ``grace_s``, the caller may wait out the rest of that grace period;
        otherwise it gets :class:`TemporarilyUnavailable` (``reason="busy"``) at once.
        """
        now = self._clock()
        with self._lock:
            if len(self._holders) < self.slots:
                ident = next(self._ids)
                self._holders[ident] = now
                allowed: float | None = wait_s
            else:
                ident = -1
                left = self.grace_s - (now - min(self._holders.values()))
                allowed = min(wait_s, left) if left > 0 else None
                if allowed is not None:
                    self._overflow += 1
        if allowed is None:
            raise TemporarilyUnavailable(
                "the broker is busy waiting for IAM; retry shortly", reason="busy", retry_after=1
            )
        try:
            yield allowed
        finally:
            with self._lock:
                if ident >= 0:
                    del self._holders[ident]
                else:
                    self._overflow -= 1


__all__ = ["Bulkhead", "CircuitBreaker", "CircuitPolicy", "CircuitSnapshot", "Permit"]
