"""Audit queries through the indexes: exactly the matching records, each once, in order, with
cursors that stay true while writes go on; the planner; bounded work; long polls."""

from __future__ import annotations

import random
import time

import fakeredis
import pytest
import redis

from broker.audit import AuditLog, AuditRecord, rfc3339
from broker.auditquery import AuditReader, Cursor, IssuerRef, Query, resolve_subject
from broker.errors import InvalidRequest, StoreUnavailable

ISSUERS = {"prod": IssuerRef("https://prod.example", "kubernetes"),
           "corp": IssuerRef("https://corp.example", "oidc")}
SUBJECTS = [("https://prod.example", "system:serviceaccount:flux:source"),
            ("https://prod.example", "system:serviceaccount:team-a:runner"),
            ("https://other.example", "system:serviceaccount:flux:source"),
            ("https://corp.example", "ci@corp.example")]
ROLES = ["reader", "writer", None]
SAS = ["Reader@p.iam.gserviceaccount.com", "writer@p.iam.gserviceaccount.com", None]


def record(rng: random.Random, i: int) -> AuditRecord:
    issuer, subject = rng.choice(SUBJECTS)
    k = rng.randrange(3)
    decision = rng.choice(["issued", "issued", "denied", "error"])
    return AuditRecord(
        time=rfc3339(time.time()), request_id=f"r{i}", event=rng.choice(
            ["token.exchange", "token.exchange", "audit.read"]),
        decision=decision, reason="issued" if decision == "issued" else "no_role",
        issuer=issuer, subject=subject, role=ROLES[k], service_account=SAS[k],
        subject_verified=True)


class Log:
    """Three writers on one Redis, appending in turn; ``truth`` is every record in commit
    order (what the indexes should give back)."""

    def __init__(self, n: int = 0, seed: int = 7) -> None:
        self.redis = fakeredis.FakeRedis()
        self.logs = [AuditLog(self.redis, prefix="q:", stdout=False, writer=w)
                     for w in ("wa", "wb", "wc")]
        self.rng = random.Random(seed)
        self.truth: list[dict] = []
        self.n = 0
        self.add(n)
        self.reader = AuditReader(self.logs[0].store, issuers=ISSUERS)

    def add(self, n: int) -> None:
        for _ in range(n):
            self.truth.append(self.logs[self.n % 3].append(record(self.rng, self.n)))
            self.n += 1

    def all_pages(self, query=None, *, limit=7, cursor=None, between=None, reader=None):
        reader = reader or self.reader
        out, pages = [], 0
        while True:
            page = reader.page(query, cursor=cursor, limit=limit)
            pages += 1
            assert len(page.events) <= limit
            out.extend(page.events)
            if between is not None:
                between()
            cursor = page.next_cursor
            if cursor is None:
                self.last_page = page
                return out, pages


def matches(q: Query, r: dict) -> bool:
    if q.subject is not None:
        sub, iss = resolve_subject(q.subject, ISSUERS)
        if r["subject"] != sub or (iss is not None and r["issuer"] != iss):
            return False
    if q.service_account is not None and (r["service_account"] or "").lower() != \
            q.service_account.lower():
        return False
    return all(getattr(q, f) is None or r[f] == getattr(q, f) for f in ("role", "decision", "event"))


QUERIES = [
    Query(),
    Query(subject="system:serviceaccount:flux:source"),  # under both issuers
    Query(subject="prod/flux/source"),  # principal form: one issuer
    Query(subject="corp/ci@corp.example"),
    Query(role="reader"),
    Query(service_account="READER@p.iam.gserviceaccount.com"),  # case-insensitive
    Query(decision="denied"),
    Query(event="audit.read"),
    Query(subject="prod/team-a/runner", decision="issued", role="writer"),
    Query(role="nobody"),
]


@pytest.fixture(scope="module")
def log():
    return Log(240)


@pytest.mark.parametrize("q", QUERIES, ids=lambda q: str(q.filters) or "all")
@pytest.mark.parametrize("order", ["desc", "asc"])
def test_filters_return_exactly_the_matching_records_in_order(log, q, order):
    q = Query(**{**q.to_dict(), "order": order})
    got, _ = log.all_pages(q, limit=7)
    want = [r for r in log.truth if matches(q, r)]
    if order == "desc":
        want.reverse()
    assert [r["id"] for r in got] == [r["id"] for r in want]
    assert len({r["id"] for r in got}) == len(got)  # none twice


def test_pages_are_full_and_the_last_one_is_not_empty(log):
    got, pages = log.all_pages(Query(), limit=24)
    assert len(got) == 240 and pages == 10


def test_time_window_uses_when_records_were_stored():
    lg = Log(10)
    mid = int(time.time() * 1000) + 5
    time.sleep(0.02)
    lg.add(10)
    newer, _ = lg.all_pages(Query(since_ms=mid))
    older, _ = lg.all_pages(Query(until_ms=mid, order="asc"))
    assert [r["id"] for r in older] == [r["id"] for r in lg.truth[:10]]
    assert [r["id"] for r in newer] == [r["id"] for r in reversed(lg.truth[10:])]
    assert lg.all_pages(Query(since_ms=mid + 10**7))[0] == []


@pytest.mark.parametrize("q", [Query(), Query(decision="denied"),
                               Query(subject="prod/flux/source", decision="issued")],
                         ids=["all", "decision", "subject+decision"])
def test_newest_first_paging_is_stable_while_writes_go_on(q):
    lg = Log(90)
    before = [r["id"] for r in lg.truth if matches(q, r)]
    got, _ = lg.all_pages(q, limit=5, between=lambda: lg.add(4))
    # Records stored meanwhile land above the first page: the walk down sees exactly the
    # records that were there when it started, each once.
    assert [r["id"] for r in got] == list(reversed(before))


@pytest.mark.parametrize("q", [Query(order="asc"), Query(order="asc", role="reader")],
                         ids=["all", "role"])
def test_oldest_first_paging_picks_up_what_is_stored_meanwhile(q):
    lg = Log(60)
    calls = [0]

    def write_some():
        calls[0] += 1
        if calls[0] <= 10:
            lg.add(7)

    got, _ = lg.all_pages(q, limit=6, between=write_some)
    # Caught up (maybe before the writes ended): the follow cursor goes on from there.
    while calls[0] < 10:
        write_some()
    rest, _ = lg.all_pages(cursor=lg.last_page.follow_cursor, limit=6)
    want = [r["id"] for r in lg.truth if matches(q, r)]
    assert [r["id"] for r in got + rest] == want and len(lg.truth) == 130


def test_follow_cursor_gives_exactly_what_was_stored_after_the_page():
    lg = Log(30)
    q = Query(decision="issued")
    first = lg.reader.page(q, limit=5)
    assert first.follow_cursor is not None
    assert Cursor.decode(first.follow_cursor).query.order == "asc"
    lg.add(40)
    followed, _ = lg.all_pages(cursor=first.follow_cursor, limit=6)
    assert [r["id"] for r in followed] == [r["id"] for r in lg.truth[30:] if matches(q, r)]
    # An oldest-first page's follow cursor continues after its last record, even at the end.
    page = lg.reader.page(cursor=first.follow_cursor, limit=1000)
    assert page.next_cursor is None and page.follow_cursor is not None
    lg.add(5)
    later = lg.reader.page(cursor=page.follow_cursor, limit=1000).events
    assert [r["id"] for r in later] == [r["id"] for r in lg.truth[70:] if matches(q, r)]


def test_no_follow_cursor_for_a_window_that_ends():
    lg = Log(3)
    assert lg.reader.page(Query(until_ms=int(time.time() * 1000) + 1000)).follow_cursor is None


def test_planner_walks_the_smallest_index(log):
    q = Query(subject="corp/ci@corp.example", decision="issued")
    page = log.reader.page(q, limit=1)
    assert Cursor.decode(page.next_cursor).index == "subject"
    page = log.reader.page(Query(role="writer", event="audit.read"), limit=1)
    sizes = {"role": sum(r["role"] == "writer" for r in log.truth),
             "event": sum(r["event"] == "audit.read" for r in log.truth)}
    assert Cursor.decode(page.next_cursor).index == min(sizes, key=sizes.get)


def test_a_filter_nobody_matches_costs_nothing(log):
    page = log.reader.page(Query(subject="system:serviceaccount:x:y", decision="issued"))
    assert page.events == [] and page.next_cursor is None and page.examined == 0


def test_each_page_examines_a_bounded_number_of_entries(log):
    small = AuditReader(log.logs[0].store, issuers=ISSUERS, scan_budget=10)
    q = Query(subject="corp/ci@corp.example", decision="error", role="reader")
    got, cursor, pages = [], None, 0
    while True:
        page = small.page(q, cursor=cursor, limit=50)
        assert page.examined <= 10
        got.extend(page.events)
        pages += 1
        cursor = page.next_cursor
        if cursor is None:
            break
    want = [r["id"] for r in reversed(log.truth) if matches(q, r)]
    assert [r["id"] for r in got] == want
    assert pages >= sum(r["subject"] == "ci@corp.example" for r in log.truth) // 10


def test_records_gone_from_a_chain_are_skipped():
    lg = Log(12)
    victim = lg.truth[5]
    writer, entry = victim["id"].split("/")
    lg.redis.xdel(lg.logs[0].store.keys.chain(writer), entry)
    got, _ = lg.all_pages(limit=4)
    assert [r["id"] for r in got] == [r["id"] for r in reversed(lg.truth) if r is not victim]


@pytest.mark.parametrize("bad", [
    "!!!",
    "eyJ2IjoyfQ",  # {"v":2}
    Cursor(Query(), "all", "1-0").encode()[:-3],
    Cursor(Query(), "role", None).encode(),  # an index its query does not filter on
    Cursor(Query(role="r"), "all", "not-an-id").encode(),
])
def test_bad_cursors_are_invalid_requests(log, bad):
    with pytest.raises(InvalidRequest) as info:
        log.reader.page(cursor=bad)
    assert info.value.reason == "bad_cursor"


def test_cursor_round_trip_and_query_validation():
    c = Cursor(Query(since_ms=5, role="r", order="asc"), "role", "7-1")
    assert Cursor.decode(c.encode()) == c
    for bad in ({"order": "sideways"}, {"decision": "maybe"}, {"since_ms": -1},
                {"role": ""}, {"role": "x" * 600}):
        with pytest.raises(ValueError):
            Query(**bad)
    with pytest.raises(ValueError):
        Query.from_dict({"nope": 1})


@pytest.mark.parametrize(("value", "expected"), [
    ("system:serviceaccount:flux:source", ("system:serviceaccount:flux:source", None)),
    ("prod/flux/source", ("system:serviceaccount:flux:source", "https://prod.example")),
    ("corp/ci@corp.example", ("ci@corp.example", "https://corp.example")),
    ("prod/only-namespace", ("prod/only-namespace", None)),
    ("unknown/flux/source", ("unknown/flux/source", None)),
    ("ci@corp.example", ("ci@corp.example", None)),
])
def test_subject_forms(value, expected):
    assert resolve_subject(value, ISSUERS) == expected


def test_wait_returns_as_soon_as_something_is_stored():
    lg = Log(3)
    start = lg.reader.page(Query(order="asc"), limit=100)
    assert start.next_cursor is None
    sleeps = []

    def sleep(s):
        sleeps.append(s)
        if len(sleeps) == 2:
            lg.add(1)

    page = lg.reader.wait(cursor=start.follow_cursor, wait_s=25, sleep=sleep,
                          clock=lambda: 100.0 + len(sleeps))
    assert [r["id"] for r in page.events] == [lg.truth[-1]["id"]] and len(sleeps) == 2


def test_wait_is_bounded_and_audit_reads_do_not_end_it():
    lg = Log(2)
    start = lg.reader.page(Query(order="asc"), limit=100)
    lg.logs[0].append(AuditRecord(time=rfc3339(time.time()), request_id="x", event="audit.read",
                                  decision="issued", reason="read"))
    now = [0.0]

    def sleep(s):
        now[0] += s

    page = lg.reader.wait(cursor=start.follow_cursor, wait_s=3, sleep=sleep,
                          clock=lambda: now[0])
    assert [r["event"] for r in page.events] == ["audit.read"]  # returned, after the wait
    assert now[0] == pytest.approx(3.0)


def test_wait_needs_oldest_first(log):
    with pytest.raises(InvalidRequest) as info:
        log.reader.wait(Query(), wait_s=1)
    assert info.value.reason == "bad_wait"


def test_redis_down_is_store_unavailable(log, monkeypatch):
    def broken(*a, **k):
        raise redis.ConnectionError("down")

    reader = AuditReader(log.logs[0].store)
    monkeypatch.setattr(reader, "_range", broken)
    with pytest.raises(StoreUnavailable):
        reader.page(Query())
