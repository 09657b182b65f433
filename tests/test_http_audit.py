"""The audit endpoints: auditor authentication, events, verification, public keys."""

from __future__ import annotations

import io

import fakeredis
import pytest
import yaml

from broker.app import create_app
from broker.errors import ConfigError
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
    assert set(body) == {"events", "next_cursor"} and len(body["events"]) == 2
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


@pytest.mark.parametrize("query", ["limit=0", "limit=1001", "limit=x", "since=yesterday",
                                   "since=2030-01-01T00:00:00Z&until=2029-01-01T00:00:00Z",
                                   "cursor=%21%21"])
def test_bad_event_queries_are_400(app, issuer, query):
    resp = app.test_client().get(f"/v1/audit/events?{query}", headers=auth(issuer))
    assert resp.status_code == 400 and resp.json["error"] == "invalid_request"


def test_time_range_filters(app, issuer):
    traffic(app, issuer, 1)
    client = app.test_client()
    future = client.get("/v1/audit/events?since=2999-01-01T00:00:00Z", headers=auth(issuer)).json
    assert future == {"events": [], "next_cursor": None}
    now = client.get("/v1/audit/events?since=2000-01-01T00:00:00%2B00:00", headers=auth(issuer))
    assert len(now.json["events"]) == 2


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
