"""The access-review report, from the daily counters."""

from __future__ import annotations

import time

import fakeredis
import pytest
import redis

from broker.audit import AuditLog, AuditRecord, rfc3339
from broker.auditindex import DAY_S, IndexKeys, day_of
from broker.auditreport import MAX_DAYS, build_report, days_between
from broker.errors import StoreUnavailable


def rec(**kw) -> AuditRecord:
    base = dict(time=rfc3339(time.time()), request_id="r", event="token.exchange",
                decision="issued", reason="issued", issuer="https://iss",
                subject="system:serviceaccount:ns:a", subject_verified=True)
    base.update(kw)
    return AuditRecord(**base)


def traffic(now: float, client=None):
    client = client or fakeredis.FakeRedis()
    log = AuditLog(client, prefix="r:", stdout=False, writer="w", clock=lambda: now)
    for _ in range(3):
        log.append(rec(role="reader", service_account="reader@p.iam"))
    log.append(rec(role="writer", service_account="writer@p.iam"))
    log.append(rec(role="reader2", service_account="reader@p.iam"))
    log.append(rec(decision="denied", reason="no_role", subject="system:serviceaccount:x:y",
                   count=5))
    log.append(rec(decision="denied", reason="token_expired", subject_verified=False,
                   subject="forged", issuer="https://evil"))
    log.append(rec(decision="error", reason="iam_unavailable", role="writer"))
    log.append(rec(event="audit.read", reason="read"))  # not counted
    return client


def test_report_counts_issuance_refusals_and_unused_roles():
    now = time.time()
    client = traffic(now)
    report = build_report(client, IndexKeys("r:"), since=now - 86400, until=now,
                          roles=["reader", "writer", "reader2", "batch", "idle"], top=10)
    assert report["totals"] == {"issued": 5, "denied": 6, "error": 1}
    assert report["issuance"] == [
        {"role": "reader", "service_account": "reader@p.iam", "count": 3},
        {"role": "reader2", "service_account": "reader@p.iam", "count": 1},
        {"role": "writer", "service_account": "writer@p.iam", "count": 1}]
    assert report["service_accounts"] == [
        {"service_account": "reader@p.iam", "count": 4, "roles": ["reader", "reader2"]},
        {"service_account": "writer@p.iam", "count": 1, "roles": ["writer"]}]
    assert report["refusals"] == [
        {"decision": "denied", "reason": "no_role", "count": 5},
        {"decision": "denied", "reason": "token_expired", "count": 1},
        {"decision": "error", "reason": "iam_unavailable", "count": 1}]
    assert report["refused_subjects"][0] == {
        "issuer": "https://iss", "subject": "system:serviceaccount:x:y",
        "subject_verified": True, "count": 5}
    assert report["refused_subjects_distinct"] == 3
    assert report["roles_never_used"] == ["batch", "idle"] and report["roles_in_table"] == 5
    assert report["days"] == 2 and report["to_day"] == day_of(now)


def test_days_outside_the_window_do_not_count_and_top_limits():
    now = time.time()
    client = traffic(now - 3 * DAY_S)
    traffic(now, client)
    recent = build_report(client, IndexKeys("r:"), since=now - 1, until=now, roles=[], top=1)
    assert recent["days"] == 1 and recent["totals"]["issued"] == 5
    assert len(recent["refused_subjects"]) == 1 and recent["refused_subjects_distinct"] == 3
    both = build_report(client, IndexKeys("r:"), since=now - 4 * DAY_S, until=now, roles=[])
    assert both["totals"]["issued"] == 10
    assert not any(k.startswith(b"r:{audit:stats}:tmp") for k in client.keys("*"))


def test_days_between():
    assert days_between(0, 0) == ["1970-01-01"]
    assert days_between(DAY_S - 1, DAY_S) == ["1970-01-01", "1970-01-02"]
    assert len(days_between(0, 1000 * DAY_S)) == MAX_DAYS


def test_malformed_counters_are_ignored():
    client = fakeredis.FakeRedis()
    now = time.time()
    client.hset(IndexKeys("r:").stats(day_of(now)), mapping={
        "garbage": 3, "[]": 1, '["issued","b"]': 5, '["issued","b","sa"]': 2})
    report = build_report(client, IndexKeys("r:"), since=now, until=now, roles=["a", "b"])
    assert report["totals"]["issued"] == 2 and report["roles_never_used"] == ["a"]


def test_redis_down():
    client = fakeredis.FakeRedis()
    client.pipeline = lambda *a, **k: (_ for _ in ()).throw(redis.ConnectionError())
    with pytest.raises(StoreUnavailable):
        build_report(client, IndexKeys("r:"), since=0, until=1, roles=[])
