from __future__ import annotations

import io
import json
import time

import fakeredis
import pytest
import redis

from broker.audit import GENESIS, AuditLog, AuditRecord, chain_hash, rfc3339, sha256_hex
from broker.errors import StoreUnavailable


class Clock:
    def __init__(self) -> None:
        self.now = time.time()  # stream ids come from the server clock: stay close to it

    def __call__(self) -> float:
        return self.now


def rec(**kw):
    base = dict(time=rfc3339(0), request_id="r", event="token.exchange", decision="denied",
                reason="token_malformed")
    base.update(kw)
    return AuditRecord(**base)


@pytest.fixture
def log():
    clock = Clock()
    out = io.StringIO()
    a = AuditLog(fakeredis.FakeRedis(), prefix="t:", out=out, clock=clock, writer="w1")
    a.clock, a.out = clock, out  # type: ignore[attr-defined]
    return a


def test_append_chains_records(log):
    first = log.append(rec(request_id="a"))
    second = log.append(rec(request_id="b"))
    assert (first["seq"], first["prev"]) == (1, GENESIS)
    assert (second["seq"], second["prev"]) == (2, first["hash"])
    assert chain_hash(second) == second["hash"]
    tampered = dict(second, reason="issued")
    assert chain_hash(tampered) != second["hash"]
    assert [r["request_id"] for r in log.recent()] == ["b", "a"]
    lines = [json.loads(x)["audit"] for x in log.out.getvalue().splitlines()]
    assert [x["request_id"] for x in lines] == ["a", "b"]


def test_store_failure_goes_to_stdout_and_raises(log, monkeypatch):
    monkeypatch.setattr(log._redis, "xadd", lambda *a, **k: (_ for _ in ()).throw(redis.ConnectionError()))
    with pytest.raises(StoreUnavailable):
        log.append(rec(decision="issued"))
    line = json.loads(log.out.getvalue().splitlines()[-1])["audit"]
    assert line["stored"] is False
    monkeypatch.undo()
    assert log.append(rec())["seq"] == 1  # a failed append does not advance the chain


def test_folding_identical_denials(log):
    key = ("1.2.3.4", "token_malformed", "abc")
    for _ in range(5):
        log.append_denial(rec(), key)
    log.append_denial(rec(reason="other"), ("1.2.3.4", "other", "abc"))
    assert len(log.recent()) == 2
    log.clock.now += 1.5
    log.flush_folds()
    counts = sorted(r["count"] for r in log.recent())
    assert counts == [1, 1, 4]
    log.append_denial(rec(), key)  # a new window starts a new first record
    assert len(log.recent()) == 4


def test_fold_window_not_closed_early(log):
    key = ("ip", "r", "t")
    log.append_denial(rec(), key)
    log.append_denial(rec(), key)
    log.clock.now += 0.5
    log.flush_folds()
    assert len(log.recent()) == 1
    log.flush_folds(force=True)
    assert sum(r["count"] for r in log.recent()) == 2


def test_retention_trims_old_entries():
    clock = Clock()
    client = fakeredis.FakeRedis()
    a = AuditLog(client, prefix="t:", stdout=False, clock=clock, retention_s=3600)
    client.xadd(a.stream, {"r": b"{}"}, id=f"{int((clock.now - 7200) * 1000)}-0")
    a.append(rec())
    assert client.xlen(a.stream) == 1


def test_fingerprint_and_time_format():
    assert sha256_hex("abc").startswith("ba7816bf")
    assert rfc3339(0) == "1970-01-01T00:00:00.000Z"
