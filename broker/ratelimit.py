"""Per-minute rate limits shared by replicas (fixed one-minute windows in Redis)."""

from __future__ import annotations

import hashlib
import ipaddress
import time
from collections.abc import Callable, Sequence

import redis

from broker.errors import RateLimited, StoreUnavailable

WINDOW_S = 60


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
        if limit <= 0:
            return
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
            retry_after = max(1, int((window + 1) * WINDOW_S - now))
            raise RateLimited(
                f"too many requests for this {kind.replace('_', ' ')} "
                f"(limit {limit} per minute); retry after {retry_after}s",
                reason=f"rate_limited_{kind}",
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
