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

import hashlib
import ipaddress
import time
from collections.abc import Callable, Sequence

import redis

from broker.errors import RateLimited, StoreUnavailable, TemporarilyUnavailable

WINDOW_S = 60
MINTS_PER_ROLE_PER_MINUTE = 60


class RateLimiter:
    """Counts hits per key and minute; over the limit raises :class:`RateLimited`."""

    def __init__(
        self, client: redis.Redis, *, prefix: str, clock: Callable[[], float] = time.time
    ) -> None:
        self._redis = client
        self._prefix = prefix
        self._clock = clock

    def hit(self, kind: str, identity: str, limit: int) -> None:
        """Count one request of ``identity`` (hashed) against ``limit`` per minute; 0 = off."""
        retry_after = self.count(kind, identity, limit)
        if retry_after is not None:
            raise RateLimited(
                f"too many requests for this {kind.replace('_', ' ')} "
                f"(limit {limit} per minute); retry after {retry_after}s",
                reason=f"rate_limited_{kind}",
                retry_after=retry_after,
            )

    def count(self, kind: str, identity: str, limit: int) -> int | None:
        """Count one hit; return None within ``limit`` (0 = off), else seconds to wait."""
        if limit <= 0:
            return None
        now = self._clock()
        window = int(now // WINDOW_S)
        digest = hashlib.sha256(identity.encode()).hexdigest()[:32]
        key = f"{self._prefix}rl:{kind}:{digest}:{window}"
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.incr(key)
            pipe.expire(key, WINDOW_S + 5)
            count, _ = pipe.execute()
        except redis.RedisError as exc:
            raise StoreUnavailable("rate limiter unavailable", retry_after=1) from exc
        if int(count) > limit:
            return max(1, int((window + 1) * WINDOW_S - now))
        return None


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


def client_ip(
    remote_addr: str | None, forwarded_for: str | None, trusted: Sequence[str]
) -> str | None:
    """The caller's address: walk X-Forwarded-For from the right while hops are trusted proxies."""
    if not remote_addr:
        return None
    nets = [ipaddress.ip_network(c, strict=False) for c in trusted]
    if not nets or not forwarded_for:
        return remote_addr

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
