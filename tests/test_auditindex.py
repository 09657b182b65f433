"""Index entries and counters go with each record, in the same transaction: exactly once, not
at all when the record is not stored, with bounded expiry bookkeeping; retention trims them."""

from __future__ import annotations

import time

import fakeredis
import pytest
import redis

from broker.audit import AuditLog, AuditRecord, rfc3339
from broker.auditindex import (
    DAY_S,
    MAX_VALUE_CHARS,
    IndexKeys,
    counter_updates,
    day_of,
    parse_pointer,
    stat_field,
)
from broker.errors import StoreUnavailable
from broker.signing import SigningKey

KEY = SigningKey.generate()
RETENTION = 7 * DAY_S


def rec(**kw) -> AuditRecord:
    base = dict(time=rfc3339(time.time()), request_id="r", event="token.exchange",
                decision="issued", reason="issued", issuer="https://iss",
                subject="system:serviceaccount:ns:sa", role="reader",
                service_account="Reader@p.iam.gserviceaccount.com", subject_verified=True)
    base.update(kw)
    return AuditRecord(**base)


def make_log(client=None, **kw):
    kw.setdefault("retention_s", RETENTION)
    return AuditLog(client or fakeredis.FakeRedis(), prefix="i:", stdout=False,
                    writer=kw.pop("writer", "w1"), **kw)


def entries(client, key):
    return [parse_pointer(f[b"p"]) for _, f in client.xrange(key)]


def index_keys(client):
    return sorted(k.decode() for k in client.keys("i:audit:idx:*"))


def test_a_record_is_indexed_under_each_of_its_values():
    log = make_log()
    body = log.append(rec())
    keys = IndexKeys("i:")
    where = tuple(body["id"].split("/"))
    expected = [keys.all, keys.index("subject", "system:serviceaccount:ns:sa"),
                keys.index("role", "reader"),
                keys.index("sa", "reader@p.iam.gserviceaccount.com")]  # case folded
    # decision=issued and event=token.exchange are UNINDEXED: queries walk `all` for them.
    assert index_keys(log._redis) == sorted(expected)
    for key in expected:
        assert entries(log._redis, key) == [where]
    denied = log.append(rec(decision="denied", reason="token_expired"))
    assert entries(log._redis, keys.index("decision", "denied")) == [
        tuple(denied["id"].split("/"))
    ]


def test_absent_and_oversized_values_are_not_indexed():
    log = make_log()
    log.append(rec(role=None, service_account=None, subject="x" * (MAX_VALUE_CHARS + 1),
                   decision="denied", reason="token_malformed"))
    names = {k.split(":")[3] for k in index_keys(log._redis) if k.count(":") > 3}
    assert names == {"decision"}  # event=token.exchange is UNINDEXED (walks `all`)


def test_checkpoints_are_in_the_all_and_event_indexes():
    log = make_log(signer=KEY, checkpoint_every=2)
    log.append(rec())
    log.append(rec())  # + checkpoint
    keys = IndexKeys("i:")
    assert len(entries(log._redis, keys.all)) == 3
    assert len(entries(log._redis, keys.index("event", "audit.checkpoint"))) == 1
    assert entries(log._redis, keys.index("decision", "issued")) == []  # UNINDEXED


def test_one_transaction_per_append(monkeypatch):
    client = fakeredis.FakeRedis()
    log = make_log(client)
    log.append(rec())  # registration, first expiries
    calls, calls_args = [], []
    real = log.store.run_batch

    def spy(batch, conditions=()):
        calls.append([str(c[0]).upper() for c in batch.commands])
        calls_args.append(list(batch.commands))
        return real(batch, conditions)

    monkeypatch.setattr(log.store, "run_batch", spy)
    log.append(rec(request_id="2"))
    assert len(calls) == 1  # one round trip: one atomic script call
    names = calls[0]
    # chain + all/subject/role/sa indexes + 1 counter (issued and token.exchange are
    # UNINDEXED); expiries were set by the first append today
    [xadds] = [c for c in calls_args[0] if c[0] == "XADDS"]
    assert names.count("XADD") == 1 and len(xadds[4:]) == 4 and names.count("HINCRBY") == 1
    assert "PEXPIRE" not in names and "EXPIREAT" not in names and "HSET" not in names


def test_indexes_and_counters_expire_after_the_retention_period():
    log = make_log()
    log.append(rec(decision="denied", reason="no_role"))
    client = log._redis
    for key in index_keys(client):
        assert RETENTION < client.pttl(key) / 1000 <= RETENTION + DAY_S
    keys = IndexKeys("i:")
    day = day_of(time.time())
    for key in (keys.stats(day), keys.refused(day)):
        assert RETENTION + DAY_S <= client.ttl(key) <= RETENTION + 2 * DAY_S


def test_counters():
    log = make_log()
    log.append(rec())
    log.append(rec(count=4, decision="denied", reason="no_role", role=None,
                   service_account=None))
    log.append(rec(event="audit.read", reason="read"))  # not a token request: not counted
    keys = IndexKeys("i:")
    day = day_of(time.time())
    stats = {k.decode(): int(v) for k, v in log._redis.hgetall(keys.stats(day)).items()}
    assert stats == {
        stat_field("issued", "reader", "Reader@p.iam.gserviceaccount.com"): 1,
        stat_field("refused", "denied", "no_role"): 4,
    }
    refused = log._redis.zrange(keys.refused(day), 0, -1, withscores=True)
    assert refused == [(stat_field("https://iss", "system:serviceaccount:ns:sa", True).encode(),
                        4.0)]


def test_counter_updates_of_odd_records():
    assert counter_updates({"event": "roles.changed"}) == ({}, None, 0)
    fields, member, n = counter_updates({"event": "token.exchange", "decision": "error",
                                         "reason": "iam_unavailable", "count": "x"})
    assert n == 1 and member == stat_field(None, None, False)
    assert fields[stat_field("refused", "error", "iam_unavailable")] == 1


def break_writes(log, monkeypatch, *, stored):
    real = log.store.run_batch

    def fail(batch, conditions=()):
        if stored:
            real(batch, conditions)
        raise redis.TimeoutError("lost")

    monkeypatch.setattr(log.store, "run_batch", fail)


def test_a_record_not_stored_leaves_no_index_entry_and_expiries_are_set_again(monkeypatch):
    log = make_log()
    break_writes(log, monkeypatch, stored=False)
    with pytest.raises(StoreUnavailable):
        log.append(rec())
    assert index_keys(log._redis) == []
    monkeypatch.undo()
    log.append(rec())
    keys = index_keys(log._redis)
    assert len(keys) == 4 and all(log._redis.pttl(k) > 0 for k in keys)
    assert all(len(entries(log._redis, k)) == 1 for k in keys)


def test_a_lost_reply_is_indexed_once(monkeypatch):
    log = make_log()
    break_writes(log, monkeypatch, stored=True)
    with pytest.raises(StoreUnavailable):
        log.append(rec(request_id="lost"))
    monkeypatch.undo()
    log.append(rec(request_id="next"))
    all_key = IndexKeys("i:").all
    pointed = entries(log._redis, all_key)
    assert len(pointed) == 2 and len(set(pointed)) == 2
    assert list(log.store.writers()) == ["w1"]  # registered in the transaction that landed


def test_entry_ids_increase_even_when_the_clock_steps_back():
    now = [time.time()]
    log = AuditLog(fakeredis.FakeRedis(), prefix="i:", stdout=False, writer="w",
                   clock=lambda: now[0])
    ids = [log.append(rec())["id"]]
    now[0] -= 10
    ids += [log.append(rec())["id"], log.append(rec())["id"]]
    pos = [tuple(int(x) for x in i.split("/")[1].split("-")) for i in ids]
    assert pos == sorted(pos) and len(set(pos)) == 3 and pos[1][0] == pos[0][0]


def test_retention_trims_the_busy_indexes():
    log = make_log(retention_s=60)
    for _ in range(3):
        log.append(rec())
    keys = IndexKeys("i:")
    log.store.apply_retention(now=time.time() + 3600, retention_s=60)
    assert log._redis.xlen(keys.all) == 0
    assert log._redis.xlen(keys.index("decision", "issued")) == 0
    log.append(rec())
    assert log._redis.xlen(keys.all) == 1
