"""``token-broker audit verify`` offline: exit codes, input forms, key forms, state file."""

from __future__ import annotations

import json
import time

import fakeredis
import pytest
from click.testing import CliRunner

from broker.audit import AuditLog, AuditRecord, rfc3339
from broker.cli import cli
from broker.signing import KeyRing, SigningKey
from tests import audit_tamper as T

KEY = SigningKey.generate()


class Log:
    def __init__(self) -> None:
        import io

        self.redis = fakeredis.FakeRedis()
        self.out = io.StringIO()
        self.log = AuditLog(self.redis, prefix="c:", out=self.out, signer=KEY, checkpoint_every=4,
                            writer="w")
        for i in range(10):
            self.log.append(AuditRecord(time=rfc3339(time.time()), request_id=str(i),
                                        event="token.exchange", decision="issued",
                                        reason="issued"))
        self.log.close()

    def export(self, path):
        rows, cursor = [], None
        while True:
            page, cursor = self.log.store.events(limit=5, cursor=cursor)
            rows.extend(page)
            if cursor is None:
                break
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path


def run(*args):
    return CliRunner().invoke(cli, ["audit", "verify", *args])


@pytest.fixture
def log():
    return Log()


def test_intact_export_exits_0(log, tmp_path):
    res = run("--file", str(log.export(tmp_path / "e.ndjson")), "--public-key", KEY.public.b64)
    assert res.exit_code == 0, res.output
    assert res.output.startswith("OK: 13 record(s) checked")


def test_tampered_export_exits_1_naming_the_record(log, tmp_path):
    bad_id = T.change_field(log.redis, log.log.store.keys, "w", 2, rehash=False, role="x")
    res = run("--file", str(log.export(tmp_path / "e.ndjson")), "--public-key", KEY.public.b64)
    assert res.exit_code == 1
    assert f"TAMPERED: altered at {bad_id}" in res.output


def test_wrong_key_is_bad_signature(log, tmp_path):
    res = run("--file", str(log.export(tmp_path / "e.ndjson")),
              "--public-key", SigningKey.generate().public.pem(), "--json")
    assert res.exit_code == 1
    assert json.loads(res.output)["first_bad"]["problem"] == "bad_signature"


def test_stdout_capture_with_log_lines_verifies(log, tmp_path):
    path = tmp_path / "stdout.log"
    path.write_text("[INFO] Booting worker\n" + log.out.getvalue() + "not json {\n")
    res = run("--file", str(path), "--public-key", KEY.public.b64)
    assert res.exit_code == 0, res.output
    assert "2 line(s) that are not audit records" in res.output


def test_saved_ndjson_pages_verify_without_notes(log, tmp_path):
    """``curl -H 'Accept: application/x-ndjson'`` pages: records, then a line of cursors."""
    lines = log.export(tmp_path / "e.ndjson").read_text().splitlines()
    pages = [*lines[:5], '{"next_cursor": "abc", "follow_cursor": null}', *lines[5:],
             '{"next_cursor": null, "follow_cursor": "def"}']
    path = tmp_path / "pages.ndjson"
    path.write_text("\n".join(pages) + "\n")
    res = run("--file", str(path), "--public-key", KEY.public.b64)
    assert res.exit_code == 0 and "not audit records" not in res.output
    assert res.output.startswith("OK: 13 record(s) checked")


def test_keys_from_the_public_key_endpoint_json_and_pem_files(log, tmp_path):
    export = log.export(tmp_path / "e.ndjson")
    (tmp_path / "keys.json").write_text(json.dumps(KeyRing([SigningKey.generate().public,
                                                            KEY.public]).to_dict()))
    (tmp_path / "key.pem").write_text(KEY.public.pem())
    for arg in (tmp_path / "keys.json", tmp_path / "key.pem"):
        assert run("--file", str(export), "--public-key", str(arg)).exit_code == 0


def test_state_file_makes_the_next_run_incremental(log, tmp_path):
    export = log.export(tmp_path / "e.ndjson")
    state = tmp_path / "state.json"
    args = ("--file", str(export), "--public-key", KEY.public.b64, "--state", str(state), "--json")
    first = json.loads(run(*args).output)
    assert first["checked"] == 13 and state.exists()
    second = json.loads(run(*args).output)
    assert second["ok"] and second["checked"] == 0 and second["covered"] == 13


@pytest.mark.parametrize("args, message", [
    ((), "exactly one of --file"),
    (("--server", "http://127.0.0.1:9"), "--server needs --token-file"),
    (("--file", "{export}"), "needs --public-key"),
    (("--file", "{export}", "--public-key", "bad key!"), "neither PEM nor base64"),
    (("--file", "{export}", "--public-key", "{key}", "--retention", "soon"), "--retention"),
])
def test_usage_errors_exit_2(log, tmp_path, args, message):
    export = str(log.export(tmp_path / "e.ndjson"))
    args = [a.format(export=export, key=KEY.public.b64) for a in args]
    res = run(*args)
    assert res.exit_code == 2 and message in res.output


def test_retention_option_checks_a_trimmed_head(log, tmp_path):
    rows = T.entries(log.redis, log.log.store.keys, "w")
    T.rewrite(log.redis, log.log.store.keys, "w", rows[4:])  # starts at the first checkpoint
    export = str(log.export(tmp_path / "e.ndjson"))
    assert run("--file", export, "--public-key", KEY.public.b64).exit_code == 0
    res = run("--file", export, "--public-key", KEY.public.b64, "--retention", "30d")
    assert res.exit_code == 1 and "missing" in res.output


def test_keygen_prints_a_usable_key():
    res = CliRunner().invoke(cli, ["audit", "keygen"])
    assert res.exit_code == 0
    from broker.signing import parse_signing_key

    key = parse_signing_key(res.output.strip().splitlines()[-1], source="t")
    assert key.key_id in res.output
