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
import binascii
import hashlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import redis
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker.errors import ConfigError, StoreUnavailable, TemporarilyUnavailable
from broker.model import AccessToken, MintRequest

log = logging.getLogger(__name__)

KEY_BYTES = 32
_NONCE_BYTES = 12
_ENVELOPE_VERSION = "v1"
_KEY_DOMAIN = "token-broker/cache/v1"
_AAD_DOMAIN = b"token-broker/cache/v1:"
_POLL_S = 0.03  # waiters re-read the cache this often: fast enough, cheap for Redis


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
        problems: list[str] = []
        keys: list[bytes] = []
        entries = value.split(",")
        if not value.strip():
            raise ConfigError(env_var, ["no cache key given (comma-separated base64 32-byte keys)"])
        for pos, raw in enumerate(entries, start=1):
            entry = raw.strip()
            if not entry:
                problems.append(f"entry {pos}: empty")
                continue
            key = _b64decode(entry)
            if key is None:
                problems.append(f"entry {pos}: not base64")
            elif len(key) != KEY_BYTES:
                problems.append(f"entry {pos}: decodes to {len(key)} bytes, expected {KEY_BYTES}")
            elif key not in keys:
                keys.append(key)
        if problems:
            raise ConfigError(env_var, problems)
        return cls(tuple(keys))

    @staticmethod
    def generate() -> str:
        """A fresh random key, standard base64: for dev mode and for operators' docs."""
        return base64.b64encode(os.urandom(KEY_BYTES)).decode("ascii")


def _b64decode(text: str) -> bytes | None:
    std = text.replace("-", "+").replace("_", "/")
    std += "=" * (-len(std) % 4)
    try:
        return base64.b64decode(std, validate=True)
    except (binascii.Error, ValueError):
        return None


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

    # -- public API ---------------------------------------------------------------------------

    def get(self, key: str) -> AccessToken | None:
        """The cached token if it decrypts and has at least ``min_remaining_s`` left, else None."""
        raw = self._call(lambda: self._redis.get(self._value_key(key)))
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
        self, key: str, mint: Callable[[], AccessToken], *, wait_s: float
    ) -> tuple[AccessToken, bool]:
        """Return ``(token, was_hit)``; on a miss, mint once across threads and processes.

        Whoever holds both the in-process and the Redis lock re-checks the cache, then mints
        and stores. Others poll the cache for up to ``wait_s`` seconds, taking over the lock if
        its holder gives up or crashes, then raise :class:`TemporarilyUnavailable`
        (``mint_wait_timeout``). Exceptions from ``mint`` propagate unchanged; locks are released.
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
                owner = self._try_lock(key)
                if owner is not None:
                    try:
                        cached = self.get(key)  # re-check: the value may have landed just now
                        if cached is not None:
                            return cached, True
                        token = mint()
                        self.put(key, token)
                        return token, False
                    finally:
                        self._unlock(key, owner)
                if time.monotonic() >= deadline:
                    raise self._wait_timeout()
                time.sleep(min(_POLL_S, max(0.0, deadline - time.monotonic())))

    def purge(self, keys: Iterable[str]) -> int:
        """Delete the entries for ``keys``; return how many existed."""
        names = [self._value_key(k) for k in keys]
        if not names:
            return 0

        def run() -> Any:
            # One DEL per key: keys live in different hash slots (Redis Cluster ready).
            pipe = self._redis.pipeline(transaction=False)
            for name in names:
                pipe.delete(name)
            return pipe.execute()

        return sum(int(n) for n in self._call(run))

    # -- internals ----------------------------------------------------------------------------

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
        blob = _b64decode(body)
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


__all__ = ["KEY_BYTES", "CacheKeys", "TokenCache", "cache_key"]
