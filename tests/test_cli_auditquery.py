"""``token-broker audit query | tail | export | report`` against a unit broker served over
loopback HTTP: every output format, paging, resuming, following, escaping, exit codes."""

from __future__ import annotations

import csv
import io
import json
import threading
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest
import yaml
from click.testing import CliRunner
from werkzeug.serving import make_server

from broker import cli_auditquery
from broker.app import create_app
from broker.cli import cli
from broker.settings import load_settings
from broker.signing import parse_signing_key
from tests.conftest import FakeMinter
from tests.support import (
    ADMIN_AUDIENCE,
    AUDIT_SIGNING_KEY,
    CACHE_KEY,
    broker_config,
    exchange_form,
    free_port,
)

HOSTILE_UA = "evil\x1b[2J\x1b]0;owned\x07=cmd|' /C calc'!A0"


class Served:
    def __init__(self, tmp_path, issuer) -> None:
        path = broker_config(tmp_path, issuer)
        cfg = yaml.safe_load(path.read_text())
        cfg["access"].update(auditors=["test/audit/reader"], admins=["test/ops/admin"])
        path.write_text(yaml.safe_dump(cfg))
        self.app = create_app(load_settings(path), redis_client=fakeredis.FakeRedis(),
                              minter=FakeMinter(), audit_out=io.StringIO(),
                              env={"BROKER_CACHE_KEYS": CACHE_KEY,
                                   "BROKER_AUDIT_SIGNING_KEY": AUDIT_SIGNING_KEY})
        self.issuer = issuer
        self.server = make_server("127.0.0.1", free_port(), self.app, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.port}"
        token = tmp_path / "auditor.jwt"
        token.write_text(issuer.token("audit", "reader", audience=ADMIN_AUDIENCE) + "\n")
        other = tmp_path / "admin.jwt"
        other.write_text(issuer.token("ops", "admin", audience=ADMIN_AUDIENCE))
        self.env = {"TOKEN_BROKER_SERVER": self.url, "TOKEN_BROKER_TOKEN_FILE": str(token)}
        self.admin_token = str(other)

    def traffic(self, n: int = 3, ua: str = "flux/1") -> None:
        client = self.app.test_client()
        for _ in range(n):
            client.post("/v1/token", data=exchange_form(self.issuer.token()),
                        headers={"User-Agent": ua})
            client.post("/v1/token", data=exchange_form(self.issuer.token("team-y", "runner")))

    def records(self, **filters: str) -> list[dict[str, Any]]:
        """Truth, straight from the API."""
        client, out, cursor = self.app.test_client(), [], None
        auth = {"Authorization": "Bearer " + self.issuer.token("audit", "reader",
                                                               audience=ADMIN_AUDIENCE)}
        while True:
            params = {"cursor": cursor} if cursor else {**filters, "limit": "1000"}
            body = client.get("/v1/audit/events", query_string=params, headers=auth).json
            out.extend(body["events"])
            cursor = body["next_cursor"]
            if not cursor:
                return out

    def run(self, *args: str, env: dict[str, str] | None = None) -> Any:
        return CliRunner().invoke(cli, ["audit", *args], env=env or self.env,
                                  catch_exceptions=False)

    def close(self) -> None:
        self.server.shutdown()
        self.thread.join(5)


@pytest.fixture
def served(tmp_path, issuer) -> Iterator[Served]:
    s = Served(tmp_path, issuer)
    try:
        yield s
    finally:
        s.close()


FILTER = ("--role", "flux-source-reader", "--decision", "issued")


@pytest.mark.parametrize("fmt", ["table", "json", "ndjson", "csv"])
def test_query_in_every_format_gives_the_matching_records(served, fmt):
    served.traffic(4)
    want = [r["id"] for r in served.records(role="flux-source-reader", decision="issued")]
    res = served.run("query", *FILTER, "--output", fmt, "--page-size", "3")
    assert res.exit_code == 0, res.output
    out = res.stdout
    if fmt == "json":
        got = [r["id"] for r in json.loads(out)]
    elif fmt == "ndjson":
        got = [json.loads(x)["id"] for x in out.splitlines()]
    elif fmt == "csv":
        got = [row["id"] for row in csv.DictReader(io.StringIO(out))]
    else:
        lines = out.splitlines()
        assert lines[0].startswith("TIME") and len(lines) == len(want) + 1
        assert all("flux-source-reader" in line for line in lines[1:])
        return
    assert got == want and len(want) == 4


def test_query_limit_then_continue_with_the_cursor(served):
    served.traffic(4)
    first = served.run("query", "--event", "token.exchange", "--limit", "5", "--page-size",
                       "2", "-o", "ndjson")
    assert first.exit_code == 0
    ids = [json.loads(x)["id"] for x in first.stdout.splitlines()]
    cursor = first.stderr.strip().rsplit(" ", 1)[1]
    assert len(ids) == 5 and "continue with --cursor" in first.stderr
    rest = served.run("query", "--cursor", cursor, "--limit", "0", "-o", "ndjson")
    ids += [json.loads(x)["id"] for x in rest.stdout.splitlines()]
    assert ids == [r["id"] for r in served.records(event="token.exchange")]


def test_hostile_text_is_escaped_in_table_and_csv(served):
    served.traffic(1, ua=HOSTILE_UA)
    table = served.run("query", "--role", "flux-source-reader").stdout
    assert "\x1b" not in table and "\x07" not in table and "\\x1b[2J" in table
    rows = list(csv.DictReader(io.StringIO(served.run("query", "--role", "flux-source-reader",
                                                      "-o", "csv").stdout)))
    assert rows[0]["user_agent"].startswith("evil\\x1b") and "\x1b" not in rows[0]["user_agent"]
    served.traffic(1, ua="=HYPERLINK(\"http://x\")")
    rows = list(csv.DictReader(io.StringIO(served.run("query", "--role", "flux-source-reader",
                                                      "-o", "csv", "--limit", "1").stdout)))
    assert rows[0]["user_agent"].startswith("'=")


def test_not_an_auditor_exits_1_and_no_token_exits_2(served):
    res = served.run("query", env={**served.env, "TOKEN_BROKER_TOKEN_FILE": served.admin_token})
    assert res.exit_code == 1 and "not listed in access.auditors" in res.stderr
    res = served.run("query", env={"TOKEN_BROKER_SERVER": served.url})
    assert res.exit_code == 2


def test_export_writes_ndjson_that_verifies_offline(served, tmp_path):
    served.traffic(5)
    res = served.run("export", "--since", "1h")
    assert res.exit_code == 0, res.stderr
    lines = res.stdout.splitlines()
    assert [json.loads(x)["id"] for x in lines] == [
        r["id"] for r in served.records(order="asc")][: len(lines)]
    assert "exported" in res.stderr and "done" in res.stderr
    path = tmp_path / "export.ndjson"
    path.write_text(res.stdout)
    key = parse_signing_key(AUDIT_SIGNING_KEY, source="t").public.b64
    verify = CliRunner().invoke(cli, ["audit", "verify", "--file", str(path), "--public-key", key])
    assert verify.exit_code == 0, verify.output


def test_export_resumes_where_it_was_interrupted(served, monkeypatch):
    served.traffic(5)
    real, calls = cli_auditquery._page, [0]

    def flaky(client, params):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return real(client, params)

    monkeypatch.setattr(cli_auditquery, "_page", flaky)
    first = served.run("export", "--since", "1h", "--page-size", "3", "--event", "token.exchange")
    assert first.exit_code == 130 and "interrupted after 6 record(s)" in first.stderr
    cursor = first.stderr.strip().rsplit("--cursor ", 1)[1]
    monkeypatch.undo()
    served.traffic(1)  # stored after the export began: beyond its window
    rest = served.run("export", "--cursor", cursor, "--page-size", "3")
    assert rest.exit_code == 0
    ids = [json.loads(x)["id"] for x in (first.stdout + rest.stdout).splitlines()]
    want = [r["id"] for r in served.records(event="token.exchange", order="asc")]
    assert ids == want[:10] and len(want) == 12


def test_export_needs_a_start(served):
    assert served.run("export").exit_code == 2


def test_tail_prints_the_newest_oldest_first(served):
    served.traffic(3)
    res = served.run("tail", "-n", "3", "--event", "token.exchange", "-o", "ndjson")
    got = [json.loads(x)["id"] for x in res.stdout.splitlines()]
    assert got == [r["id"] for r in served.records(event="token.exchange")][:3][::-1]


def test_tail_follow_prints_new_records_and_stops_after_max_events(served):
    served.traffic(1)
    timer = threading.Timer(0.5, served.traffic, kwargs={"n": 2})
    timer.start()
    res = served.run("tail", "-n", "0", "-f", "--event", "token.exchange", "--max-events", "4",
                     "--wait", "10", "-o", "ndjson")
    timer.join()
    assert res.exit_code == 0, res.stderr
    got = [json.loads(x)["id"] for x in res.stdout.splitlines()]
    assert got == [r["id"] for r in served.records(event="token.exchange", order="asc")][2:6]


@pytest.mark.parametrize("fmt", ["table", "json"])
def test_report(served, fmt):
    served.traffic(2)
    res = served.run("report", "--since", "7d", "-o", fmt)
    assert res.exit_code == 0, res.stderr
    if fmt == "json":
        body = json.loads(res.stdout)
        assert body["totals"]["issued"] == 4 and body["roles_never_used"] == ["batch-b"]
    else:
        assert "Roles never used (1 of 3" in res.stdout and "batch-b" in res.stdout
        assert "flux-source-reader" in res.stdout


def test_bad_time_option_is_a_usage_error(served):
    res = served.run("query", "--since", "yesterday-ish")
    assert res.exit_code == 2 and "neither an RFC 3339 time nor a duration" in res.output
