"""The audit endpoints: auditor authentication, events, verification, public keys."""

from __future__ import annotations

import io
import json
import threading
import time

import fakeredis
import pytest
import yaml

from broker.app import create_app
from broker.errors import ConfigError, StoreUnavailable
from broker.settings import load_settings
from broker.signing import SigningKey, parse_signing_key
from tests import audit_tamper as T
from tests.conftest import FakeMinter
from tests.support import ADMIN_AUDIENCE, AUDIT_SIGNING_KEY, CACHE_KEY, broker_config, exchange_form

ENV = {"BROKER_CACHE_KEYS": CACHE_KEY, "BROKER_AUDIT_SIGNING_KEY": AUDIT_SIGNING_KEY}


def configure(tmp_path, issuer, **audit):
    path = broker_config(tmp_path, issuer)
    cfg = yaml.safe_load(path.read_text())
    cfg["access"].update(auditors=["test/audit/reader"], admins=["test/ops/admin"])
    if audit:
        cfg["audit"] = audit
    path.write_text(yaml.safe_dump(cfg))
    return load_settings(path)


@pytest.fixture
def app(tmp_path, issuer):
    return create_app(configure(tmp_path, issuer), redis_client=fakeredis.FakeRedis(),
                      minter=FakeMinter(), env=ENV, audit_out=io.StringIO())


def auth(issuer, namespace="audit", sa="reader"):
    return {"Authorization": f"Bearer {issuer.token(namespace, sa, audience=ADMIN_AUDIENCE)}"}


def traffic(app, issuer, n=3):
    client = app.test_client()
    for _ in range(n):
        assert client.post("/v1/token", data=exchange_form(issuer.token())).status_code == 200
        assert client.post("/v1/token", data=exchange_form("garbage")).status_code == 400


def test_events_need_an_auditor(app, issuer):
    client = app.test_client()
    assert client.get("/v1/audit/events").status_code == 401
    assert client.get("/v1/audit/events", headers=auth(issuer, "ops", "admin")).status_code == 403
    exchange_token = {"Authorization": f"Bearer {issuer.token()}"}  # wrong audience
    assert client.get("/v1/audit/events", headers=exchange_token).status_code == 401
    assert client.get("/v1/audit/verify").status_code == 401


def test_events_newest_first_with_cursor(app, issuer):
    traffic(app, issuer)
    client = app.test_client()
    resp = client.get("/v1/audit/events?limit=2", headers=auth(issuer))
    assert resp.status_code == 200 and resp.headers["Cache-Control"] == "no-store"
    body = resp.json
    assert set(body) == {"events", "next_cursor", "follow_cursor"} and len(body["events"]) == 2
    got = list(body["events"])
    while body["next_cursor"]:
        body = client.get(f"/v1/audit/events?limit=2&cursor={body['next_cursor']}",
                          headers=auth(issuer)).json
        got.extend(body["events"])
    exchanges = [e for e in got if e["event"] == "token.exchange"]
    assert len(exchanges) == 4  # 3 issued + the first garbage denial (the rest fold, pending)
    assert {e["decision"] for e in exchanges} == {"issued", "denied"}
    assert all({"id", "writer", "seq", "prev", "hash", "time"} <= set(e) for e in got)
    assert [e["seq"] for e in got] == sorted((e["seq"] for e in got), reverse=True)


@pytest.mark.parametrize("query", ["limit=0", "limit=1001", "limit=x", "limit=%C2%B2",
                                   "order=asc&wait=%C2%B9", "since=yesterday",
                                   "since=2030-01-01T00:00:00Z&until=2029-01-01T00:00:00Z",
                                   "cursor=%21%21"])
def test_bad_event_queries_are_400(app, issuer, query):
    resp = app.test_client().get(f"/v1/audit/events?{query}", headers=auth(issuer))
    assert resp.status_code == 400 and resp.json["error"] == "invalid_request"


def test_time_range_filters(app, issuer):
    traffic(app, issuer, 1)
    client = app.test_client()
    future = client.get("/v1/audit/events?since=2999-01-01T00:00:00Z", headers=auth(issuer)).json
    assert future["events"] == [] and future["next_cursor"] is None
    now = client.get("/v1/audit/events?since=2000-01-01T00:00:00%2B00:00", headers=auth(issuer))
    assert [e["event"] for e in now.json["events"]] == [
        "audit.read", "token.exchange", "token.exchange"]  # the first read is on record too
    lower = client.get("/v1/audit/events?since=2999-01-01t00:00:00z", headers=auth(issuer))
    assert lower.status_code == 200 and lower.json["events"] == []  # RFC 3339 §5.6: t and z


def test_verify_reports_ok_then_the_tampered_record(app, issuer):
    traffic(app, issuer)
    b = app.extensions["broker"]
    b.audit.close()  # final checkpoint: everything sealed
    client = app.test_client()
    body = client.get("/v1/audit/verify", headers=auth(issuer)).json
    # 3 issued, the first denial, the two folded into one (written at close), the checkpoint
    assert body["ok"] is True and body["checked"] == 6 and body["sealed_through"]
    assert "first_bad" not in body
    writer = body["writers"][0]["writer"]
    bad_id = T.change_field(b.redis, b.audit.store.keys, writer, 1, rehash=False, role="x")
    # Incremental: the change lies before the verified checkpoint; a full pass finds it.
    assert client.get("/v1/audit/verify", headers=auth(issuer)).json["ok"] is True
    body = client.get("/v1/audit/verify?full=true", headers=auth(issuer)).json
    assert body["ok"] is False
    assert body["first_bad"]["id"] == bad_id and body["first_bad"]["problem"] == "altered"
    assert client.get("/v1/audit/verify?full=maybe", headers=auth(issuer)).status_code == 400
    assert client.get("/v1/audit/verify?ful=true", headers=auth(issuer)).status_code == 400


def test_public_key_for_anyone_with_previous_keys(tmp_path, issuer):
    old = SigningKey.generate()
    settings = configure(tmp_path, issuer, previous_public_keys=[old.public.pem()])
    app = create_app(settings, redis_client=fakeredis.FakeRedis(), minter=FakeMinter(), env=ENV,
                     audit_out=io.StringIO())
    body = app.test_client().get("/v1/audit/public-key").json
    current = parse_signing_key(AUDIT_SIGNING_KEY, source="t")
    assert body["current"] == current.key_id
    assert [(k["key_id"], k["current"]) for k in body["keys"]] == [
        (current.key_id, True), (old.key_id, False)]
    assert body["keys"][0]["public_key"] == current.public.b64


def test_no_signing_key_no_broker(tmp_path, issuer):
    settings = configure(tmp_path, issuer)
    with pytest.raises(ConfigError, match="BROKER_AUDIT_SIGNING_KEY: not set"):
        create_app(settings, redis_client=fakeredis.FakeRedis(), minter=FakeMinter(),
                   env={"BROKER_CACHE_KEYS": CACHE_KEY})


def test_bad_previous_public_key_is_refused_with_its_path(tmp_path, issuer):
    with pytest.raises(ConfigError, match=r"audit.previous_public_keys: \[0\]: base64 must decode to 32"):
        configure(tmp_path, issuer, previous_public_keys=["nope"])


# -- queries, reads on record, report ----------------------------------------------------------


def mixed_traffic(app, issuer):
    client = app.test_client()
    ok = [client.post("/v1/token", data=exchange_form(issuer.token()),
                      headers={"User-Agent": "flux/1"}).status_code for _ in range(3)]
    ok += [client.post("/v1/token", data=exchange_form(issuer.token("team-y", "runner")))
           .status_code for _ in range(2)]
    ok += [client.post("/v1/token", data=exchange_form(issuer.token("other", "x"))).status_code]
    assert ok == [200] * 5 + [400]


def events(app, issuer, query="", headers=None):
    client, got, cursor = app.test_client(), [], None
    while True:
        url = f"/v1/audit/events?limit=2&{query}" if cursor is None else \
            f"/v1/audit/events?limit=2&cursor={cursor}"
        resp = client.get(url, headers=headers or auth(issuer))
        assert resp.status_code == 200, resp.json
        got.extend(resp.json["events"])
        cursor = resp.json["next_cursor"]
        if cursor is None:
            return [e for e in got if e["event"] != "audit.read"]


@pytest.mark.parametrize(("query", "expected"), [
    ("subject=test/flux-system/source-controller", 3),
    ("subject=system:serviceaccount:team-y:runner", 2),
    ("role=batch-a", 2),
    ("service_account=FLUX-SOURCE@test-project.iam.gserviceaccount.com", 3),
    ("decision=denied", 1),
    ("decision=issued&role=flux-source-reader&order=asc", 3),
    ("event=token.exchange", 6),
    ("subject=test/nobody/none", 0),
])
def test_filters(app, issuer, query, expected):
    mixed_traffic(app, issuer)
    got = events(app, issuer, query)
    assert len(got) == expected
    assert len({e["id"] for e in got}) == expected


@pytest.mark.parametrize(("query", "reason"), [
    ("decision=maybe", "bad_filter"), ("order=sideways", "bad_order"), ("wait=26", "bad_wait"),
    ("wait=1", "bad_wait"), ("role=" + "x" * 600, "bad_filter"), ("limit=-1", "bad_limit"),
    ("limit=%C2%B2", "bad_limit"),  # "²" passes str.isdigit, not int()
    # a misspelt or repeated filter must not answer as if absent (every record)
    ("servce_account=nobody%40x", "bad_filter"), ("role=a&role=b", "bad_filter"),
])
def test_bad_filters_are_400_with_a_reason(app, issuer, query, reason):
    resp = app.test_client().get(f"/v1/audit/events?{query}", headers=auth(issuer))
    assert resp.status_code == 400 and resp.json["error"] == "invalid_request"
    b = app.extensions["broker"]
    read = b.audit.recent(1)[0]
    assert (read["event"], read["decision"], read["reason"]) == ("audit.read", "denied", reason)
    assert read["details"]["params"] and read["subject"] == "system:serviceaccount:audit:reader"


def test_a_cursor_continues_its_own_query_only(app, issuer):
    mixed_traffic(app, issuer)
    client = app.test_client()
    first = client.get("/v1/audit/events?role=flux-source-reader&limit=1",
                       headers=auth(issuer)).json
    cursor = first["next_cursor"]
    same = client.get(f"/v1/audit/events?role=flux-source-reader&limit=1&cursor={cursor}",
                      headers=auth(issuer))
    assert same.status_code == 200 and same.json["events"][0]["role"] == "flux-source-reader"
    other = client.get(f"/v1/audit/events?role=batch-a&cursor={cursor}", headers=auth(issuer))
    assert other.status_code == 400 and other.json["error_description"].startswith("cursor")


def test_ndjson_streams_one_record_a_line(app, issuer):
    mixed_traffic(app, issuer)
    resp = app.test_client().get("/v1/audit/events?limit=4&event=token.exchange",
                                 headers={**auth(issuer), "Accept": "application/x-ndjson"})
    assert resp.status_code == 200 and resp.mimetype == "application/x-ndjson"
    assert resp.headers["Cache-Control"] == "no-store"
    lines = [json.loads(x) for x in resp.get_data(as_text=True).splitlines()]
    assert [x["event"] for x in lines[:4]] == ["token.exchange"] * 4
    assert set(lines[4]) == {"next_cursor", "follow_cursor"}
    assert lines[4]["next_cursor"] == resp.headers["X-Next-Cursor"]


def test_every_read_is_on_record_with_who_and_filter(app, issuer):
    mixed_traffic(app, issuer)
    client = app.test_client()
    client.get("/v1/audit/events?role=batch-a&decision=issued&limit=5",
               headers={**auth(issuer), "User-Agent": "auditor-cli"})
    client.get("/v1/audit/verify", headers=auth(issuer))
    reads = [e for e in app.extensions["broker"].audit.recent(100) if e["event"] == "audit.read"]
    first = reads[-1]
    assert first["subject"] == "system:serviceaccount:audit:reader"
    assert first["subject_verified"] is True and first["user_agent"] == "auditor-cli"
    assert first["details"]["endpoint"] == "events" and first["details"]["returned"] == 2
    assert first["details"]["filter"] == {"role": "batch-a", "decision": "issued",
                                          "order": "desc"}
    assert first["subject_token_sha256"] and first["decision"] == "issued"
    assert reads[-2]["details"]["endpoint"] == "verify" and reads[-2]["details"]["ok"] is True


def test_refused_reads_are_on_record(app, issuer):
    client = app.test_client()
    assert client.get("/v1/audit/events").status_code == 401
    assert client.get("/v1/audit/events", headers=auth(issuer, "ops", "admin")).status_code == 403
    assert client.get("/v1/audit/report", headers=auth(issuer, "x", "y")).status_code == 403
    reads = [e for e in app.extensions["broker"].audit.recent(10) if e["event"] == "audit.read"]
    assert [(r["decision"], r["reason"], r["subject"], r["details"]["endpoint"])
            for r in reversed(reads)] == [
        ("denied", "missing_bearer", None, "events"),
        ("denied", "not_listed", "system:serviceaccount:ops:admin", "events"),
        ("denied", "not_listed", "system:serviceaccount:x:y", "report")]
    # ...and an auditor can find who tried.
    resp = app.test_client().get(
        "/v1/audit/events?event=audit.read&decision=denied&subject=test/ops/admin",
        headers=auth(issuer)).json
    assert [e["reason"] for e in resp["events"]] == ["not_listed"]


def test_a_read_that_cannot_be_recorded_is_not_answered(app, issuer, monkeypatch):
    mixed_traffic(app, issuer)
    b = app.extensions["broker"]

    def refuse(record):
        raise StoreUnavailable("down", retry_after=1)

    monkeypatch.setattr(b.audit, "append", refuse)
    resp = app.test_client().get("/v1/audit/events", headers=auth(issuer))
    assert resp.status_code == 503 and "events" not in resp.json


def test_long_poll_returns_what_is_stored_meanwhile(app, issuer):
    client = app.test_client()
    start = client.get("/v1/audit/events?limit=1", headers=auth(issuer)).json["follow_cursor"]

    def later():
        time.sleep(0.3)
        app.test_client().post("/v1/token", data=exchange_form(issuer.token()))

    t = threading.Thread(target=later)
    t.start()
    got = client.get(f"/v1/audit/events?cursor={start}&wait=20", headers=auth(issuer)).json
    t.join()
    assert [e["event"] for e in got["events"] if e["event"] != "audit.read"] == [
        "token.exchange"]
    assert got["next_cursor"] is None and got["follow_cursor"]


def test_no_free_follow_slot_answers_at_once(app, issuer):
    client = app.test_client()
    start = client.get("/v1/audit/events?limit=1", headers=auth(issuer)).json["follow_cursor"]
    slots = threading.BoundedSemaphore(1)
    app.extensions["broker.audit.follow_slots"] = slots
    assert slots.acquire(blocking=False)
    got = client.get(f"/v1/audit/events?cursor={start}&wait=25", headers=auth(issuer))
    assert got.status_code == 200
    read = app.extensions["broker"].audit.recent(1)[0]
    assert read["details"]["wait"] == 0
    slots.release()


def test_report(app, issuer):
    mixed_traffic(app, issuer)
    client = app.test_client()
    body = client.get("/v1/audit/report", headers=auth(issuer)).json
    assert body["totals"] == {"issued": 5, "denied": 1, "error": 0}
    assert {(e["role"], e["count"]) for e in body["issuance"]} == {
        ("flux-source-reader", 3), ("batch-a", 2)}
    assert body["roles_never_used"] == ["batch-b"] and body["days"] == 31
    assert body["refused_subjects"][0]["subject"] == "system:serviceaccount:other:x"
    assert client.get("/v1/audit/report?top=0", headers=auth(issuer)).status_code == 400
    assert client.get("/v1/audit/report?top=%C2%B2", headers=auth(issuer)).status_code == 400
    assert client.get("/v1/audit/report?role=x", headers=auth(issuer)).status_code == 400
    assert client.get("/v1/audit/report").status_code == 401
    read = app.extensions["broker"].audit.recent(1)[0]
    assert read["details"]["endpoint"] == "report" and read["decision"] == "denied"
