"""The in-process layer of the token cache (DESIGN.md §6): at most 30 s, purges exact.

A worker that read a token from Redis keeps it for ``cache.memo`` (≤ 30 s), never past the
token's refresh point nor past the moment it stops being servable, so a hit costs one Redis
round trip (its audit record) instead of two (read, then record).

Purges stay exact: every purge writes a fresh random *generation* into Redis
(:meth:`broker.cache.TokenCache.purge`). A memo entry remembers the generation it was read
under, and a token served from the memo is issued only through an audit batch whose condition
is that Redis still holds that generation (:mod:`broker.redisbatch`), checked atomically with
the record. Tokens read from Redis are issued under the same condition (the generation is read
with the entry). A purge that has returned therefore stops every worker of every replica from
issuing a token it deleted; a request that loses this race reads Redis again. (A mint still in
flight when the purge runs stores its new token afterwards, as before.) The generation is
random, not a counter, and nothing is memoised while none exists, so a Redis restart or flush
cannot bring an old value back.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from broker.auditchain import rfc3339, sha256_hex
from broker.model import AccessToken

MAX_ENTRIES = 4096  # cache keys per worker; cleared when exceeded (roles are few)


@dataclass(frozen=True, slots=True)
class MemoEntry:
    token: AccessToken
    generation: str  # the cache generation it was read under ("" when none was ever written)
    until: float  # epoch seconds: served before this moment only
    # What every audit record of this token says about it, computed once.
    access_token_sha256: str
    expires_at: str


class TokenMemo:
    """Tokens this process read from Redis, by cache key, each until its ``until``."""

    def __init__(self, ttl_s: float) -> None:
        if not 0 <= ttl_s <= 30:
            raise ValueError("the token memo keeps tokens 0 to 30 seconds")
        self.ttl_s = ttl_s
        self._entries: dict[str, MemoEntry] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, now: float) -> MemoEntry | None:
        """The entry for ``key`` if it may still be served at ``now``."""
        entry = self._entries.get(key)
        if entry is None or now >= entry.until:
            return None
        return entry

    def put(
        self, key: str, token: AccessToken, generation: str, *, now: float, until: float
    ) -> None:
        """Keep ``token`` (read under ``generation``) until ``until``, ``ttl_s`` at most."""
        until = min(until, now + self.ttl_s)
        if until <= now:
            return
        with self._lock:
            if len(self._entries) >= MAX_ENTRIES:
                self._entries.clear()
            self._entries[key] = MemoEntry(
                token, generation, until, sha256_hex(token.token), rfc3339(token.expires_at)
            )

    def clear(self) -> None:
        """Forget everything (a purge happened since these tokens were read)."""
        with self._lock:
            self._entries.clear()
