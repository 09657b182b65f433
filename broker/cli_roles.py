"""``token-broker roles`` and ``token-broker cache``: the ops side of role mappings.

Offline (no broker needed; ``--config`` supplies issuers and gcp.allowed_service_accounts):
``roles validate FILE``, ``roles test FILE CASES``, ``roles schema``. Everything else talks to
the admin API (``--server``, ``--token-file``). Readable tables by default, ``--output json``
for scripts. Exit codes: see :mod:`broker.cli_http`; ``roles explain`` exits 1 on a deny and
``roles test`` on any failed case.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import yaml

from broker.cli_http import (
    EXIT_REFUSED,
    EXIT_USAGE,
    ApiClient,
    CliFailure,
    server_options,
)
from broker.errors import ConfigError
from broker.model import Decision
from broker.policy import Problem, RoleRules, check_role_file, load_yaml, role_table_json_schema

OUTPUT = click.option(
    "--output",
    "-o",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="Readable table, or JSON for scripts.",
)
CONFIG = click.option(
    "--config",
    "config_path",
    default="config/broker.yaml",
    show_default=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="broker.yaml whose issuers and gcp.allowed_service_accounts apply.",
)


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=False))


def _render(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain aligned table (no borders: easy to grep and to paste into a review)."""
    cells = [[str(h) for h in headers], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)


def _rules(config_path: Path) -> RoleRules:
    from broker.settings import load_settings

    try:
        return RoleRules.from_settings(load_settings(config_path))
    except ConfigError as exc:
        raise CliFailure(str(exc), EXIT_USAGE) from exc


def _read_yaml(path: Path) -> Any:
    try:
        return load_yaml(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CliFailure(f"cannot read {path}: {exc.strerror}", EXIT_USAGE) from exc
    except UnicodeDecodeError as exc:
        raise CliFailure(f"{path}: not UTF-8 text", EXIT_REFUSED) from exc
    except yaml.YAMLError as exc:
        raise CliFailure(f"{path}: not valid YAML: {exc}", EXIT_REFUSED) from exc


def _located(path: Path, p: Problem, kind: str) -> str:
    where = f"{path}:{p.line}" if p.line is not None else str(path)
    return f"{where}: {kind}: {p.message}"


def _problem_data(p: Problem) -> dict[str, Any]:
    return {"path": list(p.path), "line": p.line, "message": p.message}


@click.group("roles")
def roles() -> None:
    """Check, edit and explain role mappings."""


# --- offline -------------------------------------------------------------------------------------


@roles.command("validate")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@CONFIG
@OUTPUT
def validate(file: Path, config_path: Path, output: str) -> None:
    """Validate a roles.yaml offline: every problem with its line, role and field; warnings
    for globs. Exit 1 on any error, 2 when --config itself is unusable."""
    result = check_role_file(file, rules=_rules(config_path))
    if output == "json":
        _echo_json(
            {
                "file": str(file),
                "ok": result.ok,
                "roles": len(result.table.roles) if result.table else None,
                "version": result.table.digest if result.table else None,
                "errors": [_problem_data(p) for p in result.errors],
                "warnings": [_problem_data(p) for p in result.warnings],
            }
        )
    else:
        for p in result.errors:
            click.echo(_located(file, p, "error"))
        for p in result.warnings:
            click.echo(_located(file, p, "warning"))
        if result.table is not None:
            click.echo(
                f"{file}: {len(result.table.roles)} role(s) OK, {len(result.warnings)} "
                f"warning(s) (version {result.table.digest[:12]})"
            )
        else:
            click.echo(f"{file}: {len(result.errors)} error(s); nothing would be loaded")
    if not result.ok:
        raise SystemExit(EXIT_REFUSED)


@roles.command("test")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("cases", type=click.Path(dir_okay=False, path_type=Path))
@CONFIG
@OUTPUT
def test(file: Path, cases: Path, config_path: Path, output: str) -> None:
    """Check a roles.yaml against a table of expected decisions (for CI in the ops repo).

    Each case is decided by the token endpoint's own policy code. Exit 1 if the table is
    invalid or any case fails.
    """
    from broker.role_cases import parse_cases, run_cases

    rules = _rules(config_path)
    checked = check_role_file(file, rules=rules)
    if checked.table is None:
        for p in checked.errors:
            click.echo(_located(file, p, "error"), err=True)
        raise CliFailure(f"{file} is not a valid role table", EXIT_REFUSED)
    try:
        parsed = parse_cases(_read_yaml(cases), source=str(cases))
    except ConfigError as exc:
        raise CliFailure(str(exc), EXIT_USAGE) from exc
    results = run_cases(checked.table, parsed, rules.issuers, time.time())
    failed = [r for r in results if not r.passed]
    if output == "json":
        _echo_json(
            {
                "passed": len(results) - len(failed),
                "failed": len(failed),
                "cases": [r.to_data() for r in results],
            }
        )
    else:
        rows = [
            (
                "PASS" if r.passed else "FAIL",
                r.case.label,
                r.case.subject,
                r.case.role or "-",
                r.case.expect,
                ("allow " + r.decision.role.name)
                if r.decision.role
                else f"deny ({r.decision.reason})",
            )
            for r in results
        ]
        click.echo(_render(("RESULT", "CASE", "SUBJECT", "ROLE", "EXPECTED", "GOT"), rows))
        for r in failed:
            click.echo(f"FAIL {r.case.label}: {r.mismatch}")
            for reason in r.decision.reasons[1:]:
                click.echo(f"    {reason}")
        click.echo(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    if failed:
        raise SystemExit(EXIT_REFUSED)


def _got(decision: Decision) -> str:
    if decision.role is not None:
        return f"allow {decision.role.name}"
    return f"deny ({decision.reason})"


@roles.command("schema")
def schema() -> None:
    """Print the JSON Schema of roles.yaml (what config/roles.schema.json holds)."""
    click.echo(json.dumps(role_table_json_schema(), indent=2))


# --- through the API -----------------------------------------------------------------------------


def _client(server: str, token_file: Path, timeout: float) -> ApiClient:
    return ApiClient.from_options(server, token_file, timeout)


def _subjects(role: dict[str, Any]) -> str:
    out = []
    for s in role.get("subjects") or ():
        if "subject" in s:
            out.append(f"{s.get('issuer')}/{s['subject']}")
        else:
            out.append(f"{s.get('issuer')}/{s.get('namespace')}/{s.get('service_account')}")
    return ", ".join(out)


@roles.command("list")
@server_options
@OUTPUT
def list_roles(server: str, token_file: Path, timeout: float, output: str) -> None:
    """List the roles in effect."""
    body = _client(server, token_file, timeout).request("GET", "/v1/roles").json()
    if output == "json":
        _echo_json(body)
        return
    rows = [(r["name"], r["service_account"], r["lifetime"], _subjects(r)) for r in body["roles"]]
    click.echo(_render(("NAME", "SERVICE ACCOUNT", "LIFETIME", "SUBJECTS"), rows))
    revision = f", revision {body['revision']}" if body.get("revision") is not None else ""
    click.echo(
        f"\n{len(rows)} role(s); version {body['version'][:12]} "
        f"(source {body.get('source')}{revision})"
    )


@roles.command("get")
@click.argument("name")
@server_options
@click.option(
    "--output", "-o", type=click.Choice(["yaml", "json"]), default="yaml", show_default=True
)
def get_role(name: str, server: str, token_file: Path, timeout: float, output: str) -> None:
    """Show one role (YAML as in roles.yaml, or JSON) and its ETag."""
    resp = _client(server, token_file, timeout).request("GET", f"/v1/roles/{name}")
    body = resp.json()
    if output == "json":
        _echo_json({**body, "etag": resp.headers.get("ETag", "").strip('"')})
        return
    click.echo(f"# etag {resp.headers.get('ETag', '')}")
    click.echo(yaml.safe_dump(body, sort_keys=False).rstrip())


def _show_result(body: dict[str, Any], output: str, *, done: str) -> None:
    if output == "json":
        _echo_json(body)
        return
    for w in body.get("warnings") or ():
        click.echo(f"warning: {w}", err=True)
    lines = body.get("diff") or []
    for line in lines:
        click.echo(line)
    if not body.get("changed"):
        click.echo("no changes")
        return
    revision = f", revision {body['revision']}" if body.get("revision") is not None else ""
    purged = f"; purged {body['purged']} cached token(s)" if body.get("purged") else ""
    click.echo(f"{done}: version {body['version'][:12]}{revision}{purged}")


@roles.command("diff")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@server_options
@OUTPUT
@click.option("--exit-code", is_flag=True, help="Exit 1 when there are differences.")
def diff(
    file: Path, server: str, token_file: Path, timeout: float, output: str, exit_code: bool
) -> None:
    """What `roles apply --prune FILE` would change: + added, - only on the broker (removed by
    --prune), ~ changed. The broker validates FILE with its own rules."""
    data = _read_yaml(file)
    body = (
        _client(server, token_file, timeout)
        .request("PUT", "/v1/roles", json=data, params={"dry_run": "true"})
        .json()
    )
    if output == "json":
        _echo_json(body)
    elif not body.get("changed"):
        click.echo("no differences")
    else:
        for line in body.get("diff") or []:
            note = (
                "  (only on the broker; apply --prune removes it)" if line.startswith("-") else ""
            )
            click.echo(line + note)
    if exit_code and body.get("changed"):
        raise SystemExit(EXIT_REFUSED)


def _merge(data: Any, server_roles: list[dict[str, Any]]) -> Any:
    """FILE's roles over the broker's, by name (the broker's others kept, in their order)."""
    if not isinstance(data, dict) or not isinstance(data.get("roles"), list):
        return data  # let the broker report what is wrong with it
    mine = list(data["roles"])
    named = {r["name"]: r for r in mine if isinstance(r, dict) and isinstance(r.get("name"), str)}
    merged = [named.get(r["name"], r) for r in server_roles]
    used = {r["name"] for r in server_roles}
    merged.extend(r for r in mine if not (isinstance(r, dict) and r.get("name") in used))
    return {**data, "roles": merged}


@roles.command("apply")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True, help="Show what would change; change nothing.")
@click.option("--prune", is_flag=True, help="Also delete roles that FILE does not name.")
@server_options
@OUTPUT
def apply(
    file: Path,
    dry_run: bool,
    prune: bool,
    server: str,
    token_file: Path,
    timeout: float,
    output: str,
) -> None:
    """Make the broker's roles match FILE in one atomic write (redis source).

    Without --prune, roles on the broker that FILE does not name are kept. The write is
    conditional on the table read first: if anyone changed it meanwhile, nothing is applied
    (exit 1) and you run it again.
    """
    data = _read_yaml(file)
    api = _client(server, token_file, timeout)
    current = api.request("GET", "/v1/roles")
    etag = current.headers.get("ETag", "")
    table = data if prune else _merge(data, current.json().get("roles") or [])
    params = {"dry_run": "true"} if dry_run else None
    resp = api.request("PUT", "/v1/roles", json=table, headers={"If-Match": etag}, params=params)
    _show_result(resp.json(), output, done="would apply" if dry_run else "applied")


@roles.command("delete")
@click.argument("name")
@click.option(
    "--if-match",
    "etag",
    default=None,
    help="Delete only if the role's ETag is still this (default: the one read now).",
)
@server_options
@OUTPUT
def delete(
    name: str, etag: str | None, server: str, token_file: Path, timeout: float, output: str
) -> None:
    """Delete one role (redis source)."""
    api = _client(server, token_file, timeout)
    if etag is None:
        etag = api.request("GET", f"/v1/roles/{name}").headers.get("ETag", "")
    elif not etag.startswith('"'):
        etag = f'"{etag}"'
    resp = api.request("DELETE", f"/v1/roles/{name}", headers={"If-Match": etag})
    _show_result(resp.json(), output, done=f"deleted {name}")


@roles.command("explain")
@click.option("--subject", help="ISSUER/NAMESPACE/SERVICE_ACCOUNT (kubernetes) or ISSUER/SUBJECT.")
@click.option(
    "--subject-token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Explain a real subject token instead (verified like the token endpoint).",
)
@click.option(
    "--kind",
    type=click.Choice(["auto", "kubernetes", "oidc"]),
    default="auto",
    show_default=True,
    help="How to read --subject; auto: 3 parts kubernetes, 2 oidc.",
)
@click.option("--role", default=None, help="The role asked for (the token request's audience).")
@click.option("--scope", default=None, help="The scope the client sends (advisory).")
@server_options
@OUTPUT
def explain(
    subject: str | None,
    subject_token_file: Path | None,
    kind: str,
    role: str | None,
    scope: str | None,
    server: str,
    token_file: Path,
    timeout: float,
    output: str,
) -> None:
    """The decision the token endpoint would take for a caller, and every reason.

    Exit 0 on allow, 1 on deny.
    """
    body: dict[str, Any] = {}
    if (subject is None) == (subject_token_file is None):
        raise CliFailure("give exactly one of --subject or --subject-token-file", EXIT_USAGE)
    if subject is not None:
        body["subject"] = _subject_body(subject, kind)
    else:
        assert subject_token_file is not None
        try:
            body["subject_token"] = subject_token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise CliFailure(
                f"cannot read {subject_token_file}: {exc.strerror}", EXIT_USAGE
            ) from exc
    if role:
        body["role"] = role
    if scope:
        body["scope"] = scope
    result = _client(server, token_file, timeout).request("POST", "/v1/explain", json=body).json()
    if output == "json":
        _echo_json(result)
    else:
        head = f"allow: role {result['role']}" if result["decision"] == "allow" else "deny"
        click.echo(f"{head} ({result['reason']})")
        if result.get("service_account"):
            click.echo(
                f"  service account {result['service_account']}, lifetime "
                f"{result.get('lifetime_s')}s, scopes {' '.join(result.get('scopes') or [])}"
            )
        for reason in result.get("reasons") or []:
            click.echo(f"  - {reason}")
    if result["decision"] != "allow":
        raise SystemExit(EXIT_REFUSED)


def _subject_body(subject: str, kind: str) -> dict[str, str]:
    parts = subject.split("/")
    if kind == "oidc" or (kind == "auto" and len(parts) == 2):
        issuer, _, sub = subject.partition("/")
        if not issuer or not sub:
            raise CliFailure(f"--subject {subject!r} is not ISSUER/SUBJECT", EXIT_USAGE)
        return {"issuer": issuer, "subject": sub}
    if len(parts) != 3 or not all(parts):
        raise CliFailure(
            f"--subject {subject!r} is not ISSUER/NAMESPACE/SERVICE_ACCOUNT "
            "(use --kind oidc for a subject that contains '/')",
            EXIT_USAGE,
        )
    return {"issuer": parts[0], "namespace": parts[1], "service_account": parts[2]}


@roles.command("history")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 100))
@server_options
@OUTPUT
def history(limit: int, server: str, token_file: Path, timeout: float, output: str) -> None:
    """Recent versions of the table (redis source), newest first."""
    body = (
        _client(server, token_file, timeout)
        .request("GET", "/v1/roles/_history", params={"limit": str(limit)})
        .json()
    )
    if output == "json":
        _echo_json(body)
        return
    rows = [
        (
            v.get("revision", "?"),
            v.get("changed_at", "?"),
            v.get("changed_by", "?"),
            v.get("operation", "?"),
            (v.get("version") or "")[:12],
        )
        if v.get("verified")
        else ("?", "?", "?", "UNVERIFIED", v.get("problem", ""))
        for v in body.get("versions", [])
    ]
    click.echo(_render(("REVISION", "CHANGED AT", "BY", "OPERATION", "VERSION"), rows))


# --- cache ---------------------------------------------------------------------------------------


@click.group("cache")
def cache() -> None:
    """Manage cached GCP access tokens."""


@cache.command("purge")
@click.option("--role", default=None, help="Drop the cached tokens of this role.")
@click.option("--service-account", default=None, help="Drop cached tokens of this GCP account.")
@server_options
@OUTPUT
def purge(
    role: str | None,
    service_account: str | None,
    server: str,
    token_file: Path,
    timeout: float,
    output: str,
) -> None:
    """Drop cached tokens now (incident response); the next request mints afresh."""
    if (role is None) == (service_account is None):
        raise CliFailure("give exactly one of --role or --service-account", EXIT_USAGE)
    body = {"role": role} if role is not None else {"service_account": service_account}
    result = (
        _client(server, token_file, timeout).request("POST", "/v1/cache/purge", json=body).json()
    )
    if output == "json":
        _echo_json(result)
    else:
        click.echo(f"purged {result['purged']} cached token(s) of {role or service_account}")
