"""Audit queries end to end: gunicorn (2 workers) on real Redis (DB 12, own prefix), with token
traffic going on during every read. Filters and cursors return exactly the matching records,
none twice, none missed, through the API and through the CLI in each output format; a follow
picks up exactly what a newest-first pass did not see; non-auditors get 401/403; every read
is itself on record; exports verify offline; the report adds up."""

from __future__ import annotations

import csv
import io
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import requests
import yaml
from click.testing import CliRunner

from broker.auditstore import AuditStore
from broker.cli import cli
from broker.signing import parse_signing_key
from tests.integration.conftest import RunningBroker, run_broker
from tests.support import ADMIN_AUDIENCE, AUDIT_SIGNING_KEY, broker_config, exchange_form

pytestmark = pytest.mark.integration

MAX_TRAFFIC = 600  # requests at most per traffic run (bounded even if a test hangs)


@pytest.fixture
def db12(redis_url):
    url = redis_url.rsplit("/", 1)[0] + "/12"
    client = redis.Redis.from_url(url)
    prefix = f"tbq-{uuid.uuid4().hex[:8]}:"
    yield url, client, prefix
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        client.delete(key)


@pytest.fixture
def broker(tmp_path, issuer, emulator, db12) -> Iterator[tuple[RunningBroker, AuditStore]]:
    url, client, prefix = db12
    path = broker_config(tmp_path, issuer, redis_url=url, iam_endpoint=emulator.url,
                         prefix=prefix)
    cfg = yaml.safe_load(path.read_text())
    cfg["access"].update(auditors=["test/audit/reader"], admins=["test/ops/admin"])
    path.write_text(yaml.safe_dump(cfg))
    with run_broker(path) as b:
        yield b, AuditStore(client, prefix=prefix)


class Traffic:
    """Token requests in a background thread (issued for two roles, refused two ways) until
    stopped."""

    def __init__(self, url: str, issuer: Any) -> None:
        self.url, self.issuer = url, issuer
        self.stop_event = threading.Event()
        self.sent = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        forms = [lambda: exchange_form(self.issuer.token()),
                 lambda: exchange_form(self.issuer.token("team-y", "runner")),
                 lambda: exchange_form(self.issuer.token("other", "x")),
                 lambda: exchange_form(f"garbage-{self.sent}")]
        with requests.Session() as s:
            while not self.stop_event.is_set() and self.sent < MAX_TRAFFIC:
                s.post(f"{self.url}/v1/token", data=forms[self.sent % 4](), timeout=30)
                self.sent += 1

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(60)


def truth(store: AuditStore, match: Callable[[dict[str, Any]], bool]) -> set[str]:
    """Ids of every record in every chain that ``match``es, read straight from Redis."""
    return {r["id"] for w in store.writers() for r in store.chain(w) if match(r)}


def auth(issuer: Any, ns: str = "audit", sa: str = "reader") -> dict[str, str]:
    return {"Authorization": f"Bearer {issuer.token(ns, sa, audience=ADMIN_AUDIENCE)}"}


def pages(url: str, headers: dict[str, str], params: dict[str, str]) -> tuple[list[dict], dict]:
    out, cursor, first = [], None, None
    while True:
        q = {"cursor": cursor, "limit": params.get("limit", "7")} if cursor else params
        resp = requests.get(f"{url}/v1/audit/events", params=q, headers=headers, timeout=30)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        first = first or body
        out.extend(body["events"])
        cursor = body["next_cursor"]
        if not cursor:
            return out, first


CASES = {
    "role+decision": ({"role": "flux-source-reader", "decision": "issued"},
                      lambda r: r.get("role") == "flux-source-reader"
                      and r.get("decision") == "issued"),
    "principal": ({"subject": "test/team-y/runner"},
                  lambda r: r.get("subject") == "system:serviceaccount:team-y:runner"),
    "denied token requests": ({"decision": "denied", "event": "token.exchange"},
                              lambda r: r.get("decision") == "denied"
                              and r.get("event") == "token.exchange"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_api_filters_and_cursors_while_writes_go_on(broker, issuer, case):
    b, store = broker
    params, match = CASES[case]
    headers = auth(issuer)
    with Traffic(b.url, issuer) as traffic:
        while traffic.sent < 40:
            threading.Event().wait(0.05)
        before = truth(store, match)
        newest_first, first = pages(b.url, headers, {**params, "limit": "7"})
        follow = first["follow_cursor"]
        while traffic.sent < 120:
            threading.Event().wait(0.05)
    final = truth(store, match)
    ids = [r["id"] for r in newest_first]
    assert len(ids) == len(set(ids))  # none twice
    assert before <= set(ids) <= final  # none missed of what was there
    assert all(match(r) for r in newest_first)
    # Following from the first page's follow cursor yields exactly the rest, once each.
    followed, _ = pages(b.url, headers, {"cursor": follow, "limit": "5"})
    fids = [r["id"] for r in followed]
    assert fids and len(fids) == len(set(fids)) and not set(fids) & set(ids)
    assert set(ids) | set(fids) == final
    # Oldest first over everything agrees too.
    oldest_first, _ = pages(b.url, headers, {**params, "order": "asc", "limit": "11"})
    assert [r["id"] for r in oldest_first] == list(reversed(ids)) + fids


def parse(fmt: str, out: str) -> list[str]:
    if fmt == "json":
        return [r["id"] for r in json.loads(out)]
    if fmt == "ndjson":
        return [json.loads(x)["id"] for x in out.splitlines()]
    if fmt == "csv":
        return [row["id"] for row in csv.DictReader(io.StringIO(out))]
    return []


@pytest.mark.parametrize("fmt", ["table", "json", "ndjson", "csv"])
def test_cli_query_in_each_format_while_writes_go_on(broker, issuer, tmp_path, fmt):
    b, store = broker
    token = tmp_path / "auditor.jwt"
    token.write_text(issuer.token("audit", "reader", audience=ADMIN_AUDIENCE))
    env = {"TOKEN_BROKER_SERVER": b.url, "TOKEN_BROKER_TOKEN_FILE": str(token)}
    params, match = CASES["role+decision"]
    with Traffic(b.url, issuer) as traffic:
        while traffic.sent < 40:
            threading.Event().wait(0.05)
        before = truth(store, match)
        res = CliRunner().invoke(cli, ["audit", "query", "--role", "flux-source-reader",
                                       "--decision", "issued", "--limit", "0", "--page-size",
                                       "4", "-o", fmt], env=env, catch_exceptions=False)
    final = truth(store, match)
    assert res.exit_code == 0, res.stderr
    if fmt == "table":
        rows = res.stdout.splitlines()[1:]
        assert len(before) <= len(rows) <= len(final)
        assert all("flux-source-reader" in row and " issued " in row for row in rows)
        return
    ids = parse(fmt, res.stdout)
    assert len(ids) == len(set(ids)) and before <= set(ids) <= final


def test_cli_export_tail_and_report(broker, issuer, tmp_path):
    b, store = broker
    token = tmp_path / "auditor.jwt"
    token.write_text(issuer.token("audit", "reader", audience=ADMIN_AUDIENCE))
    env = {"TOKEN_BROKER_SERVER": b.url, "TOKEN_BROKER_TOKEN_FILE": str(token)}

    def run(*args: str) -> Any:
        return CliRunner().invoke(cli, ["audit", *args], env=env, catch_exceptions=False)

    with Traffic(b.url, issuer) as traffic:
        while traffic.sent < 30:
            threading.Event().wait(0.05)
        before = truth(store, lambda r: True)
        exported = run("export", "--since", "1h", "--page-size", "13")
        followed = run("tail", "-n", "2", "-f", "--decision", "denied", "--max-events", "6",
                       "--wait", "10", "-o", "ndjson")
    final = truth(store, lambda r: True)
    assert exported.exit_code == 0, exported.stderr
    lines = exported.stdout.splitlines()
    ids = [json.loads(x)["id"] for x in lines]
    assert len(ids) == len(set(ids)) and before <= set(ids) <= final
    path = tmp_path / "export.ndjson"
    path.write_text(exported.stdout)
    key = parse_signing_key(AUDIT_SIGNING_KEY, source="t").public.b64
    verified = CliRunner().invoke(cli, ["audit", "verify", "--file", str(path), "--public-key",
                                        key])
    assert verified.exit_code == 0, verified.output

    assert followed.exit_code == 0, followed.stderr
    tail = [json.loads(x) for x in followed.stdout.splitlines()]
    assert len(tail) == 8 and len({r["id"] for r in tail}) == 8
    assert all(r["decision"] == "denied" for r in tail)

    res = run("report", "--since", "1d", "-o", "json")
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)
    exchanges = [r for w in store.writers() for r in store.chain(w)
                 if r["event"] == "token.exchange"]
    for decision in ("issued", "denied"):
        assert report["totals"][decision] == sum(
            r["count"] for r in exchanges if r["decision"] == decision)
    assert report["roles_never_used"] == ["batch-b"]


def test_non_auditors_are_refused_and_every_read_is_on_record(broker, issuer):
    b, store = broker
    events = f"{b.url}/v1/audit/events"
    assert requests.get(events, timeout=10).status_code == 401
    assert requests.get(events, headers={"Authorization": "Bearer x.y.z"},
                        timeout=10).status_code == 401
    assert requests.get(events, headers=auth(issuer, "ops", "admin"),
                        timeout=10).status_code == 403
    assert requests.get(f"{b.url}/v1/audit/report", headers=auth(issuer, "ops", "admin"),
                        timeout=10).status_code == 403
    ok = requests.get(events, params={"subject": "test/team-y/runner", "limit": "3"},
                      headers=auth(issuer), timeout=10)
    assert ok.status_code == 200
    reads, _ = pages(b.url, auth(issuer), {"event": "audit.read", "order": "asc"})
    seen = [(r["decision"], r["reason"], r["subject"], r["details"]["endpoint"]) for r in reads]
    assert seen[:5] == [
        ("denied", "missing_bearer", None, "events"),
        ("denied", "token_malformed", None, "events"),
        ("denied", "not_listed", "system:serviceaccount:ops:admin", "events"),
        ("denied", "not_listed", "system:serviceaccount:ops:admin", "report"),
        ("issued", "read", "system:serviceaccount:audit:reader", "events"),
    ]
    assert reads[4]["details"]["filter"] == {"subject": "test/team-y/runner", "order": "desc"}
    assert reads[4]["subject_verified"] is True and reads[4]["client_ip"] == "127.0.0.1"
    # The reads are in the chains, like everything else.
    assert {r["id"] for r in reads[:5]} <= truth(store, lambda r: r["event"] == "audit.read")
