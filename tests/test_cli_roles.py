"""Tests for broker.cli_roles (and broker.cli_http, broker.role_cases): offline validate and
test, and the remote commands against a unit broker served over loopback HTTP."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from werkzeug.serving import make_server

from broker.cli import cli
from broker.policy import role_table_json_schema
from tests.roles_support import ADMIN, AUDITOR, make_roles_broker, role, roles_config
from tests.support import ADMIN_AUDIENCE, ROLES, SA_DOMAIN, free_port


def run(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


# --- validate ------------------------------------------------------------------------------------


@pytest.fixture
def config(tmp_path: Path, issuer) -> Path:
    return roles_config(tmp_path, issuer)


def write_roles(path: Path, *roles: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({"roles": list(roles)}, sort_keys=False))
    return path


def test_validate_ok_with_glob_warning(tmp_path, config) -> None:
    file = write_roles(tmp_path / "r.yaml", role("a"), role("b", ns="team-*"))
    result = run("roles", "validate", str(file), "--config", str(config))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith(f"{file}:") and ": warning: roles[1] (b).subjects[0].namespace" in lines[0]
    assert lines[-1].startswith(f"{file}: 2 role(s) OK, 1 warning(s)")


def test_validate_lists_every_problem_with_its_line(tmp_path, config) -> None:
    file = write_roles(
        tmp_path / "r.yaml",
        role("a", lifetime="2m"),
        role("b", service_account="b@elsewhere.iam.gserviceaccount.com", extra=1),
    )
    result = run("roles", "validate", str(file), "--config", str(config))
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if ": error: " in line]
    assert len(errors) == 3
    text = file.read_text().splitlines()
    for line in errors:
        where, _, message = line.partition(": error: ")
        number = int(where.rsplit(":", 1)[1])
        field = message.split(":")[0].rsplit(".", 1)[1]
        assert text[number - 1].strip().startswith(f"{field}:") or text[number - 1].strip().startswith(f"- {field}:"), line
    assert "nothing would be loaded" in result.output


def test_validate_json(tmp_path, config) -> None:
    file = write_roles(tmp_path / "r.yaml", role("a", lifetime="2m"))
    result = run("roles", "validate", str(file), "--config", str(config), "-o", "json")
    assert result.exit_code == 1
    body = json.loads(result.output)
    assert body["ok"] is False and body["errors"][0]["path"] == ["roles", 0, "lifetime"]
    assert isinstance(body["errors"][0]["line"], int)


def test_validate_bad_config_is_a_usage_error(tmp_path) -> None:
    file = write_roles(tmp_path / "r.yaml", role("a"))
    result = run("roles", "validate", str(file), "--config", str(tmp_path / "none.yaml"))
    assert result.exit_code == 2 and "cannot read" in result.output


def test_validate_the_shipped_example(issuer, tmp_path) -> None:
    repo = Path(__file__).resolve().parents[1]
    cfg = tmp_path / "b.yaml"
    cfg.write_text(yaml.safe_dump({
        "issuers": [{"name": "prod-eu", "issuer": "https://k", "audiences": ["a"], "jwks_file": "k"}],
        "gcp": {"allowed_service_accounts": ["*@my-project.iam.gserviceaccount.com"]},
    }))
    result = run("roles", "validate", str(repo / "config" / "roles.yaml"), "--config", str(cfg))
    assert result.exit_code == 0 and "3 role(s) OK, 1 warning(s)" in result.output


def test_schema_command_prints_the_generated_schema() -> None:
    result = run("roles", "schema")
    assert json.loads(result.output) == role_table_json_schema()


# --- test (expected decisions) -------------------------------------------------------------------

CASES = {
    "cases": [
        {"name": "flux pulls", "subject": "test/flux-system/source-controller", "expect": "allow",
         "expect_role": "flux-source-reader"},
        {"subject": "test/team-x/runner", "expect": "deny", "expect_reason": "ambiguous_role"},
        {"subject": "test/team-x/runner", "role": "batch-b", "expect": "allow"},
        {"subject": "test/team-ml/runner", "expect": "allow", "expect_role": "batch-a"},
        {"subject": "test/default/default", "expect": "deny", "expect_reason": "no_role"},
        {"subject": "staging/a/b", "expect": "deny", "expect_reason": "unknown_issuer"},
    ]
}


def test_roles_test_passes(tmp_path, config) -> None:
    roles_file = write_roles(tmp_path / "r.yaml", *ROLES["roles"])
    cases = tmp_path / "cases.yaml"
    cases.write_text(yaml.safe_dump(CASES))
    result = run("roles", "test", str(roles_file), str(cases), "--config", str(config))
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].split() == ["RESULT", "CASE", "SUBJECT", "ROLE", "EXPECTED", "GOT"]
    assert "6 passed, 0 failed" in result.output


def test_roles_test_fails_on_a_wrong_expectation(tmp_path, config) -> None:
    roles_file = write_roles(tmp_path / "r.yaml", *ROLES["roles"])
    cases = tmp_path / "cases.yaml"
    wrong = {"cases": [*CASES["cases"], {"name": "oops", "subject": "test/team-x/runner", "expect": "allow"}]}
    cases.write_text(yaml.safe_dump(wrong))
    result = run("roles", "test", str(roles_file), str(cases), "--config", str(config))
    assert result.exit_code == 1
    assert "FAIL oops: expected allow, got deny (several roles admit" in result.output
    assert "6 passed, 1 failed" in result.output
    as_json = run("roles", "test", str(roles_file), str(cases), "--config", str(config), "-o", "json")
    body = json.loads(as_json.output)
    assert body["failed"] == 1 and body["cases"][-1]["passed"] is False


def test_roles_test_rejects_bad_inputs(tmp_path, config) -> None:
    roles_file = write_roles(tmp_path / "r.yaml", role("a", lifetime="1m"))
    cases = tmp_path / "cases.yaml"
    cases.write_text(yaml.safe_dump(CASES))
    assert run("roles", "test", str(roles_file), str(cases), "--config", str(config)).exit_code == 1
    good = write_roles(tmp_path / "g.yaml", role("a"))
    cases.write_text(yaml.safe_dump({"cases": [{"subject": "x", "expect": "maybe", "bogus": 1}]}))
    result = run("roles", "test", str(good), str(cases), "--config", str(config))
    assert result.exit_code == 2
    assert "cases[0].expect" in result.output and "cases[0].bogus: unknown key" in result.output


# --- remote commands -----------------------------------------------------------------------------


@pytest.fixture
def served(tmp_path, issuer) -> Iterator[tuple[Any, dict[str, str]]]:
    """A redis-mode unit broker on a loopback port, and the CLI env to reach it as admin."""
    b = make_roles_broker(tmp_path, issuer, source="redis")
    server = make_server("127.0.0.1", free_port(), b.app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    token = tmp_path / "admin.jwt"
    token.write_text(issuer.token(*ADMIN, audience=ADMIN_AUDIENCE) + "\n")
    env = {"TOKEN_BROKER_SERVER": f"http://127.0.0.1:{server.port}", "TOKEN_BROKER_TOKEN_FILE": str(token)}
    try:
        yield b, env
    finally:
        server.shutdown()
        thread.join(5)


def test_apply_list_get_diff_delete(tmp_path, served) -> None:
    b, env = served
    file = write_roles(tmp_path / "r.yaml", *ROLES["roles"])
    dry = run("roles", "apply", str(file), "--dry-run", env=env)
    assert dry.exit_code == 0 and "+ batch-a" in dry.output and "would apply" in dry.output
    assert run("roles", "list", "-o", "json", env=env).output.count('"name"') == 0
    applied = run("roles", "apply", str(file), env=env)
    assert applied.exit_code == 0, applied.output
    assert "applied: version" in applied.output and "revision 1" in applied.output
    listed = run("roles", "list", env=env)
    assert listed.output.splitlines()[0].split() == ["NAME", "SERVICE", "ACCOUNT", "LIFETIME", "SUBJECTS"]
    assert "batch-a" in listed.output and "test/team-*/runner" in listed.output
    assert "3 role(s)" in listed.output and "source redis, revision 1" in listed.output
    got = run("roles", "get", "batch-a", env=env)
    assert got.output.startswith('# etag "') and yaml.safe_load(got.output)["lifetime"] == "30m"
    assert run("roles", "apply", str(file), env=env).output.splitlines()[-1] == "no changes"
    # diff: one changed, one only on the broker
    write_roles(file, ROLES["roles"][0], dict(ROLES["roles"][1], lifetime="20m"))
    diff = run("roles", "diff", str(file), "--exit-code", env=env)
    assert diff.exit_code == 1
    assert '~ batch-a: lifetime "30m" -> "20m"' in diff.output
    assert "- batch-b  (only on the broker; apply --prune removes it)" in diff.output
    # apply without --prune keeps batch-b; with --prune removes it
    run("roles", "apply", str(file), env=env)
    names = [r["name"] for r in json.loads(run("roles", "list", "-o", "json", env=env).output)["roles"]]
    assert names == ["flux-source-reader", "batch-a", "batch-b"]
    pruned = run("roles", "apply", str(file), "--prune", env=env)
    assert pruned.exit_code == 0 and "- batch-b" in pruned.output
    assert run("roles", "diff", str(file), "--exit-code", env=env).output.splitlines()[-1] == "no differences"
    deleted = run("roles", "delete", "batch-a", env=env)
    assert deleted.exit_code == 0 and "deleted batch-a" in deleted.output
    assert run("roles", "get", "batch-a", env=env).exit_code == 1
    history = run("roles", "history", env=env)
    assert [row.split()[0] for row in history.output.splitlines()[1:]] == ["4", "3", "2", "1"]


def test_apply_invalid_file_changes_nothing(tmp_path, served) -> None:
    b, env = served
    file = write_roles(tmp_path / "r.yaml", *ROLES["roles"])
    run("roles", "apply", str(file), env=env)
    before = json.loads(run("roles", "list", "-o", "json", env=env).output)["version"]
    write_roles(file, role("fine"), role("broken", lifetime="1m"))
    result = run("roles", "apply", str(file), "--prune", env=env)
    assert result.exit_code == 1
    assert "roles[1] (broken).lifetime: 1m is below the minimum 10m" in result.output
    assert json.loads(run("roles", "list", "-o", "json", env=env).output)["version"] == before
    (tmp_path / "bad.yaml").write_text("roles: [")
    assert run("roles", "apply", str(tmp_path / "bad.yaml"), env=env).exit_code == 1


def test_explain_and_purge(tmp_path, served) -> None:
    b, env = served
    run("roles", "apply", str(write_roles(tmp_path / "r.yaml", *ROLES["roles"])), env=env)
    allow = run("roles", "explain", "--subject", "test/flux-system/source-controller", env=env)
    assert allow.exit_code == 0 and allow.output.startswith("allow: role flux-source-reader (allowed)")
    deny = run("roles", "explain", "--subject", "test/team-x/runner", env=env)
    assert deny.exit_code == 1 and deny.output.startswith("deny (ambiguous_role)")
    named = run("roles", "explain", "--subject", "test/team-x/runner", "--role", "batch-b", "-o", "json", env=env)
    assert json.loads(named.output)["role"] == "batch-b"
    token = tmp_path / "subject.jwt"
    token.write_text(b.issuer.token())
    by_token = run("roles", "explain", "--subject-token-file", str(token), env=env)
    assert by_token.exit_code == 0 and "flux-source-reader" in by_token.output
    assert run("roles", "explain", "--subject", "a/b/c/d", env=env).exit_code == 2
    assert run("roles", "explain", env=env).exit_code == 2
    purged = run("cache", "purge", "--role", "batch-a", env=env)
    assert purged.exit_code == 0 and purged.output.strip() == "purged 0 cached token(s) of batch-a"
    by_sa = run("cache", "purge", "--service-account", f"batch-a@{SA_DOMAIN}", "-o", "json", env=env)
    assert json.loads(by_sa.output) == {"purged": 0, "service_account": f"batch-a@{SA_DOMAIN}"}
    assert run("cache", "purge", env=env).exit_code == 2


def test_exit_codes(tmp_path, served) -> None:
    b, env = served
    auditor = tmp_path / "auditor.jwt"
    auditor.write_text(b.issuer.token(*AUDITOR, audience=ADMIN_AUDIENCE))
    file = write_roles(tmp_path / "r.yaml", *ROLES["roles"])
    refused = run("roles", "apply", str(file), env={**env, "TOKEN_BROKER_TOKEN_FILE": str(auditor)})
    assert refused.exit_code == 1 and "access_denied" in refused.output
    assert run("roles", "list", env={**env, "TOKEN_BROKER_TOKEN_FILE": str(auditor)}).exit_code == 0
    missing = run("roles", "list", env={**env, "TOKEN_BROKER_TOKEN_FILE": str(tmp_path / "nope")})
    assert missing.exit_code == 2 and "cannot read" in missing.output
    down = run("roles", "list", env={**env, "TOKEN_BROKER_SERVER": f"http://127.0.0.1:{free_port()}"})
    assert down.exit_code == 3 and "cannot reach" in down.output
    no_server = CliRunner().invoke(cli, ["roles", "list"], env={"TOKEN_BROKER_SERVER": "", "TOKEN_BROKER_TOKEN_FILE": ""})
    assert no_server.exit_code == 2
    assert run("roles", "list", env={**env, "TOKEN_BROKER_SERVER": "ftp://x"}).exit_code == 2


def test_unavailable_broker_is_exit_3(tmp_path, served) -> None:
    b, env = served
    b.redis.connection_pool.connection_kwargs["server"].connected = False
    result = run("roles", "apply", str(write_roles(tmp_path / "r.yaml", role("a"))), env=env)
    assert result.exit_code == 3, result.output
