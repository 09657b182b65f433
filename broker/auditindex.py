"""Secondary indexes and daily counters of the audit log, written in the same transaction as
each record, so filtered queries and reports never scan the log.

Layout under the key prefix (these keys span writers, so they carry no per-writer hash tag;
on Redis Cluster they would be written in a second pipeline, see docs/audit.md):

- ``{prefix}audit:idx:all``: a stream with one entry ``{"p": "<writer> <entry id>"}`` per
  record, pointing at the record in its writer's chain. Its entry ids are assigned by Redis when
  the transaction runs, so the index order is the order in which records were committed: a
  reader that continues after an entry never misses a record committed later.
- ``{prefix}audit:idx:<name>:<digest>``: the same, for each filterable value of a record:
  ``subject`` (the ``sub``), ``role``, ``sa`` (GCP service account, lower-cased), ``decision`` and
  ``event``. ``digest`` is a SHA-256 prefix of the value, so attacker-chosen claims cannot shape
  key names. Each entry trims its stream to the retention period on the way in (``XADD MINID ~``,
  amortised O(1)); each key also expires a day past the retention period after its last entry.
- ``{prefix}{audit:stats}:<YYYY-MM-DD>``: a hash of counters of ``token.exchange`` records stored
  that day (UTC): per (role, GCP service account) issued, per (decision, reason) refused;
  ``{prefix}{audit:stats}:<day>:refused``: a sorted set of refused subjects by count. They make
  ``GET /v1/audit/report`` O(days). Both share one hash tag so a report can union them.

Per record this is one ``XADD`` per index (three to six; sent as one ``XADDS`` of the batch
script, :mod:`broker.redisbatch`) and one or two counter increments, all in the record's own
atomic batch: no extra round trip.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

DAY_S = 86400
EVENT_EXCHANGE = "token.exchange"
# Filterable record fields: index name -> record field.
INDEXED_FIELDS = {
    "subject": "subject",
    "role": "role",
    "sa": "service_account",
    "decision": "decision",
    "event": "event",
}
DECISIONS = ("issued", "denied", "error")
EVENTS = ("token.exchange", "roles.changed", "roles.reloaded", "cache.purged", "audit.read",
          "audit.checkpoint")
# Values so common that their index would nearly copy ``all`` (most records are issued token
# exchanges): not indexed, which saves two writes per record on the hot path. Queries for them
# walk ``all`` and check the field (dense matches, so a page fills quickly).
UNINDEXED = frozenset({("decision", "issued"), ("event", EVENT_EXCHANGE)})
MAX_VALUE_CHARS = 1024  # longer values are not indexed (nothing legitimate is that long)
TTL_MEMO_MAX = 50_000  # keys whose expiry this process set today; cleared when full


def normalise(name: str, value: str) -> str:
    """The form a value is indexed and compared in (service accounts ignore case)."""
    return value.lower() if name == "sa" else value


def digest(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def day_of(ts: float) -> str:
    """The UTC day of ``ts`` as ``YYYY-MM-DD``."""
    return _day(int(ts // DAY_S))


@functools.lru_cache(maxsize=64)  # every record names its day; they change once a day
def _day(day_number: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(day_number * DAY_S))


@functools.lru_cache(maxsize=65536)  # every record names a few; roles and subjects repeat
def _index_key(prefix: str, name: str, value: str) -> str:
    return f"{prefix}audit:idx:{name}:{digest(normalise(name, value))}"


@dataclass(frozen=True, slots=True)
class IndexKeys:
    """Key names of the audit indexes and counters under ``prefix``."""

    prefix: str

    @property
    def all(self) -> str:
        return f"{self.prefix}audit:idx:all"

    def index(self, name: str, value: str) -> str:
        """The index stream of ``value`` of filter ``name`` (one of :data:`INDEXED_FIELDS`)."""
        return _index_key(self.prefix, name, value)

    def busy(self) -> Iterator[str]:
        """The index streams of ``all``, every decision and every event the broker writes."""
        yield self.all
        for decision in DECISIONS:
            yield self.index("decision", decision)
        for event in EVENTS:
            yield self.index("event", event)

    def stats(self, day: str) -> str:
        return f"{self.prefix}{{audit:stats}}:{day}"

    def refused(self, day: str) -> str:
        return f"{self.prefix}{{audit:stats}}:{day}:refused"

    def scratch(self, token: str) -> str:
        """A temporary key in the stats' hash slot (for unions while building a report)."""
        return f"{self.prefix}{{audit:stats}}:tmp:{token}"

    def for_record(self, record: dict[str, Any]) -> Iterator[str]:
        """Every index stream ``record`` belongs to, ``all`` first."""
        yield self.all
        for name, field in INDEXED_FIELDS.items():
            value = record.get(field)
            if (
                isinstance(value, str)
                and value
                and len(value) <= MAX_VALUE_CHARS
                and (name, value) not in UNINDEXED
            ):
                yield self.index(name, value)


def pointer(writer: str, entry_id: str) -> str:
    """What an index entry holds: where the record lives (writer ids contain no spaces)."""
    return f"{writer} {entry_id}"


def parse_pointer(value: object) -> tuple[str, str] | None:
    text = value.decode() if isinstance(value, bytes) else value
    if not isinstance(text, str):
        return None
    writer, sep, entry = text.rpartition(" ")
    return (writer, entry) if sep and writer and entry else None


@functools.lru_cache(maxsize=4096)  # issued records repeat (role, service account)
def stat_field(*parts: object) -> str:
    """A counter's field name: a JSON array, so any value round-trips unambiguously."""
    return orjson.dumps(list(parts)).decode()


def refused_member(record: dict[str, Any]) -> str:
    """Who was refused, as counted in the ``:refused`` set: [issuer, subject, verified]."""
    return stat_field(record.get("issuer"), record.get("subject"),
                      bool(record.get("subject_verified")))


def counter_updates(record: dict[str, Any]) -> tuple[dict[str, int], str | None, int]:
    """What ``record`` adds to its day's counters: hash fields -> increment, the refused-set
    member (or None) and the record's count. Only ``token.exchange`` records are counted."""
    if record.get("event") != EVENT_EXCHANGE:
        return {}, None, 0
    count = record.get("count")
    n = count if isinstance(count, int) and count > 0 else 1
    decision = record.get("decision")
    if decision == "issued":
        return {stat_field("issued", record.get("role"), record.get("service_account")): n}, None, n
    return {stat_field("refused", decision, record.get("reason")): n}, refused_member(record), n


class IndexWriter:
    """Queues a record's index entries and counter updates into a pipeline. One per process:
    it remembers which keys it has already given an expiry today, so that costs one command
    per key per day rather than one per record."""

    def __init__(self, keys: IndexKeys, *, retention_s: float) -> None:
        self.keys = keys
        self._retention_s = retention_s
        self._ttl_set: dict[str, int] = {}

    def queue(self, pipe: Any, record: dict[str, Any], where: str, now: float) -> None:
        """Add ``record`` (stored at ``where``, see :func:`pointer`) to its indexes and its
        day's counters, in ``pipe`` (a :class:`broker.redisbatch.CommandRecorder`, run by
        :func:`broker.redisbatch.run_atomically`). ``now`` is the writer's clock."""
        minid = max(0, int((now - self._retention_s) * 1000))
        today = int(now // DAY_S)
        keep_ms = int((self._retention_s + DAY_S) * 1000)
        keys = list(self.keys.for_record(record))
        pipe.xadds(keys, minid, "p", where)  # XADD key MINID ~ minid * p where, per key
        for key in keys:
            if self._first_today(key, today):
                pipe.pexpire(key, keep_ms)
        fields, member, n = counter_updates(record)
        if not fields:
            return
        day = day_of(now)
        stats = self.keys.stats(day)
        for field, inc in fields.items():
            pipe.hincrby(stats, field, inc)
        expire_at = int((today + 1) * DAY_S + self._retention_s + DAY_S)
        if self._first_today(stats, today):
            pipe.expireat(stats, expire_at)
        if member is not None:
            refused = self.keys.refused(day)
            pipe.zincrby(refused, n, member)
            if self._first_today(refused, today):
                pipe.expireat(refused, expire_at)

    def _first_today(self, key: str, today: int) -> bool:
        if self._ttl_set.get(key) == today:
            return False
        if len(self._ttl_set) >= TTL_MEMO_MAX:
            self._ttl_set.clear()
        self._ttl_set[key] = today
        return True

    def forget(self) -> None:
        """Forget which expiries were set (after a failed write, they may not have been)."""
        self._ttl_set.clear()
