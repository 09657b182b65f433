"""The token exchange through the HTTP layer, with fakeredis and a fake minter (unit level)."""

from __future__ import annotations

import base64
import json
import time
from urllib.parse import urlencode

import jwt
import pytest
import redis
from cryptography.hazmat.primitives import serialization

from broker.cache import role_cache_key
from broker.errors import TemporarilyUnavailable
from tests.support import ADMIN_AUDIENCE, GRANT, JWT_TYPE, SA_DOMAIN, FakeClock, exchange_form


def post(b, data, **kw):
    return b.client.post("/v1/token", data=data, **kw)


def test_issues_token_with_rfc8693_shape_and_audit(broker):
    resp = post(broker, exchange_form(broker.issuer.token(), audience="flux-source-reader"))
    assert resp.status_code == 200, resp.json
    body = resp.json
    assert body["issued_token_type"] == "urn:ietf:params:oauth:token-type:access_token"
    assert body["token_type"] == "Bearer"
    assert isinstance(body["expires_in"], int) and 3500 < body["expires_in"] <= 3600
    assert body["scope"] == "https://www.googleapis.com/auth/devstorage.read_only"
    assert resp.headers["Cache-Control"] == "no-store"
    assert resp.headers["Pragma"] == "no-cache"
    [rec] = broker.audit()
    assert rec["decision"] == "issued"
    assert rec["subject_verified"] is True
    assert rec["namespace"] == "flux-system"
    assert rec["kubernetes_service_account"] == "source-controller"
    assert rec["service_account"] == f"flux-source@{SA_DOMAIN}"
    assert rec["cache"] == "miss"
    assert rec["access_token_sha256"] and body["access_token"] not in json.dumps(rec)
    assert rec["writer"] and rec["seq"] == 1 and rec["hash"]


def test_second_request_is_cache_hit(broker):
    for _ in range(3):
        assert post(broker, exchange_form(broker.issuer.token())).status_code == 200
    assert len(broker.minter.calls) == 1
    assert [r["cache"] for r in reversed(broker.audit())] == ["miss", "hit", "hit"]


def test_json_body_is_accepted(broker):
    resp = broker.client.post("/v1/token", json=exchange_form(broker.issuer.token()))
    assert resp.status_code == 200


def test_role_selected_without_audience_and_wif_audience(broker):
    wif = "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/k"
    assert post(broker, exchange_form(broker.issuer.token())).status_code == 200
    assert post(broker, exchange_form(broker.issuer.token(), audience=wif)).status_code == 200


def test_requested_scope_is_advisory(broker):
    scope = "https://www.googleapis.com/auth/cloud-platform https://www.googleapis.com/auth/userinfo.email"
    resp = post(broker, exchange_form(broker.issuer.token(), scope=scope))
    assert resp.status_code == 200
    assert resp.json["scope"] == "https://www.googleapis.com/auth/devstorage.read_only"
    assert broker.minter.calls[0].scopes == ("https://www.googleapis.com/auth/devstorage.read_only",)


def _hs256_with_public_key(issuer):
    pem = issuer.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = base64.urlsafe_b64encode(json.dumps({"alg": "HS256", "kid": issuer.kid}).encode())
    claims = jwt.decode(issuer.token(), options={"verify_signature": False})
    payload = base64.urlsafe_b64encode(json.dumps(claims).encode())
    signing_input = header.rstrip(b"=") + b"." + payload.rstrip(b"=")
    import hashlib
    import hmac

    sig = base64.urlsafe_b64encode(hmac.new(pem, signing_input, hashlib.sha256).digest())
    return (signing_input + b"." + sig.rstrip(b"=")).decode()


def _alg_none(issuer):
    claims = jwt.decode(issuer.token(), options={"verify_signature": False})
    return jwt.encode(claims, None, algorithm="none")


def _bad_cases(issuer):
    now = int(time.time())
    return {
        "empty": ("", "invalid_request", "token_missing"),
        "garbage": ("not-a-jwt", "invalid_request", "token_malformed"),
        "oversized": ("a" * 17000, "invalid_request", "token_too_large"),
        "alg_none": (_alg_none(issuer), "invalid_request", "unsupported_algorithm"),
        "hs256_rsa_pub": (_hs256_with_public_key(issuer), "invalid_request", "unsupported_algorithm"),
        "unknown_kid": (issuer.token(headers={"kid": "nope"}), "invalid_request", "unknown_key"),
        "wrong_iss": (issuer.token(iss="https://evil.example"), "invalid_request", "unknown_issuer"),
        "wrong_aud": (issuer.token(audience="https://other"), "invalid_request", "wrong_audience"),
        "missing_aud": (issuer.token(drop=("aud",)), "invalid_request", "claims_missing"),
        "api_server_aud": (
            issuer.token(audience="https://kubernetes.default.svc"),
            "invalid_request",
            "api_server_audience",
        ),
        "admin_aud": (issuer.token(audience=ADMIN_AUDIENCE), "invalid_request", "wrong_audience"),
        "expired": (
            issuer.token(iat=now - 4000, nbf=now - 4000, exp=now - 3000),
            "invalid_request",
            "token_expired",
        ),
        "nbf_future": (issuer.token(nbf=now + 3000), "invalid_request", "token_not_yet_valid"),
        "missing_exp": (issuer.token(drop=("exp",)), "invalid_request", "claims_missing"),
        "string_exp": (issuer.token(exp=str(now + 600)), "invalid_request", "token_malformed"),
        "lifetime_over_cap": (issuer.token(lifetime=3 * 3600), "invalid_request", "lifetime_too_long"),
        "sub_mismatch": (
            issuer.token(sub="system:serviceaccount:other:source-controller"),
            "invalid_request",
            "claims_inconsistent",
        ),
        "no_role": (issuer.token("default", "default"), "invalid_target", "no_role"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "empty", "garbage", "oversized", "alg_none", "hs256_rsa_pub", "unknown_kid", "wrong_iss",
        "wrong_aud", "missing_aud", "api_server_aud", "admin_aud", "expired", "nbf_future",
        "missing_exp", "string_exp", "lifetime_over_cap", "sub_mismatch", "no_role",
    ],
)
def test_bad_subject_tokens(broker, case):
    token, error, reason = _bad_cases(broker.issuer)[case]
    resp = post(broker, exchange_form(token))
    assert resp.status_code == 400, resp.json
    assert resp.json["error"] == error
    assert resp.json["error_description"]
    assert resp.json["request_id"] == resp.headers["X-Request-Id"]
    assert resp.headers["Cache-Control"] == "no-store"
    [rec] = broker.audit()
    assert rec["decision"] == "denied"
    assert rec["reason"] == reason, rec
    assert rec["request_id"] == resp.json["request_id"]
    assert rec["subject_verified"] is (case == "no_role")
    if token:
        assert token not in json.dumps(rec) and token not in broker.audit_out.getvalue()
    assert broker.minter.calls == []


def test_unverified_claims_are_marked(broker):
    token = broker.issuer.token(headers={"kid": "nope"})
    post(broker, exchange_form(token))
    [rec] = broker.audit()
    assert rec["subject_verified"] is False
    assert rec["namespace"] == "flux-system"
    assert rec["issuer"] == broker.issuer.issuer


@pytest.mark.parametrize(
    ("form", "status", "error", "reason"),
    [
        ({"subject_token": "x", "subject_token_type": JWT_TYPE}, 400, "invalid_request",
         "missing_grant_type"),
        ({"grant_type": "client_credentials", "subject_token": "x"}, 400,
         "unsupported_grant_type", "unsupported_grant_type"),
        ({"grant_type": GRANT, "subject_token": "x"}, 400, "invalid_request",
         "missing_subject_token_type"),
    ],
)
def test_malformed_requests(broker, form, status, error, reason):
    resp = post(broker, form)
    assert (resp.status_code, resp.json["error"]) == (status, error)
    [rec] = broker.audit()
    assert rec["reason"] == reason


def test_unknown_role_and_non_admitting_role_look_the_same(broker):
    token = broker.issuer.token()
    a = post(broker, exchange_form(token, audience="does-not-exist"))
    b = post(broker, exchange_form(broker.issuer.token(), audience="batch-b"))
    assert a.status_code == b.status_code == 400
    assert a.json["error"] == b.json["error"] == "invalid_target"
    assert a.json["error_description"].replace("does-not-exist", "X") == b.json[
        "error_description"
    ].replace("batch-b", "X")


def test_denials_record_the_role_asked_for_and_fold_per_role(broker):
    """Auditors see which role a refused caller tried to get; probes of different roles with
    one token are separate records, repeats of one role fold."""
    token = broker.issuer.token()
    for role in ("prod-deployer", "org-admin", "prod-deployer", "x" * 600):
        assert post(broker, exchange_form(token, audience=role)).status_code == 400
    assert post(broker, exchange_form("garbage", audience="org-admin")).status_code == 400
    bad_scope = {**exchange_form(token, audience="org-admin"), "scope": 'bad"scope'}
    assert post(broker, bad_scope).status_code == 400  # refused while parsing the request
    broker.app.extensions["broker"].audit.flush_folds(force=True)
    got = sorted((r["role"], r["reason"], r["count"]) for r in broker.audit())
    assert got == [
        ("org-admin", "invalid_scope", 1),
        ("org-admin", "role_not_admitted", 1),
        ("org-admin", "token_malformed", 1),
        ("prod-deployer", "role_not_admitted", 1),
        ("prod-deployer", "role_not_admitted", 1),  # the fold of the repeat
        ("x" * 256, "role_not_admitted", 1),
    ]


def test_ambiguous_roles_need_a_name(broker):
    token = broker.issuer.token("team-x", "runner")
    resp = post(broker, exchange_form(token))
    assert resp.json["error"] == "invalid_target"
    assert post(broker, exchange_form(broker.issuer.token("team-x", "runner"), audience="batch-b")).status_code == 200


def test_duplicate_parameters_refused(broker):
    token = broker.issuer.token()
    body = urlencode([*exchange_form(token).items(), ("audience", "a"), ("audience", "b")])
    resp = broker.client.post(
        "/v1/token", data=body, content_type="application/x-www-form-urlencoded"
    )
    assert resp.status_code == 400
    assert "more than once" in resp.json["error_description"]
    assert broker.audit()[0]["reason"] == "duplicate_parameter"


def test_duplicate_json_parameters_refused_like_form_ones(broker):
    """orjson keeps the last of repeated keys: the first audience must not be swapped out."""
    form = {**exchange_form(broker.issuer.token()), "audience": "flux-source-reader"}
    body = json.dumps(form)[:-1] + ', "audience": "team-role"}'
    resp = broker.client.post("/v1/token", data=body, content_type="application/json")
    assert resp.status_code == 400 and "'audience' was given more than once" in resp.text
    [rec] = broker.audit()
    assert rec["reason"] == "duplicate_parameter" and rec["role"] == "flux-source-reader"
    # recorded like a form's repeat: the caller's token fingerprint and (unverified) claims
    assert rec["subject_token_sha256"] and rec["namespace"] == "flux-system"


def test_malformed_scope(broker):
    resp = post(broker, exchange_form(broker.issuer.token(), scope='bad"scope'))
    assert resp.json["error"] == "invalid_scope"


def test_oversized_body_413_and_audited(broker):
    resp = post(broker, {"subject_token": "a" * 70000, "grant_type": GRANT})
    assert resp.status_code == 413
    assert broker.audit()[0]["reason"] == "request_too_large"


@pytest.mark.parametrize(
    ("body", "ctype"),
    [(b"{not json", "application/json"), (b"[1,2]", "application/json"), (b"x", "text/plain"),
     (b'{"subject_token": 5}', "application/json"), (b"\xff\xfe", "application/x-www-form-urlencoded")],
)
def test_garbage_bodies_never_500(broker, body, ctype):
    resp = broker.client.post("/v1/token", data=body, content_type=ctype)
    assert 400 <= resp.status_code < 500
    assert resp.json["error"]


def test_identical_denials_fold(broker):
    for _ in range(20):
        post(broker, exchange_form("garbage"))
    broker.app.extensions["broker"].audit.flush_folds(force=True)
    records = broker.audit()
    assert len(records) == 2
    assert sum(r["count"] for r in records) == 20


def test_redis_down_gives_503_and_no_token(broker, monkeypatch):
    def boom(*a, **k):
        raise redis.ConnectionError("down")

    monkeypatch.setattr(broker.redis, "execute_command", boom)
    resp = post(broker, exchange_form(broker.issuer.token()))
    assert resp.status_code == 503
    assert resp.json["error"] == "temporarily_unavailable"
    assert resp.headers["Retry-After"]
    assert "access_token" not in resp.json
    assert broker.client.get("/readyz").status_code == 503


def test_audit_store_failure_after_mint_withholds_token(broker, monkeypatch):
    """The token is minted and cached, but the record cannot be stored: nothing leaves."""
    audit = broker.app.extensions["broker"].audit
    monkeypatch.setattr(audit.store, "queue_append", lambda *a, **k: (_ for _ in ()).throw(redis.ConnectionError()))
    resp = post(broker, exchange_form(broker.issuer.token()))
    assert resp.status_code == 503
    assert "access_token" not in resp.json
    lines = [json.loads(x)["audit"] for x in broker.audit_out.getvalue().splitlines()]
    assert any(r["decision"] == "issued" and r["stored"] is False for r in lines)


def test_iam_unavailable_is_503(broker):
    broker.minter.fail = TemporarilyUnavailable("IAM down", reason="iam_unavailable", retry_after=2)
    resp = post(broker, exchange_form(broker.issuer.token()))
    assert resp.status_code == 503
    assert resp.headers["Retry-After"] == "2"
    assert broker.audit()[0]["decision"] == "error"


def test_rate_limit_per_client_ip(make_broker):
    b = make_broker(rate_limit={"per_client_ip_per_minute": 3, "per_subject_per_minute": 0})
    codes = [post(b, exchange_form("garbage")).status_code for _ in range(5)]
    assert codes == [400, 400, 400, 429, 429]
    resp = post(b, exchange_form("garbage"))
    assert int(resp.headers["Retry-After"]) >= 1


def test_rate_limit_per_subject_leaves_others(make_broker):
    b = make_broker(rate_limit={"per_client_ip_per_minute": 0, "per_subject_per_minute": 2})
    codes = [post(b, exchange_form(b.issuer.token())).status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    other = b.issuer.token("team-x", "runner")
    assert post(b, exchange_form(other, audience="batch-b")).status_code == 200


def test_health(broker):
    assert broker.client.get("/healthz").json == {"status": "ok"}
    assert broker.client.get("/readyz").status_code == 200
    assert broker.client.get("/nope").status_code == 404
    assert broker.client.get("/v1/token").status_code == 405


def test_form_with_too_many_fields_is_refused(broker):
    body = "&".join(f"f{i}=x" for i in range(100))
    resp = broker.client.post("/v1/token", data=body, content_type="application/x-www-form-urlencoded")
    assert resp.status_code == 400 and resp.json["error"] == "invalid_request"
    assert broker.audit()[0]["reason"] == "malformed_body"


def test_form_plus_means_space_in_scope(broker):
    from urllib.parse import quote

    token = broker.issuer.token()
    body = (f"grant_type={quote(GRANT)}&subject_token_type={quote(JWT_TYPE)}&subject_token={token}"
            "&scope=https%3A%2F%2Fwww.googleapis.com%2Fauth%2Fcloud-platform+https%3A%2F%2Fwww.googleapis.com%2Fauth%2Fuserinfo.email")
    resp = broker.client.post("/v1/token", data=body, content_type="application/x-www-form-urlencoded")
    assert resp.status_code == 200, resp.json


def test_refused_verified_callers_count_against_their_subject_limit(make_broker):
    b = make_broker(rate_limit={"per_client_ip_per_minute": 0, "per_subject_per_minute": 3})
    token = b.issuer.token("default", "default")  # verifies, but no role admits it
    codes = [post(b, exchange_form(b.issuer.token("default", "default"))).status_code for _ in range(5)]
    assert codes == [400, 400, 400, 429, 429]
    assert token  # the caller is blocked by subject, whatever its IP


def test_subject_blocked_requests_still_count_against_the_ip(make_broker):
    b = make_broker(rate_limit={"per_client_ip_per_minute": 4, "per_subject_per_minute": 1})
    codes = [post(b, exchange_form(b.issuer.token())).status_code for _ in range(6)]
    assert codes[0] == 200 and set(codes[1:]) == {429}
    reasons = [r["reason"] for r in reversed(b.audit())]
    assert "rate_limited_client_ip" in reasons  # the IP limit was reached too


def test_unparsable_requests_count_against_the_ip_limit(make_broker):
    b = make_broker(rate_limit={"per_client_ip_per_minute": 2, "per_subject_per_minute": 0})
    codes = [b.client.post("/v1/token", data=b"{bad", content_type="application/json").status_code
             for _ in range(4)]
    assert codes == [400, 400, 429, 429]
    assert post(b, exchange_form(b.issuer.token())).status_code == 429  # the IP is over


# -- the in-process memo (broker/tokenmemo.py): one round trip per hit, purges exact ----------


def _trips(b, monkeypatch):
    """Record, per round trip of the exchange's multiplexer, the commands it carried."""
    mux = b.app.extensions["broker"].exchange._mux
    trips: list[list[str]] = []
    real = mux.run

    def run(recorder):
        trips.append([str(c[0]).upper() for c in recorder.commands])
        return real(recorder)

    monkeypatch.setattr(mux, "run", run)
    return trips


def test_memoised_hit_is_one_round_trip_carrying_limits_and_record(make_broker, monkeypatch):
    clock = FakeClock()  # still: all three requests count in one rate-limit window
    b = make_broker(
        clock=clock, rate_limit={"per_client_ip_per_minute": 100, "per_subject_per_minute": 100}
    )
    for _ in range(2):  # miss (mint), then a hit read from Redis (memoised)
        assert post(b, exchange_form(b.issuer.token())).status_code == 200
    trips = _trips(b, monkeypatch)
    resp = post(b, exchange_form(b.issuer.token()))
    assert resp.status_code == 200
    assert trips == [["EVALSHA"]]  # no read: the audit batch alone, conditions included
    assert [r["cache"] for r in b.audit()[:2]] == ["hit", "hit"]
    assert len(b.minter.calls) == 1
    # The hits were counted atomically with the record: 3 requests, 3 per limit.
    window = b.redis.keys(f"{b.settings.redis.key_prefix}rl:*")
    counts = {k.split(b":")[0]: int(v) for k, v in b.redis.hgetall(window[0]).items()}
    assert counts == {b"client_ip": 3, b"subject": 3, b"mint_role": 1}
    assert b.redis.ttl(window[0]) > 0


def test_purge_stops_memoised_tokens_at_once(broker, monkeypatch):
    b = broker
    for _ in range(2):
        post(b, exchange_form(b.issuer.token()))
    first = b.minter.calls and post(b, exchange_form(b.issuer.token())).json["access_token"]
    exchange = b.app.extensions["broker"].exchange
    assert len(exchange._memo) == 1
    # Another replica purges: this worker's memo is not told, the generation in Redis is.
    role = b.app.extensions["broker"].roles().get("flux-source-reader")
    cache = b.app.extensions["broker"].cache
    assert cache.purge_role(role.name, also=[role_cache_key(role)]) == 1  # as the purge API does
    trips = _trips(b, monkeypatch)
    resp = post(b, exchange_form(b.issuer.token()))
    assert resp.status_code == 200
    assert resp.json["access_token"] != first and len(b.minter.calls) == 2
    assert trips[0] == ["EVALSHA"] and "GET" in trips[1]  # refused by the generation, re-read
    [rec] = [r for r in b.audit() if r.get("access_token_sha256")][:1]
    assert rec["cache"] == "miss"  # the one record of that request names the new token
    issued = [r for r in b.audit() if r["decision"] == "issued"]
    assert len(issued) == 4  # no record for the refused memo attempt


def test_memo_is_kept_at_most_its_ttl(make_broker, monkeypatch):
    clock = FakeClock()
    b = make_broker(clock=clock, cache={"memo": "10s"})
    for _ in range(2):
        post(b, exchange_form(b.issuer.token()))
    trips = _trips(b, monkeypatch)
    clock.now += 9
    post(b, exchange_form(b.issuer.token()))
    clock.now += 2  # 11 s after it was read
    post(b, exchange_form(b.issuer.token()))
    assert ["GET" in t for t in trips] == [False, True, False]


def test_memo_stops_at_the_tokens_refresh_point(make_broker, monkeypatch):
    clock = FakeClock()
    # lifetime 1h x 0.005 = refresh due 18 s after minting, well within the 30 s memo.
    b = make_broker(clock=clock, cache={"refresh_ahead": 0.005})
    for _ in range(2):
        post(b, exchange_form(b.issuer.token()))
    trips = _trips(b, monkeypatch)
    clock.now += 10
    post(b, exchange_form(b.issuer.token()))
    clock.now += 10  # past the refresh point: read Redis (where a refreshed token would be)
    post(b, exchange_form(b.issuer.token()))
    assert ["GET" in t for t in trips] == [False, True, False]  # memo; read, record


def test_memo_off_reads_redis_every_time(make_broker, monkeypatch):
    b = make_broker(cache={"memo": "0s"})
    post(b, exchange_form(b.issuer.token()))
    trips = _trips(b, monkeypatch)
    for _ in range(2):
        post(b, exchange_form(b.issuer.token()))
    assert all("GET" in t for t in trips[::2]) and len(trips) == 4


def test_rate_limit_exact_when_served_from_memo(make_broker):
    clock = FakeClock()  # one rate-limit window throughout
    b = make_broker(
        clock=clock, rate_limit={"per_client_ip_per_minute": 0, "per_subject_per_minute": 5}
    )
    codes = [post(b, exchange_form(b.issuer.token())).status_code for _ in range(8)]
    assert codes == [200] * 5 + [429] * 3
    assert [r["reason"] for r in b.audit()[:3]] == ["rate_limited_subject"] * 3
    ip_over = make_broker(
        clock=clock, rate_limit={"per_client_ip_per_minute": 3, "per_subject_per_minute": 0}
    )
    codes = [post(ip_over, exchange_form(ip_over.issuer.token())).status_code for _ in range(5)]
    assert codes == [200] * 3 + [429] * 2


def test_a_purge_between_read_and_issue_is_exact_on_the_redis_path(broker, monkeypatch):
    b = broker
    old = post(b, exchange_form(b.issuer.token())).json["access_token"]
    exchange = b.app.extensions["broker"].exchange
    cache = b.app.extensions["broker"].cache
    role = b.app.extensions["broker"].roles().get("flux-source-reader")
    exchange._memo.clear()
    real = exchange._count_and_read

    def read_then_purge(*args):
        out = real(*args)
        cache.purge_role(role.name, also=[role_cache_key(role)])  # lands after the read
        exchange._memo.clear()
        return out

    monkeypatch.setattr(exchange, "_count_and_read", read_then_purge)
    resp = post(b, exchange_form(b.issuer.token()))
    assert resp.status_code == 200 and resp.json["access_token"] != old
    issued = [r for r in b.audit() if r["decision"] == "issued"]
    assert len(issued) == 2 and issued[0]["cache"] == "miss"  # one record, for the new token


def test_a_lost_generation_never_lets_a_memoised_token_through(broker):
    b = broker
    for _ in range(2):  # the second read memoises the token
        first = post(b, exchange_form(b.issuer.token())).json["access_token"]
    cache = b.app.extensions["broker"].cache
    b.redis.delete(cache.generation_key, *b.redis.keys("*{cache:*}:token"))  # e.g. FLUSHALL
    resp = post(b, exchange_form(b.issuer.token()))
    assert resp.status_code == 200 and resp.json["access_token"] != first
    assert b.redis.get(cache.generation_key)  # written afresh
