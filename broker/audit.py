"""Audit trail: one record per request, stored in Redis before any token leaves (DESIGN.md §5).

Records go to a Redis stream (``{prefix}audit:events``) and, as a witness outside Redis, one JSON
line each on stdout. Every worker process is a *writer* with its own SHA-256 hash chain
(``writer``, ``seq``, ``prev``, ``hash``). Identical denials (same client, reason and token
fingerprint) within one second are folded into a single record with a ``count``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any

import orjson
import redis

from broker.errors import StoreUnavailable

log = logging.getLogger(__name__)

FOLD_WINDOW_S = 1.0
RETENTION_TRIM_EVERY_S = 60.0
GENESIS = "0" * 64


def sha256_hex(value: str | bytes) -> str:
    """Fingerprint of a secret: what audit records store instead of the secret itself."""
    data = value.encode() if isinstance(value, str) else value
    return hashlib.sha256(data).hexdigest()


def rfc3339(ts: float) -> str:
    """UTC RFC 3339 with milliseconds, e.g. ``2026-11-26T05:39:23.123Z``."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One audit event. Field names are contract (DESIGN.md §5). Never holds a token."""

    time: str
    request_id: str
    event: str
    decision: str  # issued | denied | error
    reason: str
    count: int = 1
    subject_verified: bool = False
    issuer: str | None = None
    subject: str | None = None
    namespace: str | None = None
    kubernetes_service_account: str | None = None
    kubernetes_service_account_uid: str | None = None
    pod: str | None = None
    pod_uid: str | None = None
    jti: str | None = None
    subject_token_sha256: str | None = None
    role: str | None = None
    service_account: str | None = None
    scopes: tuple[str, ...] = ()
    lifetime_s: int | None = None
    expires_at: str | None = None
    cache: str | None = None  # hit | miss | None
    access_token_sha256: str | None = None
    client_ip: str | None = None
    user_agent: str | None = None
    latency_ms: float | None = None
    # Event-specific detail that has no field of its own (e.g. a roles.changed diff).
    details: dict[str, Any] | None = None
    # Chain fields, filled in by the writer at append time.
    id: str | None = None
    writer: str | None = None
    seq: int | None = None
    prev: str | None = None
    hash: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def chain_hash(record: dict[str, Any]) -> str:
    """SHA-256 over the canonical JSON of the record without ``hash`` and ``id`` (``prev`` in)."""
    body = {k: v for k, v in record.items() if k not in ("hash", "id", "stored")}
    return sha256_hex(orjson.dumps(body, option=orjson.OPT_SORT_KEYS))


@dataclass
class _Fold:
    template: AuditRecord
    started: float
    folded: int = 0  # occurrences after the first, not yet written


class AuditLog:
    """Appends records to Redis (and stdout); folds identical denials."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str = "tb:",
        retention_s: float = 30 * 86400.0,
        stdout: bool = True,
        out: IO[str] | None = None,
        writer: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = client
        self._stream = f"{prefix}audit:events"
        self._retention_s = retention_s
        self._stdout = stdout
        self._out = out
        self._clock = clock
        # A writer is one process; pid alone could repeat across hosts/restarts.
        self.writer = writer or f"{os.getpid()}-{secrets.token_hex(4)}"
        self._lock = threading.Lock()  # serialises seq/prev so each writer's chain is linear
        self._seq = 0
        self._prev = GENESIS
        self._last_trim = 0.0
        self._folds: dict[tuple[str, str, str], _Fold] = {}
        self._folds_lock = threading.Lock()

    @property
    def stream(self) -> str:
        return self._stream

    def append(self, record: AuditRecord) -> dict[str, Any]:
        """Store ``record`` (chained) in Redis and echo it on stdout; return what was stored.

        Raises :class:`StoreUnavailable` when Redis cannot take it; the record still goes to
        stdout with ``stored: false`` so it is not lost.
        """
        with self._lock:
            body = record.to_dict()
            body["writer"] = self.writer
            body["seq"] = self._seq + 1
            body["prev"] = self._prev
            body["hash"] = chain_hash(body)
            try:
                entry_id = self._redis.xadd(self._stream, {"r": orjson.dumps(body)})
            except redis.RedisError as exc:
                self._emit(dict(body, stored=False))
                raise StoreUnavailable(
                    "the audit log is unavailable; nothing was issued", retry_after=1
                ) from exc
            self._seq += 1
            self._prev = body["hash"]
        body["id"] = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        self._emit(body)
        self._maybe_trim()
        return body

    def append_denial(self, record: AuditRecord, fold_key: tuple[str, str, str]) -> None:
        """Append a denial, folding repeats of ``fold_key`` within one second into a count."""
        now = self._clock()
        with self._folds_lock:
            self._flush_expired_locked(now)
            fold = self._folds.get(fold_key)
            if fold is not None:
                fold.folded += 1
                return
            self._folds[fold_key] = _Fold(template=record, started=now)
        self._append_quietly(record)

    def flush_folds(self, *, force: bool = False) -> None:
        """Write the counts of fold windows that have closed (all of them when ``force``)."""
        with self._folds_lock:
            self._flush_expired_locked(float("inf") if force else self._clock())

    def _flush_expired_locked(self, now: float) -> None:
        for key, fold in list(self._folds.items()):
            if now - fold.started >= FOLD_WINDOW_S:
                del self._folds[key]
                if fold.folded:
                    self._append_quietly(
                        dataclasses.replace(
                            fold.template,
                            count=fold.folded,
                            time=rfc3339(fold.started),
                            latency_ms=None,
                        )
                    )

    def _append_quietly(self, record: AuditRecord) -> None:
        try:
            self.append(record)
        except StoreUnavailable:
            log.warning("audit record not stored (Redis unavailable); written to stdout only")

    def _emit(self, body: dict[str, Any]) -> None:
        if not self._stdout:
            return
        out = self._out or sys.stdout
        out.write(orjson.dumps({"audit": body}).decode() + "\n")
        out.flush()

    def _maybe_trim(self) -> None:
        now = self._clock()
        if now - self._last_trim < RETENTION_TRIM_EVERY_S:
            return
        self._last_trim = now
        min_id = f"{int((now - self._retention_s) * 1000)}-0"
        try:
            self._redis.xtrim(self._stream, minid=min_id, approximate=False)
        except redis.RedisError:
            log.warning("audit retention trim failed; will retry")

    def recent(self, count: int = 100) -> list[dict[str, Any]]:
        """Newest records first (used by tests and, later, the audit API)."""
        try:
            rows = self._redis.xrevrange(self._stream, count=count)
        except redis.RedisError as exc:
            raise StoreUnavailable("the audit log is unavailable", retry_after=1) from exc
        out = []
        for entry_id, fields in rows or []:
            body: dict[str, Any] = orjson.loads((fields or {})[b"r"])
            body["id"] = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            out.append(body)
        return out
