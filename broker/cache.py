"""Redis token cache (DESIGN.md §6): encrypted values, TTL from expiry, single-flight minting.

One entry per :func:`cache_key` (role + what is asked of IAM), shared by every caller the role
admits; attribution lives in the audit log. Values are AES-GCM encrypted with the cache key as
associated data, so a value copied under another key does not decrypt; each value names the key
id that sealed it, so keys rotate without a flush. Anything that does not decrypt is a miss.

Concurrent misses for one key mint once: an in-process lock serialises the threads of a worker,
a Redis lock (``SET NX PX``, owner-checked release) serialises workers and replicas, and the
result is re-checked under both. The others poll the cache until the value appears or their
wait runs out (503). A crashed holder's lock expires after ``lock_ttl_s``.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import redis
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker.errors import (
    BrokerError,
    ConfigError,
    StoreUnavailable,
    TemporarilyUnavailable,
    UpstreamRefused,
)
from broker.keymaterial import b64decode_any, parse_key_list
from broker.model import AccessToken, MintRequest, Role
from broker.redisbatch import Condition

log = logging.getLogger(__name__)

KEY_BYTES = 32
_NONCE_BYTES = 12
_ENVELOPE_VERSION = "v1"
_KEY_DOMAIN = "token-broker/cache/v1"
_AAD_DOMAIN = b"token-broker/cache/v1:"
_POLL_S = 0.03  # waiters re-read the cache this often: fast enough, cheap for Redis
# Purge indexes live longer than any token (12 h at most) and are refreshed on each use.
_INDEX_TTL_S = 13 * 3600


@functools.lru_cache(maxsize=4096)  # pure; roles are few and every hit computes it
def cache_key(role_name: str, request: MintRequest) -> str:
    """SHA-256 hex of a canonical encoding of everything that makes two tokens interchangeable.

    Scopes are a set (sorted, duplicates dropped); delegates are a chain, so order matters.
    """
    canonical = json.dumps(
        [
            _KEY_DOMAIN,
            role_name,
            request.service_account,
            sorted(set(request.scopes)),
            list(request.delegates),
            int(request.lifetime_s),
        ],
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def role_cache_key(role: Role) -> str:
    """The cache key of ``role``'s tokens: what the exchange computes for it."""
    return cache_key(role.name, role.mint_request())


@dataclass(frozen=True, slots=True)
class RefreshResult:
    """What :meth:`TokenCache.refresh` did, with the token now stored when there is one."""

    outcome: Literal["refreshed", "fresh", "busy", "gone"]
    token: AccessToken | None


def _kid(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:8]


@dataclass(frozen=True, repr=False)
class CacheKeys:
    """The cache encryption keys: the first encrypts, all decrypt. Never shows key bytes."""

    keys: tuple[bytes, ...] = field(repr=False)

    def __post_init__(self) -> None:
        if not self.keys:
            raise ValueError("at least one cache key is required")
        if any(len(k) != KEY_BYTES for k in self.keys):
            raise ValueError(f"cache keys must be {KEY_BYTES} bytes")
        if len({_kid(k) for k in self.keys}) != len(self.keys):
            raise ValueError("cache keys must be distinct")

    @property
    def kids(self) -> tuple[str, ...]:
        """Key ids (first 8 hex chars of SHA-256 of each key), in order; the first encrypts."""
        return tuple(_kid(k) for k in self.keys)

    def __repr__(self) -> str:
        return f"CacheKeys(kids={self.kids!r})"

    @classmethod
    def parse(cls, value: str, env_var: str = "BROKER_CACHE_KEYS") -> CacheKeys:
        """Parse comma-separated base64 (standard or urlsafe, padding optional) 32-byte keys.

        A bad entry raises :class:`ConfigError` naming ``env_var`` and the entry's position
        (1-based), never its content. A key repeated later in the list is ignored.
        """
        if not value.strip():
            raise ConfigError(env_var, ["no cache key given (comma-separated base64 32-byte keys)"])

        def size_problem(key: bytes) -> str | None:
            if len(key) == KEY_BYTES:
                return None
            return f"decodes to {len(key)} bytes, expected {KEY_BYTES}"

        return cls(parse_key_list(value, env_var, size_problem, reject_empty=True))

    @staticmethod
    def generate() -> str:
        """A fresh random key, standard base64: for dev mode and for operators' docs."""
        return base64.b64encode(os.urandom(KEY_BYTES)).decode("ascii")


class _Undecryptable(Exception):
    """A stored value that is not ours to read: treated as a miss."""


class _KeyLocks:
    """Per-key in-process locks; an entry lives only while some thread holds or awaits it."""

    class _Entry:
        __slots__ = ("lock", "users")

        def __init__(self) -> None:
            self.lock = threading.Lock()
            self.users = 0

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._entries: dict[str, _KeyLocks._Entry] = {}

    def __len__(self) -> int:
        with self._mutex:
            return len(self._entries)

    @contextmanager
    def hold(self, key: str, timeout: float) -> Iterator[bool]:
        """Yield whether the lock for ``key`` was acquired within ``timeout`` seconds."""
        with self._mutex:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = _KeyLocks._Entry()
            entry.users += 1
        acquired = entry.lock.acquire(timeout=max(0.0, timeout))
        try:
            yield acquired
        finally:
            if acquired:
                entry.lock.release()
            with self._mutex:
                entry.users -= 1
                if entry.users == 0:
                    del self._entries[key]


class TokenCache:
    """Encrypted Redis cache of access tokens with single-flight minting (DESIGN.md §6)."""

    def __init__(
        self,
        redis: redis.Redis,
        keys: CacheKeys,
        *,
        prefix: str = "tb:",
        min_remaining_s: float = 300.0,
        lock_ttl_s: float = 15.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if min_remaining_s < 0:
            raise ValueError("min_remaining_s must not be negative")
        if lock_ttl_s <= 0:
            raise ValueError("lock_ttl_s must be positive")
        self._redis = redis
        self._keys = keys
        self._aeads = {kid: AESGCM(k) for kid, k in zip(keys.kids, keys.keys, strict=True)}
        self._prefix = prefix
        self._min_remaining_s = min_remaining_s
        self._lock_ttl_ms = max(1, int(lock_ttl_s * 1000))
        self._clock = clock
        self._local_locks = _KeyLocks()

    def __repr__(self) -> str:
        return f"TokenCache(prefix={self._prefix!r}, keys={self._keys!r})"

    # -- storage layout: one hash tag per entry so value and lock share a Cluster slot --------

    def _value_key(self, key: str) -> str:
        return f"{self._prefix}{{cache:{key}}}:token"

    def _lock_key(self, key: str) -> str:
        return f"{self._prefix}{{cache:{key}}}:lock"

    @property
    def generation_key(self) -> str:
        """Where the purge generation lives (see :mod:`broker.tokenmemo`)."""
        return f"{self._prefix}cache:generation"

    # -- public API ---------------------------------------------------------------------------

    def get(self, key: str) -> AccessToken | None:
        """The cached token if it decrypts and has at least ``min_remaining_s`` left, else None."""
        return self.servable(key, self._call(lambda: self._redis.get(self._value_key(key))))

    def queue_get(self, pipe: redis.client.Pipeline, key: str) -> int:
        """Add the read of ``key`` to ``pipe``; return its reply index (for :meth:`servable`)."""
        index = len(pipe)
        pipe.get(self._value_key(key))
        return index

    def queue_generation(self, pipe: redis.client.Pipeline) -> int:
        """Add the read of the purge generation to ``pipe`` (before any :meth:`queue_get` whose
        result is memoised under it); return its reply index (for :func:`generation_of`)."""
        index = len(pipe)
        pipe.get(self.generation_key)
        return index

    def ensure_generation(self) -> str:
        """The purge generation, written first if there is none (``SET NX``); "" when Redis
        could not be asked (the caller's own write will fail too)."""
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.set(self.generation_key, _new_generation(), nx=True)
            pipe.get(self.generation_key)
            return generation_of(pipe.execute()[1])
        except redis.RedisError as exc:
            log.warning(
                "token cache: could not write the purge generation (%s)", type(exc).__name__
            )
            return ""

    def generation_holds(self, generation: str) -> Condition:
        """A batch condition: no purge since ``generation`` was read."""
        return Condition.equals(self.generation_key, generation)

    def servable(self, key: str, raw: object) -> AccessToken | None:
        """The token in a stored value ``raw`` if it decrypts and has ``min_remaining_s`` left."""
        if raw is None:
            return None
        try:
            token = self._open(key, raw)
        except _Undecryptable as exc:
            log.warning("token cache: value for key %s… is unreadable (%s): miss", key[:12], exc)
            return None
        if token.expires_at - self._clock() < self._min_remaining_s:
            return None
        return token

    def put(self, key: str, token: AccessToken) -> None:
        """Store ``token`` until it no longer has ``min_remaining_s`` left (at least 1 s)."""
        ttl_ms = int((token.expires_at - self._min_remaining_s - self._clock()) * 1000)
        value = self._seal(key, token)
        self._call(lambda: self._redis.set(self._value_key(key), value, px=max(1000, ttl_ms)))

    def get_or_mint(
        self,
        key: str,
        mint: Callable[[], AccessToken],
        *,
        wait_s: float,
        share_failure_s: float = 0.0,
        detach: bool = False,
    ) -> tuple[AccessToken, bool]:
        """Return ``(token, was_hit)``; on a miss, mint once across threads and processes.

        Whoever holds both the in-process and the Redis lock re-checks the cache, then mints
        and stores. Others poll the cache for up to ``wait_s`` seconds, taking over the lock if
        its holder gives up or crashes, then raise :class:`TemporarilyUnavailable`
        (``mint_wait_timeout``). Exceptions from ``mint`` propagate unchanged; locks are released.

        With ``share_failure_s`` > 0, a mint failing with :class:`TemporarilyUnavailable` or
        :class:`UpstreamRefused` is also the result of everyone waiting for it, and of callers
        arriving within ``share_failure_s`` seconds: they get the same error (a copy) instead of
        asking IAM the same question again.

        With ``detach``, the holder mints on a thread of its own and waits for it only until
        ``wait_s`` is spent (then ``mint_wait_timeout``); the mint goes on, stores its token
        and releases the lock, so a caller's thread is never held longer than ``wait_s``.
        """
        deadline = time.monotonic() + wait_s
        cached = self.get(key)
        if cached is not None:
            return cached, True
        with self._local_locks.hold(key, deadline - time.monotonic()) as acquired:
            if not acquired:
                raise self._wait_timeout()
            while True:
                # Another thread of this process, or another process, may have minted meanwhile.
                cached = self.get(key)
                if cached is not None:
                    return cached, True
                if share_failure_s > 0:
                    self._raise_shared_failure(key)
                owner = self._try_lock(key)
                if owner is not None:
                    if detach:
                        return self._mint_detached(key, owner, mint, share_failure_s, deadline)
                    try:
                        return self._mint_and_store(key, mint, share_failure_s)
                    finally:
                        self._unlock(key, owner)
                if time.monotonic() >= deadline:
                    raise self._wait_timeout()
                time.sleep(min(_POLL_S, max(0.0, deadline - time.monotonic())))

    def purge(self, keys: Iterable[str]) -> int:
        """Delete the entries for ``keys`` and start a new purge generation, so no worker
        issues a memoised copy any more (:mod:`broker.tokenmemo`); return how many existed."""
        names = [self._value_key(k) for k in keys]

        def run() -> Any:
            # One DEL per key: keys live in different hash slots (Redis Cluster ready). Then a
            # new generation, so no worker issues a memoised copy any more (broker.tokenmemo).
            pipe = self._redis.pipeline(transaction=False)
            for name in names:
                pipe.delete(name)
            pipe.set(self.generation_key, _new_generation())
            return pipe.execute()[:-1]

        return sum(int(n) for n in self._call(run))

    # -- purge by role / service account (an index instead of a keyspace SCAN) ---------------

    def _index_key(self, kind: str, value: str) -> str:
        return f"{self._prefix}cache-index:{kind}:{value}"

    def index(self, key: str, *, role: str, service_account: str, keep_s: float) -> None:
        """Remember for ``keep_s`` seconds that ``key`` holds ``role``'s tokens for
        ``service_account``, so :meth:`purge_role` / :meth:`purge_service_account` find it.

        Each index is a sorted set scored by when its member may be forgotten: an entry can
        only hold a token minted while its definition was in use, so it is forgotten once such
        a token would have expired.
        """
        now = self._clock()

        def run() -> Any:
            pipe = self._redis.pipeline(transaction=False)
            for name in (self._index_key("role", role), self._index_key("sa", service_account)):
                pipe.zadd(name, {key: now + keep_s})
                pipe.zremrangebyscore(name, "-inf", now)
                pipe.expire(name, _INDEX_TTL_S)
            return pipe.execute()

        self._call(run)

    def purge_role(self, role: str, also: Iterable[str] = ()) -> int:
        """Drop every cached token indexed for ``role`` (and entries ``also``); return how many."""
        return self._purge_indexed("role", role, also)

    def purge_service_account(self, service_account: str, also: Iterable[str] = ()) -> int:
        """Drop every cached token indexed for ``service_account`` (and ``also``)."""
        return self._purge_indexed("sa", service_account, also)

    def _purge_indexed(self, kind: str, value: str, also: Iterable[str]) -> int:
        members = self._call(lambda: self._redis.zrange(self._index_key(kind, value), 0, -1))
        keys = {m.decode("ascii", "replace") if isinstance(m, bytes) else str(m) for m in members}
        return self.purge(sorted(keys | set(also)))

    # -- refresh ahead (driven by broker.refresh) ----------------------------------------------

    def peek(self, key: str) -> AccessToken | None:
        """The stored token whatever it has left (None when absent or unreadable)."""
        raw = self._call(lambda: self._redis.get(self._value_key(key)))
        if raw is None:
            return None
        try:
            return self._open(key, raw)
        except _Undecryptable:
            return None

    def replace(self, key: str, token: AccessToken) -> bool:
        """Store ``token`` only where an entry still exists; False if it is gone (purged).

        ``SET XX``: a refresh racing a purge can never bring the purged entry back.
        """
        ttl_ms = int((token.expires_at - self._min_remaining_s - self._clock()) * 1000)
        value = self._seal(key, token)
        return bool(
            self._call(
                lambda: self._redis.set(self._value_key(key), value, px=max(1000, ttl_ms), xx=True)
            )
        )

    def refresh(
        self, key: str, mint: Callable[[], AccessToken], *, is_due: Callable[[AccessToken], bool]
    ) -> RefreshResult:
        """Re-mint ``key``'s token ahead of expiry, once across processes.

        Takes the same Redis lock as :meth:`get_or_mint` without waiting for it (``busy`` when
        another process mints this key), re-checks under it (``gone`` when the entry no longer
        exists: purged or expired, never resurrected; ``fresh`` when ``is_due`` says the stored
        token needs nothing), then mints and replaces it (``refreshed``). Exceptions from
        ``mint`` propagate; the lock is released. Callers keep getting the old token meanwhile.
        """
        owner = self._try_lock(key)
        if owner is None:
            return RefreshResult("busy", None)
        try:
            current = self.peek(key)
            if current is None:
                return RefreshResult("gone", None)
            if not is_due(current):
                return RefreshResult("fresh", current)
            token = mint()
            if not self.replace(key, token):
                return RefreshResult("gone", None)
            return RefreshResult("refreshed", token)
        finally:
            self._unlock(key, owner)

    # -- internals ----------------------------------------------------------------------------

    def _mint_and_store(
        self, key: str, mint: Callable[[], AccessToken], share_failure_s: float
    ) -> tuple[AccessToken, bool]:
        """The lock holder's part: re-check, mint, store (the caller holds the Redis lock)."""
        cached = self.get(key)  # re-check: the value may have landed just now
        if cached is not None:
            return cached, True
        try:
            token = mint()
        except (TemporarilyUnavailable, UpstreamRefused) as exc:
            if share_failure_s > 0:
                self._share_failure(key, exc, share_failure_s)
            raise
        self.put(key, token)
        return token, False

    def _mint_detached(
        self,
        key: str,
        owner: str,
        mint: Callable[[], AccessToken],
        share_failure_s: float,
        deadline: float,
    ) -> tuple[AccessToken, bool]:
        """Run :meth:`_mint_and_store` on its own thread, which also releases the Redis lock."""
        future: Future[tuple[AccessToken, bool]] = Future()

        def run() -> None:
            try:
                result = self._mint_and_store(key, mint, share_failure_s)
            except BaseException as exc:
                self._unlock(key, owner)
                future.set_exception(exc)
            else:
                self._unlock(key, owner)
                future.set_result(result)

        threading.Thread(target=run, name="token-mint", daemon=True).start()
        try:
            return future.result(timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            log.info("token cache: a caller gave up waiting for key %s…; minting goes on", key[:12])
            raise self._wait_timeout() from None

    def _failure_key(self, key: str) -> str:
        return f"{self._prefix}{{cache:{key}}}:failed"

    def _share_failure(self, key: str, exc: BrokerError, ttl_s: float) -> None:
        """Leave ``exc`` for concurrent waiters for ``ttl_s`` seconds; never raises."""
        body = json.dumps(
            {
                "refused": isinstance(exc, UpstreamRefused),
                "reason": exc.reason,
                "description": exc.description[:500],
                "retry_after": exc.retry_after,
            }
        )
        try:
            self._redis.set(self._failure_key(key), body, px=max(1, int(ttl_s * 1000)))
        except redis.exceptions.RedisError as err:
            log.warning("token cache: could not share a mint failure (%s)", type(err).__name__)

    def _raise_shared_failure(self, key: str) -> None:
        """Raise a copy of a mint failure shared by :meth:`_share_failure`, if one is fresh."""
        raw = self._call(lambda: self._redis.get(self._failure_key(key)))
        if raw is None:
            return
        try:
            data = json.loads(raw)
            reason, description = str(data["reason"]), str(data["description"])
            retry_after = data.get("retry_after")
            refused = bool(data.get("refused"))
        except (ValueError, TypeError, KeyError):
            return  # not ours to read: ignore it, it expires by itself
        cls = UpstreamRefused if refused else TemporarilyUnavailable
        raise cls(
            description,
            reason=reason,
            retry_after=retry_after if isinstance(retry_after, int) else None,
        )

    @staticmethod
    def _wait_timeout() -> TemporarilyUnavailable:
        return TemporarilyUnavailable(
            "timed out waiting for a concurrent request to obtain the access token",
            reason="mint_wait_timeout",
            retry_after=1,
        )

    def _call(self, op: Callable[[], Any]) -> Any:
        try:
            return op()
        except redis.exceptions.RedisError as exc:
            raise StoreUnavailable(
                f"token cache unavailable ({type(exc).__name__})", retry_after=1
            ) from exc

    def _try_lock(self, key: str) -> str | None:
        owner = secrets.token_hex(16)
        ok = self._call(
            lambda: self._redis.set(self._lock_key(key), owner, nx=True, px=self._lock_ttl_ms)
        )
        return owner if ok else None

    def _unlock(self, key: str, owner: str) -> None:
        """Delete the Redis lock only if ``owner`` still holds it; never raises.

        Compare-and-delete as a WATCH/MULTI transaction (atomic like a Lua script, and it also
        runs on the embedded fakeredis store, which has no Lua). If it fails, the lock simply
        expires after ``lock_ttl_s``; raising here would mask the caller's own outcome.
        """
        name = self._lock_key(key)
        try:
            with self._redis.pipeline() as pipe:
                pipe.watch(name)  # type: ignore[no-untyped-call]  # untyped in redis-py
                held = pipe.get(name)
                if isinstance(held, bytes):
                    held = held.decode("ascii", "replace")
                if held != owner:
                    pipe.unwatch()
                    return
                pipe.multi()
                pipe.delete(name)
                pipe.execute()
        except redis.exceptions.WatchError:
            pass  # the lock expired and someone else took it: theirs now
        except redis.exceptions.RedisError as exc:
            log.warning(
                "token cache: could not release lock for key %s… (%s); it expires by itself",
                key[:12],
                type(exc).__name__,
            )

    def _aad(self, key: str) -> bytes:
        return _AAD_DOMAIN + key.encode("ascii", "replace")

    def _seal(self, key: str, token: AccessToken) -> str:
        kid = self._keys.kids[0]
        nonce = os.urandom(_NONCE_BYTES)
        plaintext = json.dumps({"t": token.token, "e": token.expires_at}).encode("utf-8")
        sealed = self._aeads[kid].encrypt(nonce, plaintext, self._aad(key))
        body = base64.urlsafe_b64encode(nonce + sealed).rstrip(b"=").decode("ascii")
        # ASCII so that clients built with decode_responses=True read it too.
        return f"{_ENVELOPE_VERSION}.{kid}.{body}"

    def _open(self, key: str, raw: object) -> AccessToken:
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("ascii")
            except UnicodeDecodeError:
                raise _Undecryptable("malformed envelope") from None
        if not isinstance(raw, str):
            raise _Undecryptable("malformed envelope")
        parts = raw.split(".")
        if len(parts) != 3 or parts[0] != _ENVELOPE_VERSION:
            raise _Undecryptable("malformed envelope")
        _, kid, body = parts
        aead = self._aeads.get(kid)
        if aead is None:
            raise _Undecryptable(f"unknown key id {kid[:8]!r}")
        blob = b64decode_any(body)
        if blob is None or len(blob) <= _NONCE_BYTES:
            raise _Undecryptable("malformed envelope")
        try:
            plaintext = aead.decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], self._aad(key))
        except InvalidTag:
            raise _Undecryptable("authentication failed") from None
        try:
            data = json.loads(plaintext)
            token, expires_at = data["t"], data["e"]
        except (ValueError, TypeError, KeyError):
            raise _Undecryptable("malformed plaintext") from None
        if not isinstance(token, str) or not isinstance(expires_at, int | float):
            raise _Undecryptable("malformed plaintext")
        return AccessToken(token=token, expires_at=float(expires_at))


def _new_generation() -> str:
    """A fresh purge generation: random, so a restarted or flushed Redis never repeats one."""
    return secrets.token_hex(16)


def generation_of(raw: object) -> str:
    """A purge generation as read from Redis ("" when none was ever written)."""
    if raw is None:
        return ""
    return raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw)


__all__ = [
    "KEY_BYTES",
    "CacheKeys",
    "RefreshResult",
    "TokenCache",
    "cache_key",
    "generation_of",
    "role_cache_key",
]
