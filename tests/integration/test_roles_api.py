"""The role API in redis mode under gunicorn (2 workers, two replicas, real Redis, the IAM
emulator): concurrent edits with one ETag, atomic apply --prune, explain agreeing with the token
endpoint, a table edited straight in Redis refused, access rules, and the audit trail."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
import yaml
from click.testing import CliRunner

from broker.cli import cli
from tests.integration.conftest import run_broker
from tests.roles_support import (
    ADMIN,
    AUDITOR,
    MAC_KEY,
    NOBODY,
    audit_lines,
    bearer,
    role,
    roles_config,
    wait_until,
    worker_revisions,
)
from tests.support import ADMIN_AUDIENCE, AUDIENCE, ROLES, SA_DOMAIN, LocalIssuer, exchange_form

pytestmark = pytest.mark.integration

WORKERS = 2
ENV = {"BROKER_ROLES_MAC_KEY": MAC_KEY}


@pytest.fixture
def prefix(redis_client) -> Iterator[str]:
    p = f"tbroles-{uuid.uuid4().hex[:8]}:"
    yield p
    for key in redis_client.scan_iter(match=f"{p}*", count=1000):
        redis_client.delete(key)


@pytest.fixture
def config(tmp_path, issuer, redis_url, emulator, prefix):
    return roles_config(
        tmp_path,
        issuer,
        source="redis",
        redis_url=redis_url,
        iam_endpoint=emulator.url,
        prefix=prefix,
        workers=WORKERS,
    )


def call(broker, method: str, path: str, who=ADMIN, body: Any = None, **headers: str):
    return requests.request(
        method,
        broker.url + path,
        json=body,
        headers={**bearer(broker.issuer, who), **headers},
        timeout=15,
    )


class Broker:
    """A running broker plus the issuer that signs its callers' tokens."""

    def __init__(self, running, issuer: LocalIssuer) -> None:
        self.url, self.issuer, self.running = running.url, issuer, running

    def logs(self) -> str:
        return self.running.logs()

    def token(self, form: dict[str, str]) -> requests.Response:
        return self.running.token(form)


def seed(b: Broker) -> dict[str, Any]:
    etag = call(b, "GET", "/v1/roles").headers["ETag"]
    resp = call(b, "PUT", "/v1/roles", body=ROLES, **{"If-Match": etag})
    assert resp.status_code == 200, resp.text
    return resp.json()


def converged(b: Broker, revision: int) -> None:
    """Every worker of ``b`` serves ``revision`` (each reports its own in /metrics)."""
    wait_until(
        lambda: worker_revisions(b.url) == [float(revision)] * WORKERS,
        f"every worker of {b.url} on revision {revision}",
    )


def test_two_replicas_concurrent_edits_and_audit(config, issuer, emulator, tmp_path) -> None:
    with run_broker(config, env=ENV) as r1, run_broker(config, env=ENV) as r2:
        a, b = Broker(r1, issuer), Broker(r2, issuer)
        first = seed(a)
        assert first["revision"] == 1
        converged(a, 1)
        converged(b, 1)  # the other replica, both its workers

        # Concurrent edits of one role with the same ETag: exactly one wins.
        etag = call(b, "GET", "/v1/roles/batch-a").headers["ETag"]

        def edit(n: int) -> int:
            body = role("batch-a", ns="team-*", sa="runner", lifetime=f"{20 + n}m")
            target = a if n % 2 else b
            return call(target, "PUT", "/v1/roles/batch-a", body=body, **{"If-Match": etag}).status_code

        with ThreadPoolExecutor(8) as pool:
            statuses = sorted(pool.map(edit, range(8)))
        assert statuses == [200] + [412] * 7
        converged(a, 2)
        converged(b, 2)

        # Concurrent whole-table writes with the same table ETag: exactly one wins.
        table_etag = call(a, "GET", "/v1/roles").headers["ETag"]

        def replace(n: int) -> int:
            body = {"roles": [*ROLES["roles"], role(f"extra-{n}")]}
            target = a if n % 2 else b
            return call(target, "PUT", "/v1/roles", body=body, **{"If-Match": table_etag}).status_code

        with ThreadPoolExecutor(6) as pool:
            assert sorted(pool.map(replace, range(6))) == [200] + [412] * 5
        converged(a, 3)  # the CLI below reads from a: a worker still on 2 would answer its old ETag
        converged(b, 3)
        names = [r["name"] for r in call(b, "GET", "/v1/roles", who=AUDITOR).json()["roles"]]
        assert len([n for n in names if n.startswith("extra-")]) == 1

        # apply --prune through the CLI is all or nothing
        token_file = tmp_path / "admin.jwt"
        token_file.write_text(issuer.token(*ADMIN, audience=ADMIN_AUDIENCE))
        env = {"TOKEN_BROKER_SERVER": a.url, "TOKEN_BROKER_TOKEN_FILE": str(token_file)}
        roles_file = tmp_path / "ops-roles.yaml"
        before = call(a, "GET", "/v1/roles").json()["version"]
        roles_file.write_text(yaml.safe_dump({"roles": [ROLES["roles"][0], role("broken", lifetime="2m")]}))
        result = CliRunner().invoke(cli, ["roles", "apply", str(roles_file), "--prune"], env=env)
        assert result.exit_code == 1 and "roles[1] (broken).lifetime" in result.output
        assert call(b, "GET", "/v1/roles").json()["version"] == before
        roles_file.write_text(yaml.safe_dump({"roles": ROLES["roles"][:2]}))
        result = CliRunner().invoke(cli, ["roles", "apply", str(roles_file), "--prune"], env=env)
        assert result.exit_code == 0, result.output
        assert "- batch-b" in result.output
        converged(b, 4)
        assert [r["name"] for r in call(b, "GET", "/v1/roles").json()["roles"]] == [
            "flux-source-reader",
            "batch-a",
        ]

        # A role change purges its cached tokens; a purge by service account too.
        def mint(target: Broker, ns: str, sa: str, aud: str) -> str:
            resp = target.token(exchange_form(issuer.token(ns, sa), audience=aud))
            assert resp.status_code == 200, resp.text
            return resp.json()["access_token"]

        t1 = mint(a, "team-x", "runner", "batch-a")
        assert mint(b, "team-x", "runner", "batch-a") == t1  # shared cache
        for target in (a, b) * 4:  # the workers of both replicas now hold t1 in their memos
            assert mint(target, "team-x", "runner", "batch-a") == t1
        resp = call(b, "POST", "/v1/cache/purge", body={"service_account": f"batch-a@{SA_DOMAIN}"})
        assert resp.json()["purged"] == 1
        # At once, on every replica and worker: the memos no longer issue t1.
        after = {mint(target, "team-x", "runner", "batch-a") for target in (a, b) * 4}
        assert len(after) == 1 and t1 not in after
        (t2,) = after
        role_etag = call(a, "GET", "/v1/roles/batch-a").headers["ETag"]
        changed = role("batch-a", ns="team-*", sa="runner", lifetime="45m")
        resp = call(a, "PUT", "/v1/roles/batch-a", body=changed, **{"If-Match": role_etag})
        assert resp.status_code == 200 and resp.json()["purged"] == 1
        converged(a, 5)  # every worker has purged: none drops the token minted next
        converged(b, 5)
        t3 = mint(b, "team-x", "runner", "batch-a")
        assert t3 not in (t1, t2)
        assert emulator.token_info(t3)["service_account"] == f"batch-a@{SA_DOMAIN}"

        # Every change and purge is in the audit log (stdout witness of the replica that did it).
        logs = a.logs() + b.logs()
        changed_records = [r for r in audit_lines(logs, "roles.changed") if r["decision"] == "issued"]
        assert sorted(r["details"]["revision"] for r in changed_records) == [1, 2, 3, 4, 5]
        assert all(r["details"]["by"] == "test/ops/admin" for r in changed_records)
        assert all(r["details"]["diff"] for r in changed_records)
        refused = [r["reason"] for r in audit_lines(logs, "roles.changed") if r["decision"] == "denied"]
        assert sorted(refused) == ["invalid_role_table"] + ["precondition_failed"] * (7 + 5)
        purges = audit_lines(logs, "cache.purged")
        assert {(p["reason"], p["role"], p["service_account"]) for p in purges} == {
            ("purged", None, f"batch-a@{SA_DOMAIN}"),
            ("role_changed", "batch-a", None),
        }
        # ... and in Redis, where auditors query it
        events = requests.get(
            f"{a.url}/v1/audit/events",
            params={"limit": "1000"},
            headers=bearer(issuer, AUDITOR),
            timeout=10,
        )
        assert events.status_code == 200, events.text
        stored = [e["event"] for e in events.json()["events"]]
        assert stored.count("cache.purged") == 2
        assert stored.count("roles.changed") == 5 + 13


def test_explain_agrees_with_the_token_endpoint(config, issuer, emulator) -> None:
    other = LocalIssuer(issuer="https://other.example/cluster")
    cases = {
        "allowed": (issuer.token(), None),
        "wrong namespace": (issuer.token("default", "source-controller"), None),
        "glob match": (issuer.token("team-ml", "runner"), None),
        "ambiguous roles": (issuer.token("team-x", "runner"), None),
        "named among ambiguous": (issuer.token("team-x", "runner"), "batch-b"),
        "unknown issuer": (other.token(), None),
        "admin-audience token": (issuer.token(audience=ADMIN_AUDIENCE), None),
        "disallowed service account": (issuer.token("flux-system", "helm-controller"), None),
        "role not admitting": (issuer.token(), "batch-a"),
    }
    with run_broker(config, env=ENV) as running:
        b = Broker(running, issuer)
        seed(b)
        converged(b, 1)
        outcomes = {}
        for name, (token, aud) in cases.items():
            body = {"subject_token": token, **({"role": aud} if aud else {})}
            said = call(b, "POST", "/v1/explain", who=AUDITOR, body=body).json()
            resp = b.token(exchange_form(token, **({"audience": aud} if aud else {})))
            if resp.status_code == 200:
                info = emulator.token_info(resp.json()["access_token"])
                assert said["decision"] == "allow", name
                assert info["service_account"] == said["service_account"], name
                outcomes[name] = "allow"
            else:
                assert said["decision"] == "deny", (name, said)
                assert resp.json()["error"] == said["error"], name
                assert resp.json()["error_description"] == said["reasons"][0], name
                outcomes[name] = said["reason"]
        assert outcomes == {
            "allowed": "allow",
            "wrong namespace": "no_role",
            "glob match": "allow",
            "ambiguous roles": "ambiguous_role",
            "named among ambiguous": "allow",
            "unknown issuer": "unknown_issuer",
            "admin-audience token": "wrong_audience",
            "disallowed service account": "no_role",
            "role not admitting": "role_not_admitted",
        }


def test_table_edited_in_redis_is_refused_and_access_rules(config, issuer, redis_client, prefix) -> None:
    with run_broker(config, env=ENV) as running:
        b = Broker(running, issuer)
        seed(b)
        converged(b, 1)
        good = call(b, "GET", "/v1/roles", who=AUDITOR)
        assert good.status_code == 200  # auditors can read

        # non-admins cannot write
        body = role("batch-a", ns="team-*", sa="runner")
        for who in (AUDITOR, NOBODY):
            assert call(b, "PUT", "/v1/roles/batch-a", who=who, body=body, **{"If-Match": "*"}).status_code == 403
        exchange_token = {"Authorization": f"Bearer {issuer.token(*ADMIN, audience=AUDIENCE)}"}
        resp = requests.put(f"{b.url}/v1/roles", json=ROLES, headers={**exchange_token, "If-Match": "*"}, timeout=5)
        assert resp.status_code == 401
        assert requests.delete(f"{b.url}/v1/roles/batch-a", timeout=5).status_code == 401

        # someone with Redis access grants themselves a broader role
        key = f"{prefix}{{roles}}:current"
        envelope = json.loads(redis_client.get(key))
        envelope["table"]["roles"][0]["service_account"] = f"project-owner@{SA_DOMAIN}"
        envelope["revision"] += 1
        redis_client.set(key, json.dumps(envelope))
        redis_client.incr(f"{prefix}{{roles}}:revision")
        alarms = wait_until(
            lambda: len(found := [r for r in audit_lines(b.logs(), "roles.reloaded") if r["reason"] == "bad_mac"]) >= WORKERS and found,
            "every worker refusing the edited table",
        )
        assert len({r["writer"] for r in alarms}) == WORKERS
        assert all(r["decision"] == "error" for r in alarms)
        assert "ALARM: role table changed outside the broker" in b.logs()
        for _ in range(6):  # the last good table stays on every worker
            assert call(b, "GET", "/v1/roles", who=AUDITOR).json()["version"] == good.json()["version"]
            resp = b.token(exchange_form(issuer.token(), audience="flux-source-reader"))
            assert resp.status_code == 200
        # per-role writes are refused until the table is replaced whole
        etag = call(b, "GET", "/v1/roles/batch-a").headers["ETag"]
        resp = call(b, "PUT", "/v1/roles/batch-a", body=body, **{"If-Match": etag})
        assert resp.status_code == 409
        resp = call(b, "PUT", "/v1/roles", body=ROLES, **{"If-Match": good.headers["ETag"]})
        assert resp.status_code == 200
        converged(b, resp.json()["revision"])
