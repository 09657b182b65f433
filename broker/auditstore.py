"""The audit log's layout in Redis, and everything that reads it (events, chains, retention).

Per writer (one worker process), keys sharing the hash tag ``{audit:WRITER}`` so one MULTI can
touch them together (DESIGN.md §8):

- ``{prefix}{audit:W}:chain``: a stream, one entry ``{"r": <record JSON>}`` per record, in chain
  order; the entry id (Redis server time) orders records in time across writers;
- ``{prefix}{audit:W}:sealed``: the writer's last checkpoint (signed), so verification notices a
  chain cut below it.

And ``{prefix}audit:writers``: a hash of every writer that stored a record, so verification
notices a chain that is gone altogether. The secondary indexes that queries use are described in
:mod:`broker.auditindex`; :meth:`AuditStore.queue_append` writes a record with its index entries.
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import redis

from broker.auditchain import entry_of, is_checkpoint, record_id
from broker.auditindex import IndexKeys, IndexWriter, pointer
from broker.auditverify import Anchor, AnchorLost, ChainReport, ChainVerifier, VerifyReport
from broker.errors import InvalidRequest, StoreUnavailable
from broker.redisbatch import CommandRecorder, Condition, Runner, run_atomically
from broker.signing import KeyRing

log = logging.getLogger(__name__)

PAGE = 1000
RETENTION_SCAN_PAGES = 50  # give up looking for a checkpoint after this many pages


@dataclass(frozen=True, slots=True)
class AuditKeys:
    """Redis key names of the audit log under ``prefix``."""

    prefix: str

    def chain(self, writer: str) -> str:
        return f"{self.prefix}{{audit:{writer}}}:chain"

    def sealed(self, writer: str) -> str:
        return f"{self.prefix}{{audit:{writer}}}:sealed"

    @property
    def writers(self) -> str:
        return f"{self.prefix}audit:writers"

    @property
    def retention_lock(self) -> str:
        return f"{self.prefix}audit:retention-lock"


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def decode_entry(writer: str, entry_id: object, fields: Any) -> dict[str, Any]:
    """A stream entry as a record dict with its ``id``. Garbage stays visible to verification
    as a record with no chain fields (which verification reports as altered)."""
    rid = record_id(writer, _text(entry_id))
    fields = fields if isinstance(fields, dict) else {}
    raw = fields.get(b"r", fields.get("r"))
    try:
        body = orjson.loads(raw) if raw is not None else None
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        return {"id": rid, "writer": writer, "malformed": True}
    body["id"] = rid
    return body


def _entry_key(entry_id: str) -> tuple[int, int]:
    ms, _, n = entry_id.partition("-")
    return int(ms), int(n or 0)


def encode_cursor(entry_id: str, writer: str) -> str:
    return base64.urlsafe_b64encode(f"{entry_id} {writer}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, int, str]:
    """``(ms, n, writer)`` of a cursor; raises :class:`InvalidRequest` when malformed."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        entry, _, writer = text.partition(" ")
        ms, n = _entry_key(entry)
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise InvalidRequest("cursor is malformed", reason="bad_cursor") from exc
    if not writer:
        raise InvalidRequest("cursor is malformed", reason="bad_cursor")
    return ms, n, writer


class AuditStore:
    """Reads the audit log (and applies retention). Redis errors become StoreUnavailable."""

    def __init__(
        self, client: redis.Redis, *, prefix: str = "tb:", retention_s: float = 30 * 86400.0
    ) -> None:
        self._redis = client
        self.runner: Runner | None = None  # set by the app: shares round trips (redismux)
        self.keys = AuditKeys(prefix)
        self.index_keys = IndexKeys(prefix)
        self.indexer = IndexWriter(self.index_keys, retention_s=retention_s)

    @property
    def client(self) -> redis.Redis:
        return self._redis

    def queue_append(
        self, pipe: Any, writer: str, entry_id: str, payload: bytes, record: dict[str, Any],
        now: float,
    ) -> None:
        """Queue one record into ``pipe``: the chain entry at ``entry_id`` (chosen by the
        writer, so the index entries can point at it in the same round trip) and its index
        entries and counters. The caller runs ``pipe`` atomically (:meth:`run_batch`)."""
        pipe.execute_command("XADD", self.keys.chain(writer), entry_id, "r", payload)
        self.indexer.queue(pipe, record, pointer(writer, entry_id), now)

    def run_batch(
        self, batch: CommandRecorder, conditions: Sequence[Condition] = ()
    ) -> tuple[int, ...]:
        """Run queued appends atomically in one round trip (shared through the process's
        multiplexer when it has one), provided ``conditions`` hold; return the positions of
        those that failed (nothing written then). Raises ``redis.RedisError``."""
        return run_atomically(self._redis, batch, self.runner, conditions)

    def writers(self) -> dict[str, dict[str, Any]]:
        """Registered writers and what they said about themselves when they registered."""
        try:
            raw = self._redis.hgetall(self.keys.writers)
        except redis.RedisError as exc:
            raise StoreUnavailable("the audit log is unavailable", retry_after=1) from exc
        out: dict[str, dict[str, Any]] = {}
        for k, v in (raw or {}).items():
            try:
                info = orjson.loads(v)
            except orjson.JSONDecodeError:
                info = {}
            out[_text(k)] = info if isinstance(info, dict) else {}
        return out

    def sealed(self, writer: str) -> dict[str, Any] | None:
        """The writer's last checkpoint as recorded beside its chain (None when absent)."""
        try:
            raw = self._redis.get(self.keys.sealed(writer))
        except redis.RedisError as exc:
            raise StoreUnavailable("the audit log is unavailable", retry_after=1) from exc
        if raw is None:
            return None
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return {"malformed": True}
        return value if isinstance(value, dict) else {"malformed": True}

    def chain(self, writer: str, *, start: str | None = None) -> Iterator[dict[str, Any]]:
        """The writer's records in stream order, from the record ``start`` (an entry id) on."""
        key = self.keys.chain(writer)
        lower = start or "-"
        while True:
            try:
                rows = self._redis.xrange(key, min=lower, max="+", count=PAGE)
            except redis.RedisError as exc:
                raise StoreUnavailable("the audit log is unavailable", retry_after=1) from exc
            for entry_id, fields in rows or []:
                yield decode_entry(writer, entry_id, fields)
            if not rows or len(rows) < PAGE:
                return
            lower = "(" + _text(rows[-1][0])

    def tail(self, writer: str, count: int = 1) -> list[tuple[str, dict[str, Any]]]:
        """The newest ``count`` entries (newest first) as (entry id, record). Raises RedisError."""
        rows = self._redis.xrevrange(self.keys.chain(writer), count=count)
        return [(_text(e), decode_entry(writer, e, f)) for e, f in rows or []]

    def events(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """The raw chains: records of every writer, newest first, in ``[since, until]``
        (seconds; the writer's clock when stored); ``cursor`` continues a previous page.
        Returns (records, next cursor or None).

        Each writer's stream is read newest-first and merged, so this sees every entry of every
        registered chain, indexed or not (tools, tests, :meth:`AuditLog.recent`). The API reads
        through the indexes instead (:mod:`broker.auditquery`): filtered, and stable for readers
        that follow new records.
        """
        upper = f"{int(until * 1000)}" if until is not None else "+"
        lower = f"{int(since * 1000)}" if since is not None else "-"
        after = decode_cursor(cursor) if cursor else None
        if after is not None:
            upper = f"{after[0]}-{after[1]}" if until is None or after[0] <= until * 1000 else upper
        candidates: list[tuple[tuple[int, int, str], dict[str, Any]]] = []
        try:
            writers = list(self.writers())
            pipe = self._redis.pipeline(transaction=False)
            for w in writers:
                # +2: the entry at the cursor itself (skipped) and one to tell there is more.
                pipe.xrevrange(self.keys.chain(w), max=upper, min=lower, count=limit + 2)
            pages = pipe.execute()
        except redis.RedisError as exc:
            raise StoreUnavailable("the audit log is unavailable", retry_after=1) from exc
        for w, rows in zip(writers, pages, strict=True):
            for entry_id, fields in rows or []:
                ms, n = _entry_key(_text(entry_id))
                pos = (ms, n, w)
                if after is not None and pos >= after:
                    continue
                candidates.append((pos, decode_entry(w, entry_id, fields)))
        candidates.sort(key=lambda c: c[0], reverse=True)
        page = candidates[:limit]
        next_cursor = None
        if len(candidates) > limit and page:
            ms, n, w = page[-1][0]
            next_cursor = encode_cursor(f"{ms}-{n}", w)
        return [r for _, r in page], next_cursor

    def apply_retention(self, *, now: float, retention_s: float) -> int:
        """Trim each chain to its newest checkpoint older than the retention period, so what
        remains starts at a signed checkpoint and still verifies. A chain that ended with its
        writer's final checkpoint, all of it older than that, goes with its registration.
        Returns the number of records removed. Raises RedisError."""
        cutoff = f"{int((now - retention_s) * 1000)}"
        removed = 0
        for writer in self.writers():
            key = self.keys.chain(writer)
            found = self._newest_checkpoint_before(key, writer, cutoff)
            if found is None:
                continue
            entry_id, record = found
            newest = self._redis.xrevrange(key, count=1)
            details = record.get("details")
            final = isinstance(details, dict) and details.get("final") is True
            if final and newest and _text(newest[0][0]) == entry_id:
                # Unregister first: a crash in between leaves an unlisted chain, not a false alarm.
                removed += int(self._redis.xlen(key))
                self._redis.hdel(self.keys.writers, writer)
                pipe = self._redis.pipeline(transaction=True)
                pipe.delete(key, self.keys.sealed(writer))
                pipe.execute()
                continue
            removed += int(self._redis.xtrim(key, minid=entry_id, approximate=False) or 0)
        self._trim_busy_indexes(cutoff)
        if removed:
            log.info("audit retention removed %d record(s)", removed)
        return removed

    def _trim_busy_indexes(self, cutoff: str) -> None:
        """Every index trims itself as entries arrive and expires when idle; the few that
        every record passes through are also trimmed here, for when no records arrive."""
        pipe = self._redis.pipeline(transaction=False)
        for key in self.index_keys.busy():
            pipe.xtrim(key, minid=cutoff, approximate=False)
        pipe.execute()

    def _newest_checkpoint_before(
        self, key: str, writer: str, cutoff: str
    ) -> tuple[str, dict[str, Any]] | None:
        upper = cutoff
        for _ in range(RETENTION_SCAN_PAGES):
            rows = self._redis.xrevrange(key, max=upper, min="-", count=200)
            for entry_id, fields in rows or []:
                record = decode_entry(writer, entry_id, fields)
                if is_checkpoint(record):
                    return _text(entry_id), record
            if not rows or len(rows) < 200:
                return None
            upper = "(" + _text(rows[-1][0])
        return None

    def try_lock_retention(self, owner: str, ttl_s: float) -> bool:
        """One process per ``ttl_s`` applies retention. Raises RedisError."""
        return bool(self._redis.set(self.keys.retention_lock, owner, nx=True,
                                    px=int(ttl_s * 1000)))


class LiveVerifier:
    """Verifies every registered writer's chain in Redis, resuming each chain from the last
    checkpoint this process verified (kept in memory: a party that can write to Redis cannot
    move it). ``full`` re-reads everything."""

    def __init__(
        self,
        store: AuditStore,
        keys: KeyRing,
        *,
        retention_s: float | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._keys = keys
        self._retention_s = retention_s
        self._clock = clock
        self._state: dict[str, Anchor] = {}
        self._lock = threading.Lock()

    def verify(self, *, full: bool = False, strict: bool = False) -> VerifyReport:
        """Verify all chains; raises StoreUnavailable when Redis cannot be read."""
        with self._lock:
            now = self._clock()
            writers = sorted(self._store.writers())
            reports = []
            for writer in writers:
                anchor = None if full else self._state.get(writer)
                try:
                    report = self._verify_writer(writer, anchor, now, strict)
                except AnchorLost:
                    report = self._verify_writer(writer, None, now, strict)
                if report.anchor is not None:
                    self._state[writer] = report.anchor
                else:
                    self._state.pop(writer, None)
                reports.append(report)
            for gone in set(self._state) - set(writers):
                del self._state[gone]
            return VerifyReport(tuple(reports))

    def _verify_writer(
        self, writer: str, anchor: Anchor | None, now: float, strict: bool
    ) -> ChainReport:
        # The sealed state first: the chain read after it holds at least that checkpoint.
        sealed = self._store.sealed(writer)
        cv = ChainVerifier(writer, self._keys, anchor=anchor, retention_s=self._retention_s,
                           now=now)
        start = entry_of(anchor.id) if anchor is not None else None
        for record in self._store.chain(writer, start=f"{start[0]}-{start[1]}" if start else None):
            if not cv.feed(record):
                break
        return cv.finish(sealed_state=sealed, registered=True, strict=strict)  # may: AnchorLost
