"""The audit writer: chaining, checkpoints, stdout witness, lost replies, folding, retention."""

from __future__ import annotations

import io
import json
import time

import fakeredis
import orjson
import pytest
import redis

from broker import audit as audit_module
from broker.audit import (
    GENESIS,
    AuditLog,
    AuditRecord,
    ConditionsFailed,
    chain_hash,
    record_body,
    rfc3339,
    sha256_hex,
)
from broker.auditchain import (
    CHECKPOINT_EVENT,
    canonical_json,
    checkpoint_message_of,
    with_field,
)
from broker.auditstore import LiveVerifier
from broker.errors import StoreUnavailable
from broker.redisbatch import Condition
from broker.signing import KeyRing, SigningKey
from tests.support import FakeClock

KEY = SigningKey.generate()
RING = KeyRing([KEY.public])


Clock = FakeClock  # stream ids and key ages: stay close to the real clock


def rec(**kw):
    base = dict(time=rfc3339(0), request_id="r", event="token.exchange", decision="denied",
                reason="token_malformed")
    base.update(kw)
    return AuditRecord(**base)


def make_log(client=None, **kw):
    clock = Clock()
    out = io.StringIO()
    kw.setdefault("signer", KEY)
    a = AuditLog(client or fakeredis.FakeRedis(), prefix="t:", out=out, clock=clock,
                 writer=kw.pop("writer", "w1"), **kw)
    a.clock, a.out = clock, out  # type: ignore[attr-defined]
    return a


def break_writes(a, monkeypatch, *, stored: bool = False, error=redis.ConnectionError):
    """Make every append's transaction fail (after Redis took it, when ``stored``: a lost
    reply)."""
    real = a.store.run_batch

    def fail(batch, conditions=()):
        if stored:
            real(batch, conditions)
        raise error("reply lost" if stored else "down")

    monkeypatch.setattr(a.store, "run_batch", fail)


def stdout_records(a):
    return [json.loads(x)["audit"] for x in a.out.getvalue().splitlines()]


def verify(a, **kw):
    return LiveVerifier(a.store, RING, retention_s=None, clock=a.clock).verify(full=True, **kw)


@pytest.fixture
def log():
    return make_log(checkpoint_every=1000)


def test_append_chains_records(log):
    first = log.append(rec(request_id="a"))
    second = log.append(rec(request_id="b"))
    assert (first["seq"], first["prev"], first["writer"]) == (1, GENESIS, "w1")
    assert (second["seq"], second["prev"]) == (2, first["hash"])
    assert chain_hash(second) == second["hash"]
    assert chain_hash(dict(second, reason="issued")) != second["hash"]
    assert second["id"].startswith("w1/")
    assert [r["request_id"] for r in log.recent()] == ["b", "a"]
    assert [x["request_id"] for x in stdout_records(log)] == ["a", "b"]
    assert [x["id"] for x in stdout_records(log)] == [first["id"], second["id"]]


def test_stored_and_witnessed_forms_are_the_record(log):
    """The record is encoded once (canonical JSON plus hash); Redis and stdout get exactly
    the record that append returned."""
    stored = log.append(rec(request_id="a", scopes=("s1", "s2"), user_agent='q"\\ü'))
    as_json = orjson.loads(orjson.dumps(stored))  # scopes: a tuple in, a JSON list out
    [(_, in_redis)] = log.store.tail("w1", 1)
    assert in_redis == as_json
    assert stdout_records(log)[-1] == as_json
    assert chain_hash(in_redis) == stored["hash"]


def test_record_body_is_the_records_dict():
    fields = dict(time="t", request_id="r", event="token.exchange", decision="issued",
                  reason="issued", role="x", scopes=("s",), latency_ms=1.5)
    assert record_body(**fields) == AuditRecord(**fields).to_dict()
    assert list(record_body(**fields)) == list(AuditRecord(**fields).to_dict())  # same order
    with pytest.raises(TypeError, match=r"unknown \['token'\], missing \[\]"):
        record_body(**fields, token="secret")
    with pytest.raises(TypeError, match=r"missing \['reason'\]"):
        record_body(**{k: v for k, v in fields.items() if k != "reason"})


def test_append_takes_a_record_body(log):
    stored = log.append(record_body(time="t", request_id="b1", event="token.exchange",
                                    decision="issued", reason="issued"))
    assert stored["seq"] == 1 and stored["request_id"] == "b1"
    assert chain_hash(stored) == stored["hash"]
    assert stdout_records(log)[-1]["request_id"] == "b1"


def test_with_field_appends_to_a_json_object():
    encoded = orjson.dumps({"a": 1, "b": "x"}, option=orjson.OPT_SORT_KEYS)
    assert orjson.loads(with_field(encoded, "hash", 'h"1')) == {"a": 1, "b": "x", "hash": 'h"1'}
    assert canonical_json({"b": 1, "a": 2, "id": "x", "hash": "h", "stored": False}) == (
        b'{"a":2,"b":1}'
    )
    with pytest.raises(ValueError):
        with_field(b"{}", "hash", "h")
    with pytest.raises(ValueError):
        with_field(b"[1]", "hash", "h")


def test_chain_keys_share_a_hash_tag_and_writer_is_registered(log):
    log.append(rec())
    keys = log.store.keys
    assert keys.chain("w1") == "t:{audit:w1}:chain" and keys.sealed("w1") == "t:{audit:w1}:sealed"
    assert list(log.store.writers()) == ["w1"]


def test_default_writer_ids_are_unique_and_tag_safe():
    a, b = AuditLog(fakeredis.FakeRedis()), AuditLog(fakeredis.FakeRedis())
    assert a.writer != b.writer
    assert "{" not in a.writer and "}" not in a.writer and "/" not in a.writer


def test_checkpoint_every_n_records_rides_in_the_same_round_trip():
    a = make_log(checkpoint_every=3)
    for i in range(7):
        a.append(rec(request_id=str(i)))
    rows = a.recent(100, checkpoints=True)
    events = [r["event"] for r in reversed(rows)]
    assert events == ["token.exchange"] * 3 + [CHECKPOINT_EVENT] + ["token.exchange"] * 3 + [
        CHECKPOINT_EVENT] + ["token.exchange"]
    cp = rows[1]
    assert cp["details"]["key_id"] == KEY.key_id and cp["details"]["final"] is False
    assert cp["details"]["records"] == 3 and cp["decision"] is None
    assert KEY.public.verify(checkpoint_message_of(cp), cp["details"]["signature"])
    sealed = a.store.sealed("w1")
    assert sealed["seq"] == cp["seq"] and sealed["signature"] == cp["details"]["signature"]
    # Checkpoints are witnessed on stdout as well.
    assert sum(r["event"] == CHECKPOINT_EVENT for r in stdout_records(a)) == 2
    report = verify(a)
    assert report.ok and report.checked == 9
    assert report.chains[0].sealed_seq == 8 and report.chains[0].unsealed == 1


def test_tick_seals_a_head_that_waited_five_seconds(log):
    log.tick()
    assert log.recent(10, checkpoints=True) == []  # nothing to seal: no checkpoint when idle
    log.append(rec())
    log.clock.now += 4.9
    log.tick()
    assert len(log.recent(10, checkpoints=True)) == 1
    log.clock.now += 0.2
    log.tick()
    rows = log.recent(10, checkpoints=True)
    assert rows[0]["event"] == CHECKPOINT_EVENT
    log.clock.now += 10
    log.tick()
    assert len(log.recent(10, checkpoints=True)) == 2  # still nothing new to seal


def test_close_writes_a_final_checkpoint_and_later_records_start_a_new_writer(log):
    log.append(rec())
    log.close()
    final = log.recent(1, checkpoints=True)[0]
    assert final["details"]["final"] is True and final["reason"] == "final"
    assert log.writer != "w1"
    log.append(rec())
    assert sorted(log.store.writers()) == sorted(["w1", log.writer])
    report = verify(log)
    assert report.ok
    assert {c.writer: c.final for c in report.chains}["w1"] is True


def test_close_without_records_writes_nothing(log):
    log.close()
    assert log.store.writers() == {}


def test_no_signer_means_no_checkpoints():
    a = make_log(signer=None, checkpoint_every=1)
    a.append(rec())
    a.close()
    assert [r["event"] for r in a.recent(10, checkpoints=True)] == ["token.exchange"]


def test_store_failure_goes_to_stdout_and_raises(log, monkeypatch):
    break_writes(log, monkeypatch)
    with pytest.raises(StoreUnavailable):
        log.append(rec(decision="issued"))
    line = stdout_records(log)[-1]
    assert line["stored"] is False and line["seq"] == 1
    monkeypatch.undo()
    assert log.append(rec())["seq"] == 1  # a failed append does not advance the chain
    assert verify(log).ok


def test_lost_reply_is_recovered_from_the_stream(log, monkeypatch):
    """Redis stored the record but the reply was lost: the chain must not fork."""
    break_writes(log, monkeypatch, stored=True, error=redis.TimeoutError)
    with pytest.raises(StoreUnavailable):
        log.append(rec(request_id="lost"))
    monkeypatch.undo()
    second = log.append(rec(request_id="next"))
    assert second["seq"] == 2
    lines = stdout_records(log)
    # stdout says first not stored, then (once learnt) stored, with its id.
    assert [(x["request_id"], x.get("stored", True)) for x in lines] == [
        ("lost", False), ("lost", True), ("next", True)]
    log.close()
    assert verify(log).ok


def test_recovery_read_failure_keeps_failing_closed(log, monkeypatch):
    break_writes(log, monkeypatch)
    with pytest.raises(StoreUnavailable):
        log.append(rec())
    monkeypatch.setattr(log._redis, "xrevrange", lambda *a, **k: (_ for _ in ()).throw(redis.ConnectionError()))
    with pytest.raises(StoreUnavailable):
        log.append(rec(request_id="second"))
    assert stdout_records(log)[-1]["stored"] is False


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


def test_a_folded_record_names_the_repeats_request_ids(log, monkeypatch):
    monkeypatch.setattr(audit_module, "FOLDED_IDS_MAX", 3)
    key = ("ip", "r", "t")
    for i in range(6):
        log.append_denial(rec(request_id=f"req-{i}"), key)
        log.clock.now += 0.1
    log.clock.now += 1
    log.flush_folds()
    first, folded = sorted(log.recent(), key=lambda r: r["seq"])
    assert (first["request_id"], first["count"]) == ("req-0", 1)
    assert (folded["request_id"], folded["count"]) == ("req-1", 5)
    assert folded["details"] == {"request_ids": ["req-1", "req-2", "req-3"], "more": 2}
    assert folded["time"] > first["time"]


def test_fold_window_not_closed_early(log):
    key = ("ip", "r", "t")
    log.append_denial(rec(), key)
    log.append_denial(rec(), key)
    log.clock.now += 0.5
    log.flush_folds()
    assert len(log.recent()) == 1
    log.close()  # pending folds are written before the final checkpoint
    assert sum(r["count"] for r in log.recent()) == 2
    assert log.recent(1, checkpoints=True)[0]["details"]["final"] is True


def test_retention_trims_at_checkpoint_boundaries_and_what_remains_verifies():
    client = fakeredis.FakeRedis()
    a = make_log(client, checkpoint_every=3, retention_s=3600)
    for i in range(8):  # seq 1-3, cp 4, 5-7, cp 8, 9 (+ unsealed 10)
        a.append(rec(request_id=str(i)))
    # Make the first 6 stream entries look two hours old (stream ids are the storing time).
    key = a.chain_key
    rows = client.xrange(key)
    old = int((a.clock.now - 7200) * 1000)
    client.delete(key)
    for i, (_, fields) in enumerate(rows):
        body = json.loads(fields[b"r"])
        client.xadd(key, {"r": json.dumps(body)}, id=f"{old + i}-0" if i < 6 else f"{old + 10**7 + i}-0")
    assert a.apply_retention() > 0
    remaining = [json.loads(f[b"r"])["seq"] for _, f in client.xrange(key)]
    assert remaining[0] == 4 and remaining == list(range(4, 11))  # starts at the checkpoint
    # The trimmed chain still verifies when the first checkpoint is old enough to be retention's.
    ring_verifier = LiveVerifier(a.store, RING, retention_s=3600, clock=lambda: a.clock.now + 7200)
    assert ring_verifier.verify().ok
    # ... and not when it claims retention removed records that are younger than the period.
    young = LiveVerifier(a.store, RING, retention_s=30 * 86400, clock=lambda: a.clock.now)
    report = young.verify()
    assert not report.ok and report.first_bad.problem == "missing"


def test_retention_runs_once_per_minute_across_processes():
    client = fakeredis.FakeRedis()
    a, b = make_log(client, writer="a"), make_log(client, writer="b")
    a.append(rec())
    assert a.store.try_lock_retention("a", 60) is True
    assert b.apply_retention() == 0  # the other process holds this minute


def test_retention_drops_a_stopped_writers_chain_once_all_of_it_is_old():
    client = fakeredis.FakeRedis()
    a = make_log(client, retention_s=60, writer="old")
    a.append(rec())
    a.close()
    live = make_log(client, retention_s=60, writer="live")
    live.append(rec())
    assert live.store.apply_retention(now=time.time() + 3600, retention_s=60) == 2
    assert list(live.store.writers()) == ["live"]
    assert client.exists(live.store.keys.chain("old"), live.store.keys.sealed("old")) == 0
    assert client.xlen(live.chain_key) == 1  # no checkpoint older than the cutoff: kept


def test_recent_skips_checkpoints_unless_asked():
    a = make_log(checkpoint_every=2)
    for i in range(5):
        a.append(rec(request_id=str(i)))
    assert [r["request_id"] for r in a.recent(3)] == ["4", "3", "2"]
    assert len(a.recent(100, checkpoints=True)) == 7


def test_fingerprint_and_time_format():
    assert sha256_hex("abc").startswith("ba7816bf")
    assert rfc3339(0) == "1970-01-01T00:00:00.000Z"


def _count_transactions(a, monkeypatch, *, delay=0.0):
    """Count atomic batches run by the writer; ``delay`` holds each one (lets appends queue)."""
    real = a.store.run_batch
    executed = []

    def run(batch, conditions=()):
        time.sleep(delay)
        executed.append(len(batch))
        return real(batch, conditions)

    monkeypatch.setattr(a.store, "run_batch", run)
    return executed


def test_group_commit_stores_concurrent_appends_in_fewer_transactions(monkeypatch):
    import threading

    a = make_log(checkpoint_every=7)
    executed = _count_transactions(a, monkeypatch, delay=0.02)
    results, errors = [], []
    start = threading.Barrier(24)

    def one(i):
        start.wait()
        try:
            results.append(a.append(rec(request_id=f"r{i}")))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(r["request_id"] for r in results) == sorted(f"r{i}" for i in range(24))
    # Every caller got its own stored record, and the writes were batched.
    assert all(r["id"] for r in results)
    assert len(executed) < 24
    report = verify(a)
    assert report.ok, report.to_dict()
    # Checkpoints were inserted inside batches every 7 records, and the chain is linear.
    stored = a.recent(100, checkpoints=True)
    assert sorted(r["seq"] for r in stored) == list(range(1, len(stored) + 1))
    assert sum(1 for r in stored if r["event"] == CHECKPOINT_EVENT) == 24 // 7


def test_group_commit_failure_fails_every_caller_in_the_batch(monkeypatch):
    import threading

    a = make_log(checkpoint_every=1000)
    break_writes(a, monkeypatch)
    errors, stored = [], []

    def one(i):
        try:
            stored.append(a.append(rec(request_id=f"r{i}", decision="issued")))
        except StoreUnavailable as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stored == [] and len(errors) == 10
    lines = stdout_records(a)
    assert len(lines) == 10 and all(x["stored"] is False for x in lines)


def test_group_commit_unexpected_error_fails_closed(log, monkeypatch):
    monkeypatch.setattr(log.store, "queue_append", lambda *a, **k: 1 / 0)
    with pytest.raises(StoreUnavailable):
        log.append(rec(decision="issued"))


def test_retention_survives_redis_errors_as_store_unavailable(log, monkeypatch):
    """A Redis blip during retention must not escape tick() (it would end the background loop)."""
    monkeypatch.setattr(log.store, "writers", lambda: (_ for _ in ()).throw(StoreUnavailable("x")))
    log.clock.now += 3600  # retention is due
    log.tick()  # no exception


# -- conditions (rate-limit hits, the memo's generation) ride in the record's own write ------


def test_a_record_whose_condition_fails_is_not_stored_and_the_chain_goes_on():
    a = make_log(checkpoint_every=3)
    gen = Condition.equals("memo-gen", "g1")
    with pytest.raises(ConditionsFailed) as failed:
        a.append(rec(request_id="stale"), [gen])
    assert failed.value.failed == (gen,)
    a.append(rec(request_id="ok"), [Condition.equals("memo-gen", "")])
    stored = [r["request_id"] for r in a.recent(10)]
    assert stored == ["ok"]
    assert [r["request_id"] for r in stdout_records(a)] == ["ok"]  # nothing echoed for it
    assert verify(a).ok


def test_concurrent_batch_drops_only_the_refused_records(monkeypatch):
    import threading

    a = make_log(checkpoint_every=4)
    executed = _count_transactions(a, monkeypatch, delay=0.02)
    outcomes: dict[str, str] = {}
    start = threading.Barrier(16)

    def one(i):
        start.wait()
        # Every third caller is one subject with a limit of 3: only 3 of its 5 may be stored.
        conds = [Condition.count("rl", "subject:busy", 3, 60)] if i % 3 == 0 else []
        try:
            a.append(rec(request_id=f"r{i}"), conds)
            outcomes[f"r{i}"] = "stored"
        except ConditionsFailed:
            outcomes[f"r{i}"] = "refused"

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    busy = [f"r{i}" for i in range(16) if i % 3 == 0]
    assert sorted(outcomes[r] for r in busy) == ["refused"] * 3 + ["stored"] * 3
    assert all(outcomes[f"r{i}"] == "stored" for i in range(16) if i % 3)
    stored = {r["request_id"] for r in a.recent(100)}
    assert stored == {r for r, o in outcomes.items() if o == "stored"}
    assert a.store.client.hget("rl", "subject:busy") == b"3"
    assert len(executed) < 16  # still batched
    assert verify(a).ok


def test_rfc3339_matches_datetime_formatting():
    import random
    from datetime import UTC, datetime

    rng = random.Random(7)
    stamps = [0.0, 1.9999999, 1764135563.9999996, 1764135563.0005]
    stamps += [rng.uniform(0, 4e9) for _ in range(20000)]
    for ts in stamps:
        expected = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        assert rfc3339(ts) == expected, ts


def test_a_refused_round_still_gives_index_keys_their_expiry():
    a = make_log()
    with pytest.raises(ConditionsFailed):
        a.append(rec(request_id="stale"), [Condition.equals("memo-gen", "g1")])
    a.append(rec(request_id="ok"))
    client = a.store.client
    keys = [k for k in client.keys("*") if b"audit:idx" in k or b"audit:stats" in k]
    assert keys and all(client.ttl(k) > 0 for k in keys)
