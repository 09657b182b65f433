"""Tests for broker.http.roles (and broker.roles_admin behind it): the role API, cache purge
and explain, on a unit broker (fakeredis, FakeMinter)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.roles_support import (
    ADMIN,
    AUDITOR,
    NOBODY,
    bearer,
    make_roles_broker,
    role,
    roles_app,
)
from tests.support import ADMIN_AUDIENCE, AUDIENCE, ROLES, SA_DOMAIN, LocalIssuer, exchange_form


@pytest.fixture
def file_broker(tmp_path: Path, issuer):
    return make_roles_broker(tmp_path, issuer, source="file")


@pytest.fixture
def redis_broker(tmp_path: Path, issuer):
    b = make_roles_broker(tmp_path, issuer, source="redis")
    etag = get(b, "/v1/roles").headers["ETag"]
    resp = b.client.put("/v1/roles", json=ROLES, headers={**bearer(issuer), "If-Match": etag})
    assert resp.status_code == 200, resp.json
    return b


def get(b, path: str, who=ADMIN):
    return b.client.get(path, headers=bearer(b.issuer, who))


def send(b, method: str, path: str, body: Any = None, who=ADMIN, **headers: str):
    return b.client.open(
        path, method=method, json=body, headers={**bearer(b.issuer, who), **headers}
    )


def source(b):
    return b.app.extensions["broker"].role_admin.source


def events(b, event: str) -> list[dict[str, Any]]:
    return [r for r in b.audit() if r["event"] == event]


# --- access --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/v1/roles", None),
        ("GET", "/v1/roles/batch-a", None),
        ("PUT", "/v1/roles/batch-a", role("batch-a")),
        ("DELETE", "/v1/roles/batch-a", None),
        ("PUT", "/v1/roles", ROLES),
        ("POST", "/v1/cache/purge", {"role": "batch-a"}),
        ("POST", "/v1/explain", {"subject_token": "x"}),
        ("GET", "/v1/roles/_history", None),
    ],
)
def test_every_endpoint_needs_a_bearer_token(redis_broker, method, path, body) -> None:
    resp = redis_broker.client.open(path, method=method, json=body)
    assert resp.status_code == 401 and resp.json["error"] == "invalid_token"
    # an exchange-audience token is not an admin credential
    token = redis_broker.issuer.token(*ADMIN, audience=AUDIENCE)
    resp = redis_broker.client.open(
        path, method=method, json=body, headers={"Authorization": f"Bearer {token}"}
    )
    assert resp.status_code == 401


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PUT", "/v1/roles/batch-a", role("batch-a")),
        ("DELETE", "/v1/roles/batch-a", None),
        ("PUT", "/v1/roles", ROLES),
        ("POST", "/v1/cache/purge", {"role": "batch-a"}),
    ],
)
def test_auditors_cannot_write(redis_broker, method, path, body) -> None:
    before = get(redis_broker, "/v1/roles").json["version"]
    resp = send(redis_broker, method, path, body, who=AUDITOR, **{"If-Match": "*"})
    assert resp.status_code == 403 and resp.json["error"] == "access_denied"
    assert get(redis_broker, "/v1/roles").json["version"] == before


def test_auditors_read_and_explain_strangers_cannot(redis_broker) -> None:
    assert get(redis_broker, "/v1/roles", who=AUDITOR).status_code == 200
    assert get(redis_broker, "/v1/roles/batch-a", who=AUDITOR).status_code == 200
    body = {"subject": {"issuer": "test", "namespace": "team-x", "service_account": "runner"}}
    assert send(redis_broker, "POST", "/v1/explain", body, who=AUDITOR).status_code == 200
    assert get(redis_broker, "/v1/roles", who=NOBODY).status_code == 403
    assert send(redis_broker, "POST", "/v1/explain", body, who=NOBODY).status_code == 403


# --- reads ---------------------------------------------------------------------------------------


def test_list_and_get_carry_etags(redis_broker) -> None:
    resp = get(redis_broker, "/v1/roles")
    assert resp.status_code == 200
    body = resp.json
    assert resp.headers["ETag"] == f'"{body["version"]}"'
    assert [r["name"] for r in body["roles"]] == ["flux-source-reader", "batch-a", "batch-b"]
    assert body["source"] == "redis" and body["revision"] == 1
    assert any("team-*" in w for w in body["warnings"])
    one = get(redis_broker, "/v1/roles/batch-a")
    assert one.json["name"] == "batch-a" and one.json["lifetime"] == "30m"
    assert one.headers["ETag"].startswith('"') and one.headers["ETag"] != resp.headers["ETag"]
    missing = get(redis_broker, "/v1/roles/nope")
    assert missing.status_code == 404 and missing.json["error"] == "not_found"


def test_history(redis_broker) -> None:
    etag = get(redis_broker, "/v1/roles/batch-b").headers["ETag"]
    send(redis_broker, "DELETE", "/v1/roles/batch-b", **{"If-Match": etag})
    versions = get(redis_broker, "/v1/roles/_history?limit=5").json["versions"]
    assert [(v["revision"], v["operation"], v["verified"]) for v in versions] == [
        (2, "delete_role", True),
        (1, "put_table", True),
    ]
    assert versions[0]["changed_by"] == "test/ops/admin"
    assert versions[0]["previous_version"] == versions[1]["version"]
    old = get(redis_broker, "/v1/roles/_history/1").json
    assert [r["name"] for r in old["roles"]] == ["flux-source-reader", "batch-a", "batch-b"]
    assert get(redis_broker, "/v1/roles/_history/99").status_code == 404
    assert get(redis_broker, "/v1/roles/_history?limit=x").status_code == 400


# --- file mode: read-only ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PUT", "/v1/roles/batch-a", role("batch-a")),
        ("DELETE", "/v1/roles/batch-a", None),
        ("PUT", "/v1/roles", ROLES),
    ],
)
def test_file_mode_refuses_writes_saying_why(file_broker, method, path, body) -> None:
    resp = send(file_broker, method, path, body, **{"If-Match": "*"})
    assert resp.status_code == 409 and resp.json["error"] == "conflict"
    assert "roles.source is file" in resp.json["error_description"]
    assert "roles.yaml" in resp.json["error_description"]
    [rec] = events(file_broker, "roles.changed")
    assert rec["decision"] == "denied" and rec["reason"] == "read_only"


def test_file_mode_reads_and_dry_runs(file_broker, tmp_path) -> None:
    body = get(file_broker, "/v1/roles").json
    assert body["source"] == "file" and body["revision"] is None
    changed = {"roles": [*ROLES["roles"][:2]]}
    resp = send(file_broker, "PUT", "/v1/roles?dry_run=true", changed, who=AUDITOR)
    assert resp.status_code == 200 and resp.json["dry_run"] and resp.json["changed"]
    assert resp.json["diff"] == ["- batch-b"]
    assert get(file_broker, "/v1/roles").json["version"] == body["version"]


def test_file_mode_reload_shows_in_the_api(file_broker, tmp_path) -> None:
    (tmp_path / "roles.yaml").write_text(yaml.safe_dump({"roles": ROLES["roles"][:1]}))
    import os

    os.utime(tmp_path / "roles.yaml", ns=(1, 1))
    assert source(file_broker).refresh().applied
    assert [r["name"] for r in get(file_broker, "/v1/roles").json["roles"]] == [
        "flux-source-reader"
    ]
    [rec] = events(file_broker, "roles.reloaded")
    assert rec["details"]["diff"] == ["- batch-a", "- batch-b"]


# --- redis mode: edits ---------------------------------------------------------------------------


def test_create_then_replace_with_etags(redis_broker) -> None:
    new = role("new-role")
    created = send(redis_broker, "PUT", "/v1/roles/new-role", new, **{"If-None-Match": "*"})
    assert created.status_code == 201, created.json
    assert created.json["role"]["name"] == "new-role" and created.json["revision"] == 2
    assert created.json["diff"][0].startswith("+ new-role")
    etag = created.headers["ETag"]
    assert get(redis_broker, "/v1/roles/new-role").headers["ETag"] == etag
    again = send(redis_broker, "PUT", "/v1/roles/new-role", new, **{"If-None-Match": "*"})
    assert again.status_code == 412 and again.json["error"] == "precondition_failed"
    replaced = send(
        redis_broker, "PUT", "/v1/roles/new-role", role("new-role", lifetime="20m"), **{"If-Match": etag}
    )
    assert replaced.status_code == 200 and replaced.json["diff"] == ['~ new-role: lifetime "1h" -> "20m"']
    stale = send(redis_broker, "PUT", "/v1/roles/new-role", new, **{"If-Match": etag})
    assert stale.status_code == 412 and "changed since it was read" in stale.json["error_description"]
    weak = send(redis_broker, "PUT", "/v1/roles/new-role", new, **{"If-Match": "W/" + etag})
    assert weak.status_code == 412  # strong comparison only


def test_writes_need_preconditions(redis_broker) -> None:
    r = send(redis_broker, "PUT", "/v1/roles/batch-a", role("batch-a"))
    assert r.status_code == 428 and "If-Match" in r.json["error_description"]
    assert send(redis_broker, "DELETE", "/v1/roles/batch-a").status_code == 428
    assert send(redis_broker, "PUT", "/v1/roles", ROLES).status_code == 428
    assert send(redis_broker, "PUT", "/v1/roles/zzz", role("zzz"), **{"If-Match": "*"}).status_code == 412


def test_delete(redis_broker) -> None:
    etag = get(redis_broker, "/v1/roles/batch-b").headers["ETag"]
    assert send(redis_broker, "DELETE", "/v1/roles/batch-b", **{"If-Match": '"nope"'}).status_code == 412
    resp = send(redis_broker, "DELETE", "/v1/roles/batch-b", **{"If-Match": etag})
    assert resp.status_code == 200 and resp.json["deleted"] == "batch-b" and resp.json["diff"] == ["- batch-b"]
    assert get(redis_broker, "/v1/roles/batch-b").status_code == 404
    assert send(redis_broker, "DELETE", "/v1/roles/batch-b", **{"If-Match": etag}).status_code == 404


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (role("batch-a", lifetime="13h"), "roles[1] (batch-a).lifetime"),
        (role("batch-a", service_account="x@other.iam.gserviceaccount.com"), "gcp.allowed_service_accounts"),
        (role("batch-a", scopes=["cloud-platform"]), "scopes[0]"),
        (role("batch-a", subjects=[{"issuer": "prod", "namespace": "a", "service_account": "b"}]), "unknown issuer"),
        (role("batch-a", gcp={"allowed_service_accounts": ["*"]}), "gcp: unknown key"),
    ],
)
def test_invalid_role_is_refused_with_every_problem(redis_broker, body, needle) -> None:
    before = get(redis_broker, "/v1/roles").json["version"]
    resp = send(redis_broker, "PUT", "/v1/roles/batch-a", body, **{"If-Match": "*"})
    assert resp.status_code == 400 and resp.json["error"] == "invalid_request"
    assert any(needle in p for p in resp.json["problems"]), resp.json
    assert get(redis_broker, "/v1/roles").json["version"] == before
    denied = events(redis_broker, "roles.changed")[0]
    assert denied["decision"] == "denied" and denied["reason"] == "invalid_role_table"


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v1/roles/Bad_Name", role("x"), 400),
        ("/v1/roles/batch-a", role("batch-b"), 400),
        ("/v1/roles/batch-a", ["not", "a", "role"], 400),
    ],
)
def test_malformed_role_requests(redis_broker, path, body, status) -> None:
    assert send(redis_broker, "PUT", path, body, **{"If-Match": "*"}).status_code == status


def test_not_json_is_400(redis_broker) -> None:
    resp = redis_broker.client.put(
        "/v1/roles", data="roles: []", headers={**bearer(redis_broker.issuer), "If-Match": "*", "Content-Type": "application/json"}
    )
    assert resp.status_code == 400 and resp.json["error_description"] == "body is not valid JSON"
    resp = redis_broker.client.put(
        "/v1/roles", data="{}", headers={**bearer(redis_broker.issuer), "If-Match": "*", "Content-Type": "text/plain"}
    )
    assert resp.status_code == 400


def test_whole_table_put_and_dry_run(redis_broker) -> None:
    table = get(redis_broker, "/v1/roles")
    etag = table.headers["ETag"]
    pruned = {"roles": [role("flux-source-reader", sa="source-controller")]}
    dry = send(redis_broker, "PUT", "/v1/roles?dry_run=1", pruned, **{"If-Match": etag})
    assert dry.status_code == 200 and dry.json["dry_run"] and dry.json["changed"]
    assert "- batch-a" in dry.json["diff"] and "- batch-b" in dry.json["diff"]
    assert get(redis_broker, "/v1/roles").headers["ETag"] == etag  # nothing changed
    resp = send(redis_broker, "PUT", "/v1/roles", pruned, **{"If-Match": etag})
    assert resp.status_code == 200 and resp.headers["ETag"] == f'"{resp.json["version"]}"'
    assert [r["name"] for r in get(redis_broker, "/v1/roles").json["roles"]] == ["flux-source-reader"]
    assert send(redis_broker, "PUT", "/v1/roles", ROLES, **{"If-Match": etag}).status_code == 412
    same = send(redis_broker, "PUT", "/v1/roles", pruned, **{"If-Match": resp.headers["ETag"]})
    assert same.status_code == 200 and same.json["changed"] is False
    assert same.json["revision"] == resp.json["revision"]


def test_whole_table_put_is_all_or_nothing(redis_broker) -> None:
    etag = get(redis_broker, "/v1/roles").headers["ETag"]
    bad = {"roles": [role("fine-1"), role("fine-2"), role("broken", lifetime="1m")]}
    resp = send(redis_broker, "PUT", "/v1/roles", bad, **{"If-Match": etag})
    assert resp.status_code == 400 and resp.json["problems"] == ["roles[2] (broken).lifetime: 1m is below the minimum 10m"]
    assert get(redis_broker, "/v1/roles").headers["ETag"] == etag


def test_every_change_is_audited_with_a_readable_diff(redis_broker) -> None:
    etag = get(redis_broker, "/v1/roles/batch-a").headers["ETag"]
    send(redis_broker, "PUT", "/v1/roles/batch-a", role("batch-a", ns="team-*", sa="runner", lifetime="20m"), **{"If-Match": etag})
    changes = [r for r in events(redis_broker, "roles.changed") if r["decision"] == "issued"]
    assert [c["reason"] for c in changes] == ["put_role", "put_table"]
    latest = changes[0]
    assert latest["role"] == "batch-a" and latest["subject_verified"] is True
    assert latest["namespace"] == ADMIN[0] and latest["kubernetes_service_account"] == ADMIN[1]
    d = latest["details"]
    assert d["by"] == "test/ops/admin" and d["revision"] == 2
    assert d["previous_version"] == changes[1]["details"]["version"]
    assert d["version"] == get(redis_broker, "/v1/roles").json["version"]
    assert f"~ batch-a: service_account \"batch-a@{SA_DOMAIN}\" -> \"batch-a@{SA_DOMAIN}\"" not in d["diff"]
    assert '~ batch-a: lifetime "30m" -> "20m"' in d["diff"]


# --- cache purge ---------------------------------------------------------------------------------


def token_for(b, role_name: str, ns: str = "team-x", sa: str = "runner") -> dict[str, Any]:
    resp = b.client.post("/v1/token", data=exchange_form(b.issuer.token(ns, sa), audience=role_name))
    assert resp.status_code == 200, resp.json
    return resp.json


def test_role_change_purges_its_cached_tokens(redis_broker) -> None:
    token_for(redis_broker, "batch-a")
    token_for(redis_broker, "batch-b")
    assert len(redis_broker.minter.calls) == 2
    token_for(redis_broker, "batch-a")
    assert len(redis_broker.minter.calls) == 2  # cached
    etag = get(redis_broker, "/v1/roles/batch-a").headers["ETag"]
    changed = role("batch-a", ns="team-*", sa="runner", lifetime="30m", description="now documented")
    resp = send(redis_broker, "PUT", "/v1/roles/batch-a", changed, **{"If-Match": etag})
    assert resp.status_code == 200 and resp.json["purged"] == 1
    token_for(redis_broker, "batch-a")
    assert len(redis_broker.minter.calls) == 3  # purged: minted again
    token_for(redis_broker, "batch-b")
    assert len(redis_broker.minter.calls) == 3  # other roles keep theirs
    [purge] = events(redis_broker, "cache.purged")
    assert purge["role"] == "batch-a" and purge["reason"] == "role_changed"


def test_purge_endpoint_by_role_and_service_account(redis_broker) -> None:
    token_for(redis_broker, "batch-a")
    token_for(redis_broker, "batch-b")
    resp = send(redis_broker, "POST", "/v1/cache/purge", {"role": "batch-a"})
    assert resp.status_code == 200 and resp.json == {"purged": 1, "role": "batch-a"}
    resp = send(redis_broker, "POST", "/v1/cache/purge", {"service_account": f"batch-b@{SA_DOMAIN}"})
    assert resp.json == {"purged": 1, "service_account": f"batch-b@{SA_DOMAIN}"}
    assert send(redis_broker, "POST", "/v1/cache/purge", {"role": "batch-a"}).json["purged"] == 0
    token_for(redis_broker, "batch-a")
    assert len(redis_broker.minter.calls) == 3
    purges = events(redis_broker, "cache.purged")
    assert [(p["role"], p["service_account"], p["details"]["purged"]) for p in purges] == [
        ("batch-a", None, 0),
        (None, f"batch-b@{SA_DOMAIN}", 1),
        ("batch-a", None, 1),
    ]
    assert all(p["details"]["by"] == "test/ops/admin" for p in purges)


def test_purge_works_in_file_mode_too(file_broker) -> None:
    token_for(file_broker, "batch-a")
    assert send(file_broker, "POST", "/v1/cache/purge", {"role": "batch-a"}).json["purged"] == 1


@pytest.mark.parametrize(
    "body",
    [{}, {"role": "a", "service_account": "b@c"}, {"role": "Bad Name"}, {"service_account": "nope"}, {"x": 1}, []],
)
def test_purge_needs_exactly_one_valid_target(redis_broker, body) -> None:
    assert send(redis_broker, "POST", "/v1/cache/purge", body).status_code == 400


# --- explain -------------------------------------------------------------------------------------


def explain(b, body: dict[str, Any], who=ADMIN) -> dict[str, Any]:
    resp = send(b, "POST", "/v1/explain", body, who=who)
    assert resp.status_code == 200, resp.json
    return resp.json


def test_explain_subject_form(redis_broker) -> None:
    allow = explain(redis_broker, {"subject": {"issuer": "test", "namespace": "flux-system", "service_account": "source-controller"}})
    assert allow["decision"] == "allow" and allow["role"] == "flux-source-reader"
    assert allow["service_account"] == f"flux-source@{SA_DOMAIN}" and allow["lifetime_s"] == 3600
    ambiguous = explain(redis_broker, {"subject": {"issuer": "test", "namespace": "team-x", "service_account": "runner"}})
    assert ambiguous["decision"] == "deny" and ambiguous["reason"] == "ambiguous_role"
    assert ambiguous["error"] == "invalid_target"
    assert any('matches glob "team-*"' in r for r in ambiguous["reasons"])
    named = explain(redis_broker, {"subject": {"issuer": "test", "namespace": "team-x", "service_account": "runner"}, "role": "batch-b"})
    assert named["decision"] == "allow" and named["role"] == "batch-b"
    unknown = explain(redis_broker, {"subject": {"issuer": "nope", "namespace": "a", "service_account": "b"}})
    assert (unknown["decision"], unknown["reason"], unknown["error"]) == ("deny", "unknown_issuer", "invalid_request")
    bad_scope = explain(redis_broker, {"subject": {"issuer": "test", "namespace": "a", "service_account": "b"}, "scope": "a  b"})
    assert bad_scope["reason"] == "invalid_scope"


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"subject": {"issuer": "test", "namespace": "a"}, "subject_token": "x"},
        {"subject": {"issuer": "test", "subject": "oidc-style"}},
        {"subject": {"issuer": "test", "namespace": "a", "service_account": 3}},
        {"subject": "test/a/b"},
        {"subject": {"issuer": "test", "namespace": "a", "service_account": "b"}, "audience": "x"},
        {"subject_token": "x", "role": 5},
    ],
)
def test_explain_refuses_malformed_requests(redis_broker, body) -> None:
    assert send(redis_broker, "POST", "/v1/explain", body).status_code == 400


EXPLAIN_CASES = (
    "allowed",
    "allowed named",
    "wrong namespace",
    "glob match",
    "ambiguous roles",
    "unknown issuer",
    "admin-audience token",
    "disallowed service account",
    "role that does not admit",
    "role that does not exist",
    "expired token",
)


def explain_cases(issuer: LocalIssuer) -> dict[str, tuple[str, str | None]]:
    """Token and requested role for each case the issue names (and a few more)."""
    other = LocalIssuer(issuer="https://other.example/cluster")
    cases = {
        "allowed": (issuer.token(), None),
        "allowed named": (issuer.token(), "flux-source-reader"),
        "wrong namespace": (issuer.token("default", "source-controller"), None),
        "glob match": (issuer.token("team-ml", "runner"), None),
        "ambiguous roles": (issuer.token("team-x", "runner"), None),
        "unknown issuer": (other.token(), None),
        "admin-audience token": (issuer.token(audience=ADMIN_AUDIENCE), None),
        "disallowed service account": (issuer.token("flux-system", "helm-controller"), None),
        "role that does not admit": (issuer.token(), "batch-a"),
        "role that does not exist": (issuer.token(), "no-such-role"),
        "expired token": (issuer.token(iat=1, nbf=1, exp=2), None),
    }
    assert tuple(cases) == EXPLAIN_CASES
    return cases


@pytest.mark.parametrize("case", EXPLAIN_CASES)
def test_explain_agrees_with_the_token_endpoint(redis_broker, case) -> None:
    token, requested = explain_cases(redis_broker.issuer)[case]
    body: dict[str, Any] = {"subject_token": token}
    extra = {}
    if requested:
        body["role"] = requested
        extra["audience"] = requested
    said = explain(redis_broker, body)
    resp = redis_broker.client.post("/v1/token", data=exchange_form(token, **extra))
    if resp.status_code == 200:
        assert said["decision"] == "allow", said
        minted = redis_broker.minter.calls[-1]
        assert minted.service_account == said["service_account"]
    else:
        assert said["decision"] == "deny"
        assert (resp.status_code, resp.json["error"]) == (400, said["error"])
        record = next(r for r in redis_broker.audit() if r["event"] == "token.exchange")
        assert record["reason"] == said["reason"]
        assert said["reasons"][0] == resp.json["error_description"]
    assert len(redis_broker.minter.calls) <= 1  # explain itself never mints


def test_explain_never_mints_or_audits_a_token_exchange(redis_broker) -> None:
    explain(redis_broker, {"subject_token": redis_broker.issuer.token()})
    assert redis_broker.minter.calls == []
    assert not [r for r in redis_broker.audit() if r["event"] == "token.exchange"]


# --- integrity -----------------------------------------------------------------------------------


def test_table_edited_in_redis_is_refused_and_recoverable_by_whole_put(redis_broker) -> None:
    b = redis_broker
    prefix = b.settings.redis.key_prefix
    key = f"{prefix}{{roles}}:current"
    served = get(b, "/v1/roles")
    env = json.loads(b.redis.get(key))
    env["table"]["roles"][0]["service_account"] = f"owner@{SA_DOMAIN}"
    b.redis.set(key, json.dumps(env))
    b.redis.incr(f"{prefix}{{roles}}:revision")
    event = source(b).refresh()
    assert event is not None and event.reason == "bad_mac"
    assert get(b, "/v1/roles").json["version"] == served.json["version"]  # last good stays
    token_for(b, "flux-source-reader", "flux-system", "source-controller")
    assert b.minter.calls[-1].service_account == f"flux-source@{SA_DOMAIN}"
    alarm = events(b, "roles.reloaded")[0]
    assert (alarm["decision"], alarm["reason"]) == ("error", "bad_mac")
    # per-role edits are refused while the stored table is not the broker's ...
    etag = get(b, "/v1/roles/batch-a").headers["ETag"]
    resp = send(b, "PUT", "/v1/roles/batch-a", role("batch-a"), **{"If-Match": etag})
    assert resp.status_code == 409 and "integrity" in resp.json["error_description"]
    # ... and a whole-table write against the table this broker serves replaces it
    resp = send(b, "PUT", "/v1/roles", ROLES, **{"If-Match": served.headers["ETag"]})
    assert resp.status_code == 200 and resp.json["revision"] == 3
    assert source(b).refresh(full=True) is None


def _replica(b):
    """A second broker on ``b``'s Redis (another replica), its poller stopped like ``b``'s."""
    return roles_app(b.settings, b.redis, b.minter, io.StringIO()).test_client()


def test_reads_show_another_replicas_write_at_once(redis_broker) -> None:
    """No poll has run on the other replica: its reads still show the write, and the ETag
    they give is the one the next edit needs (no 412 from a stale read)."""
    other = _replica(redis_broker)
    admin = bearer(redis_broker.issuer)
    assert other.get("/v1/roles", headers=admin).json["revision"] == 1
    etag = get(redis_broker, "/v1/roles/batch-a").headers["ETag"]
    changed = send(redis_broker, "PUT", "/v1/roles/batch-a", role("batch-a", lifetime="20m"),
                   **{"If-Match": etag})
    assert changed.status_code == 200, changed.json
    one = other.get("/v1/roles/batch-a", headers=admin)  # a single role catches up too
    assert one.json["lifetime"] == "20m"
    assert other.get("/v1/roles", headers=admin).json["revision"] == 2
    again = other.put("/v1/roles/batch-a", json=role("batch-a", lifetime="10m"),
                      headers={**admin, "If-Match": one.headers["ETag"]})
    assert again.status_code == 200, again.json
    assert get(redis_broker, "/v1/roles").json["revision"] == 3


def test_reads_answer_the_table_in_effect_when_redis_is_down(redis_broker) -> None:
    before = get(redis_broker, "/v1/roles")
    import redis

    redis_broker.redis.connection_pool.connection_kwargs["server"].connected = False
    try:
        with pytest.raises(redis.ConnectionError):
            redis_broker.redis.get("anything")
        during = get(redis_broker, "/v1/roles")
    finally:
        redis_broker.redis.connection_pool.connection_kwargs["server"].connected = True
    assert during.status_code == 200
    assert during.headers["ETag"] == before.headers["ETag"]
    assert during.json["roles"] == before.json["roles"]


def test_dry_run_checks_a_fresh_etag(redis_broker) -> None:
    other = _replica(redis_broker)
    admin = bearer(redis_broker.issuer)
    other.get("/v1/roles", headers=admin)  # loaded at revision 1
    etag = get(redis_broker, "/v1/roles").headers["ETag"]
    send(redis_broker, "PUT", "/v1/roles", {"roles": ROLES["roles"][:2]}, **{"If-Match": etag})
    fresh = get(redis_broker, "/v1/roles").headers["ETag"]
    dry = other.put("/v1/roles?dry_run=1", json=ROLES, headers={**admin, "If-Match": fresh})
    assert dry.status_code == 200, dry.json
    assert dry.json["revision"] == 2 and dry.json["changed"]


@pytest.mark.parametrize(
    "raw",
    [
        None,  # the envelope with a MAC that is not ASCII (set below)
        b"[" * 100_000,  # nesting deeper than the JSON parser goes
    ],
)
def test_reads_survive_a_store_tampered_beyond_parsing(redis_broker, raw) -> None:
    """Garbage in the stored table is an alarm, not a 500: reads answer the last good table,
    and a whole-table write against it recovers."""
    b = redis_broker
    prefix = b.settings.redis.key_prefix
    key = f"{prefix}{{roles}}:current"
    served = get(b, "/v1/roles")
    if raw is None:
        env = json.loads(b.redis.get(key))
        env["mac"] = "é"
        raw = json.dumps(env).encode()
    b.redis.set(key, raw)
    b.redis.incr(f"{prefix}{{roles}}:revision")
    during = get(b, "/v1/roles")
    assert during.status_code == 200 and during.json["version"] == served.json["version"]
    assert get(b, "/v1/roles/batch-a").status_code == 200
    alarm = events(b, "roles.reloaded")[-1]
    assert (alarm["decision"], alarm["reason"]) == ("error", "malformed")
    resp = send(b, "PUT", "/v1/roles", ROLES, **{"If-Match": served.headers["ETag"]})
    assert resp.status_code == 200, resp.json
    assert source(b).refresh(full=True) is None
