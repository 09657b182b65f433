"""Audit trail: one record per request, stored in Redis before any token leaves (DESIGN.md §5).

Every worker process is a *writer* with its own SHA-256 hash chain (``writer``, ``seq``,
``prev``, ``hash``; see :mod:`broker.auditchain`) in its own Redis stream (layout in
:mod:`broker.auditstore`). An in-process lock assigns seq/prev/hash; the record then goes to Redis
in one round trip (one MULTI/EXEC carrying the record, its index entries and counters, and a
checkpoint when one is due), so a chain never forks. The writer also picks each record's stream
entry id (its clock in ms, strictly increasing), so the index entries
(:mod:`broker.auditindex`) can point at the record within that same transaction. Every
``checkpoint_every`` records, or ``checkpoint_interval_s`` after the first unsealed
one, the writer appends an ``audit.checkpoint`` record whose Ed25519 signature seals its head; a
writer that stops appends a final one. Every record, checkpoints included, also goes to stdout
as one JSON line: the witness outside Redis (``stored: false`` when Redis did not acknowledge).
Identical denials (same client, reason and token fingerprint) within one second are folded into
a single record with a ``count``.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import os
import re
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any

import orjson
import redis

from broker.auditchain import (
    CHECKPOINT_EVENT,
    GENESIS,
    canonical_json,
    chain_hash,
    checkpoint_message,
    is_checkpoint,
    record_id,
    rfc3339,
    sha256_hex,
    with_field,
)
from broker.auditstore import AuditStore
from broker.errors import StoreUnavailable
from broker.groupcommit import GroupCommit, Ticket
from broker.redisbatch import CommandRecorder, Condition
from broker.signing import SigningKey

__all__ = [
    "GENESIS",
    "AuditLog",
    "AuditRecord",
    "ConditionsFailed",
    "chain_hash",
    "record_body",
    "rfc3339",
    "sha256_hex",
]

log = logging.getLogger(__name__)

FOLD_WINDOW_S = 1.0
FOLDED_IDS_MAX = 100  # request ids kept in a folded record (a flood folds thousands)
CHECKPOINT_INTERVAL_S = 5.0
RETENTION_EVERY_S = 60.0


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One audit event. Field names are contract (DESIGN.md §5). Never holds a token."""

    time: str
    request_id: str | None  # None for records no request caused (checkpoints)
    event: str
    decision: str | None  # issued | denied | error; None where no decision applies
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
    # Event-specific detail that has no field of its own (e.g. a checkpoint's signature).
    details: dict[str, Any] | None = None
    # Chain fields, filled in by the writer at append time.
    id: str | None = None
    writer: str | None = None
    seq: int | None = None
    prev: str | None = None
    hash: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The record as a plain dict (shallow: values are immutable or owned by the record)."""
        return dict(zip(_RECORD_FIELDS, _ALL_FIELDS(self), strict=True))


_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(AuditRecord))
_ALL_FIELDS = operator.attrgetter(*_RECORD_FIELDS)  # one C call for every field
_DEFAULTS = {
    f.name: f.default
    for f in dataclasses.fields(AuditRecord)
    if f.default is not dataclasses.MISSING
}
assert all(f.default_factory is dataclasses.MISSING for f in dataclasses.fields(AuditRecord))
_FIELD_NAMES = frozenset(_RECORD_FIELDS)
_REQUIRED = _FIELD_NAMES - _DEFAULTS.keys()
# Every field in the record's own order (required ones filled in by record_body).
_TEMPLATE = {name: _DEFAULTS.get(name) for name in _RECORD_FIELDS}


def record_body(**values: Any) -> dict[str, Any]:
    """``AuditRecord(**values).to_dict()`` without building the frozen record: the issue path
    writes one per request. The same names are accepted and required (TypeError otherwise)."""
    names = values.keys()
    if not names <= _FIELD_NAMES or not names >= _REQUIRED:
        unknown, missing = sorted(names - _FIELD_NAMES), sorted(_REQUIRED - names)
        raise TypeError(f"audit record fields: unknown {unknown}, missing {missing}")
    body = _TEMPLATE.copy()
    body.update(values)
    return body


def new_writer_id() -> str:
    """Unique per process: host (the pod name in Kubernetes), pid, and randomness for restarts."""
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


class ConditionsFailed(Exception):
    """A record was not stored: some of its conditions failed (see :meth:`AuditLog.append`)."""

    def __init__(self, failed: tuple[Condition, ...]) -> None:
        super().__init__(f"{len(failed)} condition(s) of the record failed")
        self.failed = failed


@dataclass(frozen=True, slots=True)
class _Chained:
    """Chained record bodies and their stored forms (the JSON written to Redis), in order."""

    bodies: list[dict[str, Any]]
    payloads: list[bytes]

    def add(self, body: dict[str, Any], payload: bytes) -> None:
        self.bodies.append(body)
        self.payloads.append(payload)

    def extend(self, other: _Chained) -> None:
        self.bodies.extend(other.bodies)
        self.payloads.extend(other.payloads)


@dataclass(frozen=True, slots=True)
class _Pending:
    body: dict[str, Any]
    conditions: tuple[Condition, ...] = ()


@dataclass
class _Fold:
    template: AuditRecord
    started: float
    folded: int = 0  # occurrences after the first, not yet written
    first_folded_at: float | None = None
    # Their request ids (the first FOLDED_IDS_MAX), so each caller's X-Request-Id is on record.
    request_ids: list[str] = dataclasses.field(default_factory=list)


class AuditLog:
    """Appends chained records to Redis (and stdout), seals them with checkpoints, folds
    identical denials and applies retention."""

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
        signer: SigningKey | None = None,
        checkpoint_every: int = 100,
        checkpoint_interval_s: float = CHECKPOINT_INTERVAL_S,
    ) -> None:
        """``signer`` None disables checkpoints (tools and tests only: such a chain never
        verifies as sealed); :func:`broker.app.create_app` always passes one."""
        self._redis = client
        self.store = AuditStore(client, prefix=prefix, retention_s=retention_s)
        self._retention_s = retention_s
        self._stdout = stdout
        self._out = out
        self._clock = clock
        self._signer = signer
        self._every = checkpoint_every
        self._interval = checkpoint_interval_s
        self._lock = threading.Lock()  # serialises seq/prev so each writer's chain is linear
        self._commits: GroupCommit[_Pending] = GroupCommit(self._flush)
        self._start_chain(writer or new_writer_id())
        self._last_retention = clock()
        self._folds: dict[tuple[str, ...], _Fold] = {}
        self._folds_lock = threading.Lock()

    def _start_chain(self, writer: str) -> None:
        self.writer = writer
        self._seq = 0
        self._prev = GENESIS
        self._unsealed = 0  # records since the last checkpoint
        self._unsealed_since: float | None = None
        self._uncertain: _Chained | None = None  # sent, not acknowledged
        self._registered = False
        self._last_entry = (0, 0)  # the newest stream entry id this writer used or tried

    @property
    def chain_key(self) -> str:
        return self.store.keys.chain(self.writer)

    # -- appending -----------------------------------------------------------------------------

    def append(
        self, record: AuditRecord | dict[str, Any], conditions: Sequence[Condition] = ()
    ) -> dict[str, Any]:
        """Store ``record`` (chained) in Redis and echo it on stdout; return what was stored.

        ``record`` is an :class:`AuditRecord`, or a body from :func:`record_body` (which the
        log then owns: it is chained in place and returned).

        Group commit: concurrent appends of this process wait for one transaction that carries
        all their records. Whoever finds no commit under way leads: it takes every queued
        record, chains them in order, stores them in one round trip, wakes the others, and
        hands leadership to a waiter. Each caller returns only once its own record is stored.

        ``conditions`` (rate-limit hits, a memo's generation) are checked and applied in the
        same atomic write: if one fails, this record is not stored (nor its hits counted) and
        :class:`ConditionsFailed` names the failures; the rest of the batch is re-chained
        without it and stored.

        Raises :class:`StoreUnavailable` when Redis cannot take it; the record still goes to
        stdout with ``stored: false`` so it is not lost.
        """
        body = record.to_dict() if isinstance(record, AuditRecord) else record
        ticket = self._commits.submit(_Pending(body, tuple(conditions)))
        if isinstance(ticket.error, ConditionsFailed):
            raise ticket.error
        if ticket.error is not None:
            raise StoreUnavailable(
                "the audit log is unavailable; nothing was issued", retry_after=1
            ) from ticket.error
        return ticket.payload.body

    def _flush(self, batch: list[Ticket[_Pending]]) -> None:
        with self._lock:
            self._commit_batch_locked(batch)

    def _commit_batch_locked(self, batch: list[Ticket[_Pending]]) -> None:
        """Chain ``batch`` (checkpoints inserted where due) and store it in one transaction.

        Records whose conditions fail are dropped and the rest re-chained and stored (each
        round drops at least one). Fails closed: unless the store succeeded, every caller in
        the batch gets an error.
        """
        pending = batch
        error: BaseException | None = RuntimeError("audit batch was not stored")
        try:
            self._recover_locked([p.payload.body for p in batch])
            while pending:
                chained, conditions, owners = self._chain_batch(pending)
                failed = self._store_locked(chained, conditions)
                if not failed:
                    break
                refused: dict[int, list[Condition]] = {}
                for at in failed:
                    refused.setdefault(owners[at], []).append(conditions[at])
                for i, conds in refused.items():
                    pending[i].error = ConditionsFailed(tuple(conds))
                pending = [t for i, t in enumerate(pending) if i not in refused]
            error = None
        except StoreUnavailable as exc:
            error = exc.__cause__ or exc
        except Exception as exc:
            log.exception("audit batch not stored")
            error = exc
        finally:
            for p in pending:
                p.error = error

    def _chain_batch(
        self, batch: list[Ticket[_Pending]]
    ) -> tuple[_Chained, list[Condition], list[int]]:
        """The chained records of ``batch`` (checkpoints where due), its conditions, and for
        each condition the position of the ticket it belongs to."""
        chained = _Chained([], [])
        conditions: list[Condition] = []
        owners: list[int] = []
        seq, prev, unsealed = self._seq, self._prev, self._unsealed
        for i, p in enumerate(batch):
            body = p.payload.body
            chained.add(body, self._chain(body, seq + 1, prev))
            conditions.extend(p.payload.conditions)
            owners.extend([i] * len(p.payload.conditions))
            seq, prev, unsealed = seq + 1, body["hash"], unsealed + 1
            if self._signer is not None and unsealed >= self._every:
                cp = self._checkpoint(seq + 1, prev, final=False, records=unsealed)
                chained.extend(cp)
                seq, prev, unsealed = seq + 1, cp.bodies[0]["hash"], 0
        return chained, conditions, owners

    def checkpoint(self, *, final: bool = False) -> dict[str, Any] | None:
        """Seal the chain's head now; None when there is nothing to seal (or no signer).

        A ``final`` checkpoint ends this writer's chain; records appended later start a new
        writer. Raises :class:`StoreUnavailable`.
        """
        with self._lock:
            if self._signer is None:
                return None
            self._recover_locked([])
            if self._seq == 0 or (not final and self._unsealed == 0):
                return None
            cp = self._checkpoint(self._seq + 1, self._prev, final=final, records=self._unsealed)
            self._store_locked(cp)
            if final:
                self._start_chain(new_writer_id())
        return cp.bodies[0]

    def _chain(self, body: dict[str, Any], seq: int, prev: str) -> bytes:
        """Chain ``body`` at ``seq`` after ``prev`` (sets writer, seq, prev, hash); return its
        stored form: the canonical JSON that was hashed, plus the hash (encoded once)."""
        body["writer"] = self.writer
        body["seq"] = seq
        body["prev"] = prev
        body["id"] = None
        canonical = canonical_json(body)
        body["hash"] = digest = sha256_hex(canonical)
        return with_field(canonical, "hash", digest)

    def _checkpoint(self, seq: int, prev: str, *, final: bool, records: int) -> _Chained:
        """A signed checkpoint sealing ``prev`` (the head after ``records`` unsealed ones)."""
        signer = self._signer
        assert signer is not None
        now = rfc3339(self._clock())
        kind = "final" if final else "checkpoint"
        message = checkpoint_message(
            writer=self.writer, seq=seq, prev=prev, time=now, key_id=signer.key_id, final=final
        )
        record = AuditRecord(
            time=now,
            request_id=None,
            event=CHECKPOINT_EVENT,
            decision=None,
            reason=kind,
            details={
                "key_id": signer.key_id,
                "signature": signer.sign(message),
                "final": final,
                "records": records,
            },
        )
        body = record.to_dict()
        return _Chained([body], [self._chain(body, seq, prev)])

    def _next_entry_id(self, now: float) -> str:
        """A stream entry id above every one this writer used: its clock in ms (held still if
        the clock steps back) and a counter within the ms."""
        ms = int(now * 1000)
        last_ms, last_n = self._last_entry
        self._last_entry = (ms, 0) if ms > last_ms else (last_ms, last_n + 1)
        return f"{self._last_entry[0]}-{self._last_entry[1]}"

    def _store_locked(
        self, chained: _Chained, conditions: Sequence[Condition] = ()
    ) -> tuple[int, ...]:
        """Store ``chained`` if ``conditions`` hold; return the failed ones' positions (then
        nothing was stored and the chain's head is unchanged)."""
        now = self._clock()
        bodies = chained.bodies
        entry_ids = [self._next_entry_id(now) for _ in bodies]
        try:
            # One round trip, atomic: the records, their index entries and counters, the
            # sealed state when a checkpoint rides along, and the writer's registration.
            pipe: Any = CommandRecorder()  # redis-py command methods, recorded
            for body, payload, entry_id in zip(bodies, chained.payloads, entry_ids, strict=True):
                self.store.queue_append(pipe, self.writer, entry_id, payload, body, now)
            last_cp = next((b for b in reversed(bodies) if is_checkpoint(b)), None)
            if last_cp is not None:
                pipe.set(self.store.keys.sealed(self.writer), orjson.dumps(_sealed(last_cp)))
            if not self._registered:
                info = {"started": rfc3339(now), "host": socket.gethostname()[:64],
                        "pid": os.getpid()}
                pipe.hset(self.store.keys.writers, self.writer, orjson.dumps(info))
            failed = self.store.run_batch(pipe, conditions)
        except redis.RedisError as exc:
            # Maybe stored, maybe not (a lost reply): the next append looks before chaining on.
            self._uncertain = chained
            self.store.indexer.forget()
            self._emit_many([dict(b, stored=False) for b in bodies])
            raise StoreUnavailable(
                "the audit log is unavailable; nothing was issued", retry_after=1
            ) from exc
        if failed:
            self.store.indexer.forget()  # its expiries were not written: set them next time
            return failed
        self._registered = True
        self._commit_locked(chained, entry_ids)
        return ()

    def _commit_locked(self, chained: _Chained, entry_ids: list[str]) -> None:
        lines = []
        for b, payload, entry_id in zip(chained.bodies, chained.payloads, entry_ids, strict=True):
            b["id"] = rid = record_id(self.writer, entry_id)
            self._seq, self._prev = b["seq"], b["hash"]
            if is_checkpoint(b):
                self._unsealed, self._unsealed_since = 0, None
            else:
                self._unsealed += 1
                if self._unsealed_since is None:
                    self._unsealed_since = self._clock()
            if self._stdout:
                lines.append(_stdout_line(with_field(payload, "id", rid)))
        self._write(b"".join(lines))

    def _recover_locked(self, pending: list[dict[str, Any]]) -> None:
        """After a failed store, learn whether Redis has the records after all (lost reply)."""
        if self._uncertain is None:
            return
        uncertain = self._uncertain
        try:
            tail = self.store.tail(self.writer, len(uncertain.bodies))
        except redis.RedisError as exc:
            self._emit_many([dict(b, writer=self.writer, stored=False) for b in pending])
            raise StoreUnavailable(
                "the audit log is unavailable; nothing was issued", retry_after=1
            ) from exc
        self._uncertain = None
        entries = list(reversed(tail))
        if len(entries) == len(uncertain.bodies) and all(
            rec.get("hash") == b["hash"]
            for (_, rec), b in zip(entries, uncertain.bodies, strict=True)
        ):
            self._registered = True  # the registration rode in the same transaction
            self._commit_locked(uncertain, [e for e, _ in entries])

    # -- denials -------------------------------------------------------------------------------

    def append_denial(self, record: AuditRecord, fold_key: tuple[str, ...]) -> None:
        """Append a denial, folding repeats of ``fold_key`` within one second into a count."""
        now = self._clock()
        with self._folds_lock:
            self._flush_expired_locked(now)
            fold = self._folds.get(fold_key)
            if fold is not None:
                fold.folded += 1
                if fold.first_folded_at is None:
                    fold.first_folded_at = now
                if record.request_id is not None and len(fold.request_ids) < FOLDED_IDS_MAX:
                    fold.request_ids.append(record.request_id)
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
                    self._append_quietly(_folded_record(fold))

    def _append_quietly(self, record: AuditRecord) -> None:
        try:
            self.append(record)
        except StoreUnavailable:
            log.warning("audit record not stored (Redis unavailable); written to stdout only")

    # -- background ----------------------------------------------------------------------------

    def tick(self) -> None:
        """Periodic work (call about twice a second): close fold windows, seal a head that has
        waited ``checkpoint_interval_s``, and now and then apply retention."""
        self.flush_folds()
        now = self._clock()
        since = self._unsealed_since
        if since is not None and now - since >= self._interval:
            try:
                self.checkpoint()
            except StoreUnavailable:
                log.warning("audit checkpoint not stored (Redis unavailable); will retry")
        if now - self._last_retention >= RETENTION_EVERY_S:
            self._last_retention = now
            self.apply_retention()

    def apply_retention(self) -> int:
        """Trim every chain by age at checkpoint boundaries (one process a minute does it)."""
        try:
            if not self.store.try_lock_retention(self.writer, RETENTION_EVERY_S * 0.9):
                return 0
            return self.store.apply_retention(now=self._clock(), retention_s=self._retention_s)
        except (redis.RedisError, StoreUnavailable):
            log.warning("audit retention failed; will retry")
            return 0

    def close(self) -> None:
        """At shutdown: write pending fold counts and the final checkpoint."""
        self.flush_folds(force=True)
        try:
            self.checkpoint(final=True)
        except StoreUnavailable:
            log.warning("final audit checkpoint not stored (Redis unavailable); see stdout")

    # -- output and reading --------------------------------------------------------------------

    def _emit_many(self, bodies: list[dict[str, Any]]) -> None:
        """One JSON line per record on stdout, in one write (the witness outside Redis)."""
        if bodies and self._stdout:  # as _commit_locked: no lines built that go nowhere
            self._write(b"".join([_stdout_line(orjson.dumps(b)) for b in bodies]))

    def _write(self, lines: bytes) -> None:
        """Audit lines to stdout, in one write."""
        if not self._stdout or not lines:
            return
        out = self._out or sys.stdout
        binary = getattr(out, "buffer", None)  # a real stdout takes the bytes as they are
        if binary is not None:
            out.flush()
            binary.write(lines)
            binary.flush()
        else:
            out.write(lines.decode())
            out.flush()

    def recent(self, count: int = 100, *, checkpoints: bool = False) -> list[dict[str, Any]]:
        """Newest records of all writers first (checkpoints only when asked)."""
        out: list[dict[str, Any]] = []
        cursor = None
        while len(out) < count:
            page, cursor = self.store.events(limit=min(1000, count), cursor=cursor)
            out.extend(r for r in page if checkpoints or not is_checkpoint(r))
            if cursor is None:
                break
        return out[:count]


def _folded_record(fold: _Fold) -> AuditRecord:
    """The record of a fold's repeats: the first repeat's time and request id, every repeat's
    id in ``details.request_ids`` (the first :data:`FOLDED_IDS_MAX`; ``more`` counts the rest)."""
    ids = fold.request_ids
    details = dict(fold.template.details or {})
    details["request_ids"] = ids
    if fold.folded > len(ids):
        details["more"] = fold.folded - len(ids)
    return dataclasses.replace(
        fold.template,
        count=fold.folded,
        time=rfc3339(fold.first_folded_at or fold.started),
        request_id=ids[0] if ids else fold.template.request_id,
        latency_ms=None,
        details=details,
    )


def _stdout_line(record: bytes) -> bytes:
    """A record's line on stdout, given its JSON: ``{"audit": <record>}``."""
    return b'{"audit":' + record + b"}\n"


def _sealed(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint signed, kept beside the chain (plus its hash, for reference)."""
    details = checkpoint["details"]
    return {
        "writer": checkpoint["writer"],
        "seq": checkpoint["seq"],
        "prev": checkpoint["prev"],
        "time": checkpoint["time"],
        "key_id": details["key_id"],
        "final": details["final"],
        "signature": details["signature"],
        "hash": checkpoint["hash"],
    }
