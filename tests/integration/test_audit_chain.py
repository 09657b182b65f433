"""The audit chain end to end: 2 broker processes x 2 gunicorn workers on real Redis (DB 12).

Mixed traffic leaves one record per request (folded denials counted); every writer's chain
verifies; each tampering done straight in Redis is found at the right record by the API, and
offline verification of an export agrees; no token is anywhere in Redis or in the logs.
"""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import requests
import yaml
from click.testing import CliRunner

from broker.auditstore import AuditKeys, AuditStore, LiveVerifier
from broker.auditverify import verify_records
from broker.cli import cli
from broker.signing import KeyRing, parse_signing_key
from tests import audit_tamper as T
from tests.integration.conftest import run_broker
from tests.support import ADMIN_AUDIENCE, AUDIT_SIGNING_KEY, broker_config, exchange_form

pytestmark = pytest.mark.integration

RING = KeyRing([parse_signing_key(AUDIT_SIGNING_KEY, source="test").public])


@pytest.fixture
def db12(redis_url):
    url = redis_url.rsplit("/", 1)[0] + "/12"
    client = redis.Redis.from_url(url)
    prefix = f"tba-{uuid.uuid4().hex[:8]}:"
    yield url, client, prefix
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        client.delete(key)


def config_for(tmp_path, issuer, url, prefix, emulator) -> Path:
    path = broker_config(tmp_path, issuer, redis_url=url, iam_endpoint=emulator.url, prefix=prefix)
    cfg = yaml.safe_load(path.read_text())
    cfg["access"]["auditors"] = ["test/audit/reader"]
    cfg["audit"] = {"checkpoint_every": 7}
    path.write_text(yaml.safe_dump(cfg))
    return path


def everything_in(client: redis.Redis) -> list[bytes]:
    """Every key and value in the database, whatever its type (nothing here is compressed)."""
    out: list[bytes] = []
    for key in client.scan_iter(count=1000):
        out.append(key)
        kind = client.type(key)
        if kind == b"string":
            out.append(client.get(key) or b"")
        elif kind == b"hash":
            out.extend(k + b"=" + v for k, v in client.hgetall(key).items())
        elif kind == b"stream":
            out.extend(v for _, f in client.xrange(key) for v in f.values())
        elif kind == b"list":
            out.extend(client.lrange(key, 0, -1))
        elif kind == b"set":
            out.extend(client.smembers(key))
        elif kind == b"zset":
            out.extend(m for m, _ in client.zrange(key, 0, -1, withscores=True))
    return out


def export(url: str, headers: dict[str, str]) -> list[dict]:
    rows, cursor = [], None
    while True:
        params = {"limit": "50", **({"cursor": cursor} if cursor else {})}
        body = requests.get(f"{url}/v1/audit/events", params=params, headers=headers,
                            timeout=30).json()
        rows.extend(body["events"])
        cursor = body["next_cursor"]
        if not cursor:
            return rows


def test_two_brokers_two_workers_chain_tamper_and_secrets(tmp_path, issuer, emulator, db12):
    url, client, prefix = db12
    config = config_for(tmp_path, issuer, url, prefix, emulator)
    subject_tokens: list[str] = []
    access_tokens: set[str] = set()
    statuses: list[int] = []
    logs: list[str] = []

    def call(broker_url: str, form: dict[str, str]) -> None:
        with requests.Session() as s:  # a new connection each: workers race to accept it
            resp = s.post(f"{broker_url}/v1/token", data=form, timeout=30)
        statuses.append(resp.status_code)
        if resp.status_code == 200:
            access_tokens.add(resp.json()["access_token"])

    with run_broker(config) as a, run_broker(config) as b:
        forms = []
        for i in range(24):
            tok = issuer.token() if i % 3 else issuer.token("team-x", "runner")
            subject_tokens.append(tok)
            forms.append(exchange_form(tok, **({} if i % 3 else {"audience": "batch-b"})))
        for _ in range(10):  # identical garbage: folded
            forms.append(exchange_form("garbage.not.jwt"))
        for _ in range(4):  # a caller no role admits
            tok = issuer.token("elsewhere", "nobody")
            subject_tokens.append(tok)
            forms.append(exchange_form(tok))
        urls = [a.url, b.url]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda p: call(urls[p[0] % 2], p[1]), enumerate(forms)))
        # Errors: IAM refuses (502) for a role not cached yet.
        emulator.faults(fail_next=2, status=403)
        for _ in range(2):
            tok = issuer.token("team-y", "runner")
            subject_tokens.append(tok)
            call(a.url, exchange_form(tok, audience="batch-a"))
        headers = {"Authorization": f"Bearer {issuer.token('audit', 'reader', audience=ADMIN_AUDIENCE)}"}
        live = requests.get(f"{a.url}/v1/audit/verify", headers=headers, timeout=30).json()
        assert live["ok"] is True, live
        total = len(statuses)
        assert statuses.count(200) == 24 and statuses.count(502) == 2
        assert statuses.count(400) == 14  # 10 garbage + 4 unlisted
    logs.extend([a.logs(), b.logs()])

    # Brokers stopped: pending folds and final checkpoints are written.
    store = AuditStore(client, prefix=prefix)
    writers = store.writers()
    assert 2 <= len(writers) <= 4
    report = LiveVerifier(store, RING, retention_s=None).verify()
    assert report.ok, report.to_dict()
    assert all(c.final and c.unsealed == 0 for c in report.chains)
    records = [r for w in writers for r in store.chain(w)]
    exchanges = [r for r in records if r["event"] == "token.exchange"]
    assert sum(r["count"] for r in exchanges) == total == 40
    assert {r["decision"] for r in exchanges} == {"issued", "denied", "error"}
    assert any(r["count"] > 1 for r in exchanges)  # folding happened
    # stdout witnessed every stored record, checkpoints included.
    witnessed = {json.loads(line)["audit"]["hash"] for log in logs for line in log.splitlines()
                 if line.startswith('{"audit"')}
    assert {r["hash"] for r in records} <= witnessed

    # No subject token and no access token anywhere in Redis or the logs.
    blobs = everything_in(client)
    for secret in [*subject_tokens, *access_tokens, "garbage.not.jwt"]:
        needle = secret.encode()
        assert not any(needle in blob for blob in blobs)
        assert all(secret not in log for log in logs)

    keys = AuditKeys(prefix)
    victim = sorted(writers, key=lambda w: -client.xlen(keys.chain(w)))[0]
    with run_broker(config) as c:
        verify_url = f"{c.url}/v1/audit/verify"

        def api():
            return requests.get(verify_url, params={"full": "true"}, headers=headers,
                                timeout=30).json()

        def stopped_writers_export() -> list[dict]:
            # Broker c records each of these reads (audit.read) in a chain of its own.
            return [r for r in export(c.url, headers) if r["writer"] in writers]

        clean = api()
        assert clean["ok"] is True and clean["checked"] == len(records)
        offline, _ = verify_records(stopped_writers_export(), RING)
        assert offline.to_dict()["ok"] is True and offline.checked == clean["checked"]
        assert offline.sealed_through == clean["sealed_through"]

        token_file = tmp_path / "auditor.jwt"
        token_file.write_text(headers["Authorization"].split()[1])
        res = CliRunner().invoke(cli, ["audit", "verify", "--server", c.url,
                                       "--token-file", str(token_file)])
        assert res.exit_code == 0 and res.output.startswith("OK:"), res.output

        snapshot = T.entries(client, keys, victim)
        sealed = client.get(keys.sealed(victim))
        tamperings = [
            ("altered", lambda: T.change_field(client, keys, victim, 3, rehash=False,
                                               service_account="evil@x")),
            ("altered", lambda: T.change_field(client, keys, victim, 3, rehash=True, role="x")),
            ("missing", lambda: T.delete_record(client, keys, victim, 3)),
            ("inserted", lambda: T.insert_forged(client, keys, victim, 3, role="admin")),
            ("reordered", lambda: T.swap(client, keys, victim, 3, 4)),
            ("truncated", lambda: T.drop_newest(client, keys, victim, 3)),
            ("chain_gone", lambda: T.delete_chain(client, keys, victim)),
        ]
        for problem, tamper in tamperings:
            expected_id = tamper()
            body = api()
            assert body["ok"] is False, problem
            bad = body["first_bad"]
            assert (bad["problem"], bad["writer"]) == (problem, victim), bad
            if expected_id is not None:
                assert bad["id"] == expected_id, (problem, bad)
            # The sealed state is beside the chain, not in exports; and a record forged
            # straight into a chain has no index entry, so the API never returns it.
            if problem not in ("truncated", "chain_gone", "inserted"):
                offline, _ = verify_records(stopped_writers_export(), RING)
                assert offline.first_bad.to_dict() == bad
            res = CliRunner().invoke(cli, ["audit", "verify", "--server", c.url,
                                           "--token-file", str(token_file), "--full"])
            assert res.exit_code == 1 and f"TAMPERED: {problem}" in res.output
            T.rewrite(client, keys, victim, snapshot)
            client.set(keys.sealed(victim), sealed)
            assert api()["ok"] is True
        logs.append(c.logs())
    for log in logs:
        assert not any(secret in log for secret in [*subject_tokens, *access_tokens])
