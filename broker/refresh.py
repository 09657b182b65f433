"""Refresh ahead (DESIGN.md §6): re-mint tokens in use before anyone has to wait for IAM.

A token of lifetime ``L`` is re-minted at ``min(ratio x L, L - min_remaining)`` after it was
issued (``cache.refresh_ahead``, ``cache.min_remaining``), and in any case ``lead_s`` before it
stops being served (``min_remaining`` left): with the shortest lifetime a role may have
(``2 x min_remaining``) the two moments coincide, and a refresh that starts when the cached
entry disappears finds nothing to refresh.

*In use* means asked for within the last ``L`` seconds. Each exchange calls :meth:`touch`, which
records the key's use in Redis (at most every ``touch_every_s`` per process, so hits stay one
Redis round trip) together with what to mint for it, in three structures shared by replicas::

    {prefix}{refresh}:due   sorted set  cache key → when its token is due for refresh
    {prefix}{refresh}:used  sorted set  cache key → when it was last asked for
    {prefix}{refresh}:what  hash        cache key → {role, service_account, scopes, ...}

(nothing secret: the token stays encrypted in the cache). A background thread per worker
process wakes about every ``tick_s`` seconds and refreshes the keys that are due through
:meth:`broker.cache.TokenCache.refresh`: the single-flight lock of the cache makes the refresh
happen once across threads, workers and replicas, and a re-check under the lock skips a token
someone else has just refreshed. A key nobody used recently, whose role no longer exists or no
longer mints the same thing, or whose cached entry is gone (expired or purged — a purge is
never undone) is dropped from the index instead.

A failed refresh never fails a request: callers keep getting the cached token while it has
``min_remaining`` left (IAM failures are retried every ``retry_s``; the circuit breaker and the
per-role mint budget apply as to any mint); after that the next caller mints as on any miss.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from broker.cache import TokenCache, cache_key
from broker.errors import BrokerError
from broker.minting import Minter
from broker.model import AccessToken, MintRequest
from broker.policy import RoleTable
from broker.ratelimit import MintBudget

log = logging.getLogger(__name__)

_MEMO_MAX = 10_000  # per-process touch memo entries; cleared when exceeded


@dataclass(frozen=True, slots=True)
class RefreshPolicy:
    """When tokens are refreshed and how often the refresher looks."""

    ratio: float = 0.8  # cache.refresh_ahead
    min_remaining_s: float = 300.0  # cache.min_remaining
    lead_s: float = 30.0  # start at least this long before a token stops being served
    tick_s: float = 1.0  # the background thread looks for due keys about this often
    touch_every_s: float = 30.0  # a process records a key's use at most this often
    retry_s: float = 10.0  # after a failed refresh, try again this much later
    batch: int = 100  # keys looked at per tick

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise ValueError("ratio must be between 0 and 1")
        if min(self.tick_s, self.retry_s) <= 0 or self.batch < 1:
            raise ValueError("tick_s and retry_s must be positive, batch at least 1")

    def refresh_at(self, token: AccessToken, lifetime_s: float) -> float:
        """When ``token`` (asked for with ``lifetime_s``) should be re-minted, unix seconds."""
        before_expiry = max((1.0 - self.ratio) * lifetime_s, self.min_remaining_s + self.lead_s)
        return token.expires_at - before_expiry


@dataclass(frozen=True, slots=True)
class RefreshTarget:
    """A key in use: its role and the request it was minted with (nothing secret). Only the
    role is trusted when re-minting; the request is minted from the role table (see
    :meth:`Refresher._refresh_one`)."""

    role: str
    request: MintRequest

    def to_json(self) -> str:
        r = self.request
        return json.dumps(
            {
                "role": self.role,
                "service_account": r.service_account,
                "scopes": list(r.scopes),
                "lifetime_s": r.lifetime_s,
                "delegates": list(r.delegates),
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> RefreshTarget | None:
        """Parse :meth:`to_json` output; None for anything else."""
        try:
            d = json.loads(raw)
            return cls(
                role=str(d["role"]),
                request=MintRequest(
                    service_account=str(d["service_account"]),
                    scopes=tuple(str(s) for s in d["scopes"]),
                    lifetime_s=int(d["lifetime_s"]),
                    delegates=tuple(str(s) for s in d["delegates"]),
                ),
            )
        except (ValueError, TypeError, KeyError):
            return None


@dataclass
class RefreshStats:
    """What one :meth:`Refresher.run_once` pass did, by key count."""

    refreshed: int = 0
    fresh: int = 0  # someone else had already refreshed it
    busy: int = 0  # someone else is minting it right now
    dropped: int = 0  # not in use, role changed, or entry gone
    failed: int = 0
    errors: list[str] = field(default_factory=list)  # reasons of the failures


class Refresher:
    """Tracks keys in use and re-mints their tokens ahead of expiry, once across replicas."""

    def __init__(
        self,
        client: redis.Redis,
        cache: TokenCache,
        *,
        roles: Callable[[], RoleTable],
        minter: Minter,
        budget: MintBudget | None = None,
        prefix: str = "tb:",
        policy: RefreshPolicy | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = client
        self._cache = cache
        self._roles = roles
        self._minter = minter
        self._budget = budget
        self.policy = policy or RefreshPolicy()
        self._clock = clock
        self._due = f"{prefix}{{refresh}}:due"
        self._used = f"{prefix}{{refresh}}:used"
        self._what = f"{prefix}{{refresh}}:what"
        self._memo: dict[str, tuple[float, float]] = {}  # key → (recorded at, due at)
        self._memo_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()
        self._stop = threading.Event()

    def __repr__(self) -> str:
        return f"Refresher(index={self._due!r}, policy={self.policy!r})"

    # -- request path -------------------------------------------------------------------------

    def touch(self, key: str, role: str, request: MintRequest, token: AccessToken) -> None:
        """Record that ``key`` (``role``'s token ``token``) is in use. Never raises.

        Starts the background thread on first use, so a process that serves no token runs none.
        """
        now = self._clock()
        due = self.policy.refresh_at(token, request.lifetime_s)
        with self._memo_lock:
            memo = self._memo.get(key)
        if memo is not None and memo[1] == due and now - memo[0] < self.policy.touch_every_s:
            return
        new_token = memo is None or memo[1] != due
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.zadd(self._used, {key: now})
            # A token this process has not seen sets the due time; a token it has seen keeps
            # whatever is there (NX), so a refresh postponed after a failure stays postponed.
            pipe.zadd(self._due, {key: due}, nx=not new_token)
            pipe.hset(self._what, key, RefreshTarget(role, request).to_json())
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("refresh ahead: could not record a key in use (%s)", type(exc).__name__)
            return
        with self._memo_lock:
            if len(self._memo) >= _MEMO_MAX:
                self._memo.clear()
            self._memo[key] = (now, due)
        self.start()

    # -- background ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the background thread (idempotent; not after :meth:`stop`)."""
        if self._thread is not None:
            return
        with self._thread_lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(
                    target=self._loop, name="token-refresher", daemon=True
                )
                self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the background thread and wait up to ``timeout`` seconds for it."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _loop(self) -> None:
        # Jittered ticks keep the workers of a fleet from looking all at the same moment.
        while not self._stop.wait(self.policy.tick_s * (0.5 + random.random())):  # noqa: S311
            try:
                self.run_once()
            except Exception:  # the thread must survive anything; requests do not depend on it
                log.exception("refresh ahead: pass failed")

    def run_once(self) -> RefreshStats:
        """Refresh every key that is due now (at most ``policy.batch``); return what happened."""
        stats = RefreshStats()
        try:
            keys = self._redis.zrangebyscore(
                self._due, "-inf", self._clock(), start=0, num=self.policy.batch
            )
        except redis.RedisError as exc:
            log.warning("refresh ahead: index unavailable (%s)", type(exc).__name__)
            return stats
        for raw in keys:
            key = raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw)
            try:
                self._refresh_one(key, stats)
            except redis.RedisError as exc:
                log.warning("refresh ahead: Redis failed (%s); next tick", type(exc).__name__)
                break
        return stats

    def _refresh_one(self, key: str, stats: RefreshStats) -> None:
        pipe = self._redis.pipeline(transaction=False)
        pipe.hget(self._what, key)
        pipe.zscore(self._used, key)
        raw_target, last_use = pipe.execute()
        target = RefreshTarget.from_json(raw_target) if raw_target is not None else None
        now = self._clock()
        if target is None:
            return self._drop(key, "nothing recorded to mint", stats)
        role = self._roles().get(target.role)
        # What is minted comes from the role table, never from Redis: the stored target only
        # names the role (anyone who can write Redis could otherwise pick the service account,
        # scopes and lifetime, and have the token served under this role's key).
        request = None if role is None else role.mint_request()
        if request is None or cache_key(target.role, request) != key:
            return self._drop(key, f"role {target.role!r} changed or was removed", stats)
        if last_use is None or now - float(last_use) > request.lifetime_s:
            return self._drop(key, "not used recently", stats)

        def mint() -> AccessToken:
            if self._budget is not None:
                self._budget.spend(target.role)
            return self._minter.mint(request)

        try:
            result = self._cache.refresh(
                key,
                mint,
                is_due=lambda t: self.policy.refresh_at(t, request.lifetime_s) <= self._clock(),
            )
        except BrokerError as exc:
            # The cached token is still served; try again a little later.
            stats.failed += 1
            stats.errors.append(exc.reason)
            log.warning(
                "refresh ahead of role %s failed (%s); the cached token is served meanwhile",
                target.role,
                exc.reason,
            )
            self._schedule(key, now + self.policy.retry_s)
            return None
        if result.outcome == "gone":
            return self._drop(key, "cached entry expired or purged", stats)
        if result.outcome == "busy" or result.token is None:
            stats.busy += 1
            return None
        if result.outcome == "refreshed":
            stats.refreshed += 1
            log.info("refreshed the token of role %s ahead of expiry", target.role)
        else:
            stats.fresh += 1
        due = self.policy.refresh_at(result.token, request.lifetime_s)
        if due <= now:
            # IAM granted less than asked: refreshing again would not help; the next miss mints.
            return self._drop(key, "token shorter than the refresh window", stats)
        self._schedule(key, due)
        return None

    def _schedule(self, key: str, due: float) -> None:
        self._redis.zadd(self._due, {key: due}, xx=True)

    def _drop(self, key: str, why: str, stats: RefreshStats) -> None:
        log.debug("refresh ahead: dropping key %s… (%s)", key[:12], why)
        stats.dropped += 1
        pipe = self._redis.pipeline(transaction=False)
        pipe.zrem(self._due, key)
        pipe.zrem(self._used, key)
        pipe.hdel(self._what, key)
        pipe.execute()
        with self._memo_lock:
            self._memo.pop(key, None)


__all__ = ["RefreshPolicy", "RefreshStats", "RefreshTarget", "Refresher"]
