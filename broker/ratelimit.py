"""Per-minute limits shared by replicas (fixed one-minute windows in Redis).

* :class:`RateLimiter` — requests per client IP (before any verification, so garbage cannot
  flood) and per verified caller (DESIGN.md §3 ``rate_limit``): over the limit → ``429`` with
  ``Retry-After``.
* :class:`MintBudget` — IAM mints per role, so that one role (a purge loop, a misbehaving
  deployment) cannot spend the project's IAM Credentials quota. Normal use mints a role's token
  once per refresh (every ≥ 8 minutes), so the default budget is far above it. Over the budget →
  ``503 temporarily_unavailable`` with ``Retry-After``: the caller did nothing wrong, and cached
  tokens are still served because the budget is only spent when a mint is needed.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from broker.errors import RateLimited, StoreUnavailable, TemporarilyUnavailable
from broker.redisbatch import Condition

WINDOW_S = 60
MINTS_PER_ROLE_PER_MINUTE = 60
MAX_BLOCKED = 100_000  # callers remembered as over their limit, per process


@dataclass(frozen=True, slots=True)
class PendingCount:
    """One hit queued on a caller's pipeline; :meth:`RateLimiter.settle` reads its reply."""

    kind: str
    identity: str
    limit: int
    window: int
    index: int  # position of the HINCRBY reply in the pipeline's results
    sets_expiry: bool = False  # this hit's pipeline also gives the window its expiry


@dataclass(frozen=True, slots=True)
class GuardedHit:
    """One hit carried as a :class:`~broker.redisbatch.Condition` of an atomic batch (counted
    only if the batch is written; see :meth:`RateLimiter.guard`)."""

    kind: str
    identity: str
    limit: int
    window: int
    condition: Condition


class RateLimiter:
    """Counts hits per key and minute; over the limit raises :class:`RateLimited`.

    Counts live in Redis (shared by replicas). A caller found over its limit is also remembered
    in process memory until its window ends, so its next requests are refused before any
    verification or Redis round trip.
    """

    def __init__(
        self, client: redis.Redis, *, prefix: str, clock: Callable[[], float] = time.time
    ) -> None:
        self._redis = client
        self._prefix = prefix
        self._clock = clock
        self._blocked: dict[tuple[str, str], int] = {}  # (kind, identity) -> window over limit
        self._expiry_set = -1  # the window whose hash this process gave an expiry

    def hit(self, kind: str, identity: str, limit: int) -> None:
        """Count one request of ``identity`` (hashed) against ``limit`` per minute; 0 = off."""
        retry_after = self.count(kind, identity, limit)
        if retry_after is not None:
            raise self._refusal(kind, limit, retry_after)

    def count(self, kind: str, identity: str, limit: int) -> int | None:
        """Count one hit; return None within ``limit`` (0 = off), else seconds to wait."""
        if limit <= 0:
            return None
        try:
            pipe = self._redis.pipeline(transaction=False)
            pending = self.queue(pipe, kind, identity, limit)
            results = pipe.execute()
        except redis.RedisError as exc:
            self.write_failed()
            raise StoreUnavailable("rate limiter unavailable", retry_after=1) from exc
        assert pending is not None
        if pending.sets_expiry:
            self._expiry_set = pending.window
        return self._over(pending, results)

    def queue(
        self, pipe: redis.client.Pipeline, kind: str, identity: str, limit: int
    ) -> PendingCount | None:
        """Add one hit to ``pipe`` (so it shares a round trip with other work); 0 = off."""
        if limit <= 0:
            return None
        window = int(self._clock() // WINDOW_S)
        key, field = self._slot(window, kind, identity)
        index = len(pipe)
        pipe.hincrby(key, field, 1)
        sets_expiry = self._expiry_set != window
        if sets_expiry:  # until a pipeline carrying it has succeeded (see settle)
            pipe.expire(key, WINDOW_S + 5)
        return PendingCount(kind, identity, limit, window, index, sets_expiry)

    def guard(self, kind: str, identity: str, limit: int) -> GuardedHit | None:
        """One hit as a batch condition: counted atomically with the batch it rides in (an
        audit record), which is refused if it would go over ``limit`` (0 = off)."""
        if limit <= 0:
            return None
        window = int(self._clock() // WINDOW_S)
        key, field = self._slot(window, kind, identity)
        return GuardedHit(
            kind, identity, limit, window, Condition.count(key, field, limit, WINDOW_S + 5)
        )

    def refused(self, hit: GuardedHit) -> RateLimited:
        """The refusal for a guarded hit whose condition failed (the caller is over its limit;
        remembered like any other, so its next requests stop before any work)."""
        retry_after = self._block(hit.kind, hit.identity, hit.window)
        return self._refusal(hit.kind, hit.limit, retry_after)

    def hit_many(self, hits: Sequence[tuple[str, str, int]]) -> None:
        """Count several ``(kind, identity, limit)`` hits in one round trip; raise the first
        :class:`RateLimited` (0 = off)."""
        hits = [h for h in hits if h[2] > 0]
        if not hits:
            return
        try:
            pipe = self._redis.pipeline(transaction=False)
            pending = [self.queue(pipe, kind, who, limit) for kind, who, limit in hits]
            results = pipe.execute()
        except redis.RedisError as exc:
            self.write_failed()
            raise StoreUnavailable("rate limiter unavailable", retry_after=1) from exc
        refusal: RateLimited | None = None
        for p in pending:
            try:
                self.settle(p, results)
            except RateLimited as limited:
                refusal = refusal or limited
        if refusal is not None:
            raise refusal

    def write_failed(self) -> None:
        """A pipeline carrying queued hits failed: the window's expiry may not be set."""
        self._expiry_set = -1

    def settle(self, pending: PendingCount | None, results: Sequence[Any]) -> None:
        """Raise :class:`RateLimited` if the queued hit went over its limit."""
        if pending is None:
            return
        if pending.sets_expiry:
            self._expiry_set = pending.window  # stored: later hits of this window skip it
        retry_after = self._over(pending, results)
        if retry_after is not None:
            raise self._refusal(pending.kind, pending.limit, retry_after)

    def check_blocked(self, kind: str, identity: str, limit: int) -> None:
        """Refuse without a round trip when this process saw ``identity`` over its limit."""
        window = self._blocked.get((kind, identity))
        if window is None or limit <= 0:
            return
        now = self._clock()
        if window != int(now // WINDOW_S):
            self._blocked.pop((kind, identity), None)
            return
        raise self._refusal(kind, limit, max(1, int((window + 1) * WINDOW_S - now)))

    def _slot(self, window: int, kind: str, identity: str) -> tuple[str, str]:
        """The hash and field counting ``identity`` (hashed) in ``window``. One hash per minute
        holds every counter of that window: one HINCRBY per hit, and its expiry is set once per
        window by each process, not on every hit."""
        return f"{self._prefix}rl:{window}", f"{kind}:{_digest(identity)}"

    def _over(self, pending: PendingCount, results: Sequence[Any]) -> int | None:
        if int(results[pending.index]) <= pending.limit:
            return None
        return self._block(pending.kind, pending.identity, pending.window)

    def _block(self, kind: str, identity: str, window: int) -> int:
        """Remember ``identity`` as over its limit until ``window`` ends; seconds until then."""
        if len(self._blocked) > MAX_BLOCKED:  # bounded: forget the oldest windows
            self._blocked.clear()
        self._blocked[(kind, identity)] = window
        return max(1, int((window + 1) * WINDOW_S - self._clock()))

    @staticmethod
    def _refusal(kind: str, limit: int, retry_after: int) -> RateLimited:
        return RateLimited(
            f"too many requests for this {kind.replace('_', ' ')} "
            f"(limit {limit} per minute); retry after {retry_after}s",
            reason=f"rate_limited_{kind}",
            retry_after=retry_after,
        )


class MintBudget:
    """At most ``per_role_per_minute`` IAM mints per role, shared by replicas."""

    def __init__(
        self, limiter: RateLimiter, per_role_per_minute: int = MINTS_PER_ROLE_PER_MINUTE
    ) -> None:
        self._limiter = limiter
        self.per_role_per_minute = per_role_per_minute

    def __repr__(self) -> str:
        return f"MintBudget(per_role_per_minute={self.per_role_per_minute})"

    def spend(self, role: str) -> None:
        """Spend one mint of ``role``'s budget, or raise :class:`TemporarilyUnavailable`."""
        retry_after = self._limiter.count("mint_role", role, self.per_role_per_minute)
        if retry_after is not None:
            raise TemporarilyUnavailable(
                f"the IAM mint budget of role {role!r} ({self.per_role_per_minute} per minute) "
                f"is spent; retry after {retry_after}s",
                reason="mint_budget_exhausted",
                retry_after=retry_after,
            )


@functools.lru_cache(maxsize=16384)  # callers repeat: one hash per caller, not per request
def _digest(identity: str) -> str:
    return hashlib.sha256(identity.encode()).hexdigest()[:32]


_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@functools.lru_cache(maxsize=16)  # the configured list: parsed once, not per request
def _networks(trusted: tuple[str, ...]) -> tuple[_Network, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in trusted)


def client_ip(
    remote_addr: str | None, forwarded_for: str | None, trusted: Sequence[str]
) -> str | None:
    """The caller's address: walk X-Forwarded-For from the right while hops are trusted proxies."""
    if not remote_addr:
        return None
    if not trusted or not forwarded_for:
        return remote_addr
    nets = _networks(tuple(trusted))

    def is_trusted(addr: str) -> bool:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in n for n in nets)

    if not is_trusted(remote_addr):
        return remote_addr
    hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
    current = remote_addr
    for hop in reversed(hops):
        current = hop
        if not is_trusted(hop):
            break
    return current
