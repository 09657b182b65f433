"""Audit queries: filters, cursors and follows, read through the indexes of
:mod:`broker.auditindex` (never a scan of the whole log).

A query walks one index stream (the ``all`` index without filters; otherwise the filter's index
holding the fewest entries) newest or oldest first, resolves each entry to its record in the
writer's chain, and checks the remaining filters on the record. A page examines at most
``scan_budget`` index entries, so a request's work is bounded even when the other filters match
rarely; such a page can hold fewer than ``limit`` events while ``next_cursor`` says more follow.

Cursors are opaque to clients but self-contained: the query, the index walked and the position
(an index entry id, exclusive). Index entries are numbered by Redis in commit order, so paging
is stable while writes go on: nothing is returned twice, and a reader continuing oldest-first
from a cursor sees every record committed after it.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
import redis

from broker.auditchain import rfc3339
from broker.auditindex import DECISIONS, INDEXED_FIELDS, UNINDEXED, parse_pointer
from broker.auditstore import AuditStore, decode_entry
from broker.errors import InvalidRequest, StoreUnavailable

ORDERS = ("desc", "asc")
FILTERS = ("subject", "role", "service_account", "decision", "event")
# Filter -> index name; earlier entries win ties when the planner compares index sizes.
FILTER_INDEX = {"subject": "subject", "service_account": "sa", "role": "role",
                "event": "event", "decision": "decision"}
INDEX_NAMES = ("all", *INDEXED_FIELDS)
MAX_FILTER_CHARS = 512
SCAN_BUDGET = 5000  # index entries one page may examine
READ_EVENT = "audit.read"
T = TypeVar("T")
_ENTRY = re.compile(r"^\d{1,20}-\d{1,20}$")
_K8S_SUBJECT = "system:serviceaccount:"


def _bad_cursor(message: str = "cursor is malformed") -> InvalidRequest:
    return InvalidRequest(message, reason="bad_cursor")


@dataclass(frozen=True, slots=True)
class Query:
    """What an auditor asks for. ``since_ms``/``until_ms`` bound when records were stored
    (inclusive, ms); ``subject`` is a token's ``sub`` or a principal ``ISSUER/NS/SA``
    (``ISSUER/SUBJECT`` for oidc) with the issuer's configured name."""

    since_ms: int | None = None
    until_ms: int | None = None
    subject: str | None = None
    role: str | None = None
    service_account: str | None = None
    decision: str | None = None
    event: str | None = None
    order: str = "desc"

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ValueError("order must be asc or desc")
        for name in ("since_ms", "until_ms"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < 0):
                raise ValueError(f"{name} must be a non-negative integer")
        for name in FILTERS:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value
                                      or len(value) > MAX_FILTER_CHARS):
                raise ValueError(f"{name} must be 1 to {MAX_FILTER_CHARS} characters")
        if self.decision is not None and self.decision not in DECISIONS:
            raise ValueError(f"decision must be one of {', '.join(DECISIONS)}")

    @property
    def filters(self) -> dict[str, str]:
        """The field filters that are set."""
        return {f: v for f in FILTERS if (v := getattr(self, f)) is not None}

    def to_dict(self) -> dict[str, Any]:
        """The fields that are set (``order`` always): the cursor's form of the query."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_dict(cls, data: object) -> Query:
        """Raises ValueError (or TypeError) on anything :meth:`to_dict` cannot have made."""
        if not isinstance(data, dict):
            raise ValueError("not an object")
        known = {f.name for f in dataclasses.fields(cls)}
        if not set(data) <= known:
            raise ValueError("unknown fields")
        return cls(**data)

    def described(self) -> dict[str, Any]:
        """For audit.read records and humans: times as RFC 3339."""
        out: dict[str, Any] = dict(self.filters)
        if self.since_ms is not None:
            out["since"] = rfc3339(self.since_ms / 1000)
        if self.until_ms is not None:
            out["until"] = rfc3339(self.until_ms / 1000)
        out["order"] = self.order
        return out


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a query stands: the index it walks and the last entry examined (exclusive)."""

    query: Query
    index: str
    position: str | None

    def encode(self) -> str:
        body = {"v": 1, "q": self.query.to_dict(), "i": self.index, "p": self.position}
        return base64.urlsafe_b64encode(orjson.dumps(body)).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        """Raises :class:`InvalidRequest` (``bad_cursor``) for anything not made by encode."""
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            body = orjson.loads(raw)
            if not isinstance(body, dict) or body.get("v") != 1:
                raise ValueError("version")
            query = Query.from_dict(body.get("q"))
            index, position = body.get("i"), body.get("p")
        except (binascii.Error, ValueError, TypeError, orjson.JSONDecodeError) as exc:
            raise _bad_cursor() from exc
        if index not in INDEX_NAMES or (position is not None and (
                not isinstance(position, str) or not _ENTRY.match(position))):
            raise _bad_cursor()
        if index != "all" and index not in _indexes_of(query):
            raise _bad_cursor()
        return cls(query, index, position)


@dataclass(frozen=True, slots=True)
class Page:
    """One answer. ``next_cursor`` continues the query (None: nothing more matches now);
    ``follow_cursor`` is an oldest-first cursor for records stored after this page was read
    (None when the query has an ``until``)."""

    events: list[dict[str, Any]]
    next_cursor: str | None
    follow_cursor: str | None
    examined: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"events": self.events, "next_cursor": self.next_cursor,
                "follow_cursor": self.follow_cursor}


@dataclass(frozen=True, slots=True)
class IssuerRef:
    """A configured issuer as principals name it."""

    url: str
    kind: str  # kubernetes | oidc


def resolve_subject(value: str, issuers: Mapping[str, IssuerRef]) -> tuple[str, str | None]:
    """``(sub, issuer URL or None)`` for a subject filter: a principal ``ISSUER/NS/SA`` or
    ``ISSUER/SUBJECT`` (issuer by configured name) names one issuer; anything else is a ``sub``
    matched under every issuer."""
    if value.startswith(_K8S_SUBJECT):
        return value, None
    name, sep, rest = value.partition("/")
    ref = issuers.get(name) if sep else None
    if ref is None or not rest:
        return value, None
    if ref.kind == "kubernetes":
        namespace, sep, sa = rest.partition("/")
        if not sep or not namespace or not sa or "/" in sa:
            return value, None
        return f"{_K8S_SUBJECT}{namespace}:{sa}", ref.url
    return rest, ref.url


def _indexes_of(query: Query) -> list[str]:
    """The index streams that could serve ``query`` (values in UNINDEXED have none)."""
    return [
        FILTER_INDEX[f]
        for f in FILTER_INDEX
        if getattr(query, f) is not None and (FILTER_INDEX[f], getattr(query, f)) not in UNINDEXED
    ]


@dataclass(frozen=True, slots=True)
class _Plan:
    query: Query
    index: str
    key: str
    subject: str | None  # the resolved `sub`
    issuer: str | None  # the issuer URL a principal names

    def matches(self, record: dict[str, Any]) -> bool:
        q = self.query
        if self.subject is not None and record.get("subject") != self.subject:
            return False
        if self.issuer is not None and record.get("issuer") != self.issuer:
            return False
        if q.service_account is not None:
            sa = record.get("service_account")
            if not isinstance(sa, str) or sa.lower() != q.service_account.lower():
                return False
        return all(
            getattr(q, f) is None or record.get(f) == getattr(q, f)
            for f in ("role", "decision", "event")
        )


class AuditReader:
    """Runs :class:`Query` pages against the indexes. Redis errors become StoreUnavailable."""

    def __init__(
        self,
        store: AuditStore,
        *,
        issuers: Mapping[str, IssuerRef] | None = None,
        scan_budget: int = SCAN_BUDGET,
    ) -> None:
        self._store = store
        self._redis = store.client
        self._keys = store.index_keys
        self._issuers = issuers or {}
        self._budget = scan_budget

    # -- public --------------------------------------------------------------------------------

    def page(self, query: Query | None = None, *, cursor: str | None = None,
             limit: int = 100) -> Page:
        """One page of ``query``, or of the query ``cursor`` continues (the cursor wins)."""
        plan, position = self._plan(query, cursor)
        return self._guard(lambda: self._run(plan, position, limit))

    def wait(
        self,
        query: Query | None = None,
        *,
        cursor: str | None = None,
        limit: int = 100,
        wait_s: float,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        interval_s: float = 0.5,
    ) -> Page:
        """Like :meth:`page` for an oldest-first query, but when nothing new has been stored
        yet, look again every ``interval_s`` for up to ``wait_s``: a bounded long poll.
        ``audit.read`` records do not end the wait (each poll writes one), but are returned."""
        plan, position = self._plan(query, cursor)
        if plan.query.order != "asc":
            raise InvalidRequest("wait needs order=asc", reason="bad_wait")
        deadline = clock() + wait_s
        while True:
            page = self._guard(lambda: self._run(plan, position, limit))
            news = any(e.get("event") != READ_EVENT for e in page.events)
            if news or page.next_cursor is not None or clock() >= deadline:
                return page
            sleep(max(0.0, min(interval_s, deadline - clock())))

    # -- planning ------------------------------------------------------------------------------

    def _plan(self, query: Query | None, cursor: str | None) -> tuple[_Plan, str | None]:
        if cursor is not None:
            c = Cursor.decode(cursor)
            return self._make_plan(c.query, c.index), c.position
        q = query or Query()
        return self._guard(lambda: self._make_plan(q, self._choose(q))), None

    def _make_plan(self, query: Query, index: str) -> _Plan:
        subject, issuer = (resolve_subject(query.subject, self._issuers)
                           if query.subject is not None else (None, None))
        if index == "all":
            key = self._keys.all
        else:
            field = next(f for f, i in FILTER_INDEX.items() if i == index)
            value = subject if field == "subject" else getattr(query, field)
            if not isinstance(value, str):
                raise _bad_cursor("cursor names an index its query does not filter on")
            key = self._keys.index(index, value)
        return _Plan(query, index, key, subject, issuer)

    def _choose(self, query: Query) -> str:
        """The index with the fewest entries among the query's filters (``all`` without)."""
        names = _indexes_of(query)
        if not names:
            return "all"
        keys = [self._make_plan(query, n).key for n in names]
        pipe = self._redis.pipeline(transaction=False)
        for key in keys:
            pipe.xlen(key)
        sizes = pipe.execute()
        return min(zip(names, sizes, strict=True), key=lambda ns: int(ns[1]))[0]

    # -- running -------------------------------------------------------------------------------

    def _run(self, plan: _Plan, position: str | None, limit: int) -> Page:
        q = plan.query
        desc = q.order == "desc"
        lo = str(q.since_ms) if q.since_ms is not None else "-"
        hi = str(q.until_ms) if q.until_ms is not None else "+"
        if position is not None:
            lo, hi = (lo, "(" + position) if desc else ("(" + position, hi)
        events: list[dict[str, Any]] = []
        examined, last, head = 0, position, None
        exhausted = more = False
        while len(events) < limit and examined < self._budget:
            batch = min(self._budget - examined, max(limit - len(events) + 1, 64))
            rows = self._range(plan.key, lo, hi, batch, desc)
            if head is None and rows and desc and position is None and q.until_ms is None:
                head = _text(rows[0][0])
            records = self._resolve([fields for _, fields in rows])
            for (entry_id, _), record in zip(rows, records, strict=True):
                if len(events) == limit:
                    more = True  # an entry beyond the page exists
                    break
                examined += 1
                last = _text(entry_id)
                if record is not None and plan.matches(record):
                    events.append(record)
            if len(rows) < batch:
                exhausted = not more
                break
            lo, hi = (lo, "(" + str(last)) if desc else ("(" + str(last), hi)
        if not exhausted and not more and len(events) == limit:
            exhausted = not self._range(plan.key, lo, hi, 1, desc)  # is the page the last?
        next_cursor = None if exhausted else Cursor(q, plan.index, last).encode()
        return Page(events, next_cursor, self._follow(plan, last, head), examined)

    def _follow(self, plan: _Plan, last: str | None, head: str | None) -> str | None:
        q = plan.query
        if q.until_ms is not None:
            return None
        if q.order == "asc":
            return Cursor(q, plan.index, last).encode()
        if head is None:
            rows = self._range(plan.key, "-", "+", 1, True)
            head = _text(rows[0][0]) if rows else None
        return Cursor(dataclasses.replace(q, order="asc"), plan.index, head).encode()

    def _range(self, key: str, lo: str, hi: str, count: int, desc: bool) -> list[Any]:
        if desc:
            return list(self._redis.xrevrange(key, max=hi, min=lo, count=count) or [])
        return list(self._redis.xrange(key, min=lo, max=hi, count=count) or [])

    def _resolve(self, entries: Sequence[Any]) -> list[dict[str, Any] | None]:
        """The records index entries point at (None where the record is gone)."""
        pointers = [parse_pointer(_field(f, "p")) for f in entries]
        pipe = self._redis.pipeline(transaction=False)
        for p in pointers:
            if p is not None:
                pipe.xrange(self._store.keys.chain(p[0]), min=p[1], max=p[1], count=1)
        replies = iter(pipe.execute() if any(pointers) else [])
        out: list[dict[str, Any] | None] = []
        for p in pointers:
            if p is None:
                out.append(None)
                continue
            rows = next(replies)
            out.append(decode_entry(p[0], rows[0][0], rows[0][1]) if rows else None)
        return out

    @staticmethod
    def _guard(fn: Callable[[], T]) -> T:
        try:
            return fn()
        except redis.RedisError as exc:
            raise StoreUnavailable("the audit log is unavailable", retry_after=1) from exc


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _field(fields: Any, name: str) -> object:
    if not isinstance(fields, dict):
        return None
    return fields.get(name.encode(), fields.get(name))


def issuer_refs(issuers: Iterable[Any]) -> dict[str, IssuerRef]:
    """``{name: IssuerRef}`` from ``settings.issuers``."""
    return {i.name: IssuerRef(url=i.issuer, kind=i.kind) for i in issuers}
