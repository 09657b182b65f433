"""``token-broker audit``: verify the audit log offline (public keys only) or through the API;
query, tail, export and report through the API (:mod:`broker.cli_auditquery`)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from broker.errors import ConfigError

EXIT_OK, EXIT_TAMPERED, EXIT_USAGE = 0, 1, 2


@click.group()
def audit() -> None:
    """Query, follow, export and review the audit log; verify it; make signing keys."""


@audit.command("keygen")
def keygen() -> None:
    """Print a new Ed25519 signing key (for BROKER_AUDIT_SIGNING_KEY) on stdout; its public key
    and key id on stderr."""
    from broker.signing import SigningKey

    key = SigningKey.generate()
    click.echo(f"public key {key.public.b64} (key id {key.key_id})", err=True)
    click.echo(key.private_b64())


@audit.command("verify")
@click.option("--file", "file_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="NDJSON export: records from GET /v1/audit/events, or the broker's stdout.")
@click.option("--public-key", "public_keys", multiple=True, metavar="KEY",
              help="Trusted public key: base64, PEM, a file holding one, or the saved JSON of "
                   "GET /v1/audit/public-key. Repeat for retired keys.")
@click.option("--server", metavar="URL", help="Verify through the broker's GET /v1/audit/verify.")
@click.option("--token-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="With --server: a JWT for access.audience of a listed auditor.")
@click.option("--state", "state_path", type=click.Path(dir_okay=False, path_type=Path),
              help="With --file: resume from the checkpoints verified last time, and save them.")
@click.option("--retention", metavar="DURATION",
              help="With --file: the broker's audit.retention, so a chain whose head is gone "
                   "is accepted only where retention removed it.")
@click.option("--full", is_flag=True, help="With --server: re-read everything.")
@click.option("--strict", is_flag=True, help="Fail on a stale unsealed tail too.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as JSON.")
def verify(
    file_path: Path | None,
    public_keys: tuple[str, ...],
    server: str | None,
    token_file: Path | None,
    state_path: Path | None,
    retention: str | None,
    full: bool,
    strict: bool,
    as_json: bool,
) -> None:
    """Check every chain: exit 0 when intact, 1 when tampering shows, 2 on usage errors."""
    if (file_path is None) == (server is None):
        _usage("give exactly one of --file (offline) or --server")
    if server is not None:
        if token_file is None:
            _usage("--server needs --token-file")
        assert token_file is not None
        report = _verify_server(server, token_file.read_text().strip(), full=full, strict=strict)
    else:
        assert file_path is not None
        if not public_keys:
            _usage("offline verification needs --public-key (GET /v1/audit/public-key)")
        report = _verify_file(file_path, public_keys, state_path, retention, strict)
    _print(report, as_json)
    sys.exit(EXIT_OK if report.get("ok") else EXIT_TAMPERED)


def _usage(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_USAGE)


def _verify_file(
    path: Path,
    key_args: tuple[str, ...],
    state_path: Path | None,
    retention: str | None,
    strict: bool,
) -> dict[str, Any]:
    import time

    from broker.auditverify import Anchor, verify_records
    from broker.settings import parse_duration
    from broker.signing import KeyRing

    try:
        ring = KeyRing(k for arg in key_args for k in _public_keys(arg))
    except ConfigError as exc:
        _usage(str(exc))
    retention_s = None
    if retention is not None:
        try:
            retention_s = parse_duration(retention)
        except ValueError as exc:
            _usage(f"--retention: {exc}")
    state: dict[str, Anchor] = {}
    if state_path is not None and state_path.exists():
        try:
            raw = json.loads(state_path.read_text())
            state = {w: Anchor.from_dict(a) for w, a in raw.get("anchors", {}).items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            _usage(f"{state_path}: not a state file written by this command")
    skipped = [0]
    records = list(_records(path, skipped))
    report, new_state = verify_records(
        records, ring, state=state, retention_s=retention_s, now=time.time(), strict=strict
    )
    if skipped[0]:
        click.echo(f"note: {skipped[0]} line(s) that are not audit records were skipped", err=True)
    if state_path is not None:
        state_path.write_text(
            json.dumps({"anchors": {w: a.to_dict() for w, a in new_state.items()}}, indent=1)
        )
    return report.to_dict()


def _public_keys(arg: str) -> list[Any]:
    """Keys from one --public-key value (see its help)."""
    from broker.signing import parse_public_key

    text, source = arg, "--public-key"
    path = Path(arg)
    if len(arg) < 4096 and path.is_file():
        text, source = path.read_text(), str(path)
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
            values = [k["public_key"] for k in data["keys"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(source, ["not the JSON of GET /v1/audit/public-key"]) from exc
        return [parse_public_key(v, source=source) for v in values]
    return [parse_public_key(text, source=source)]


def _records(path: Path, skipped: list[int]) -> Iterator[dict[str, Any]]:
    """Records of an NDJSON export: bare records, stdout lines ``{"audit": {...}}``, or saved
    API pages ``{"events": [...]}``. Other lines (logs) are counted in ``skipped``."""
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                data = json.loads(line)
            except ValueError:
                skipped[0] += 1
                continue
            if isinstance(data, dict) and isinstance(data.get("events"), list):
                yield from (e for e in data["events"] if isinstance(e, dict))
            elif isinstance(data, dict) and isinstance(data.get("audit"), dict):
                yield data["audit"]
            elif isinstance(data, dict) and "writer" in data:
                yield data
            elif isinstance(data, dict) and set(data) <= {"next_cursor", "follow_cursor"}:
                continue  # the last line of an NDJSON page from GET /v1/audit/events
            else:
                skipped[0] += 1


def _verify_server(url: str, token: str, *, full: bool, strict: bool) -> dict[str, Any]:
    import requests

    try:
        resp = requests.get(
            f"{url.rstrip('/')}/v1/audit/verify",
            params={"full": str(full).lower(), "strict": str(strict).lower()},
            headers={"Authorization": f"Bearer {token}"},
            timeout=300,
        )
    except requests.RequestException as exc:
        click.echo(f"error: {url}: {type(exc).__name__}", err=True)
        sys.exit(EXIT_USAGE)
    try:
        body = resp.json()
    except ValueError:
        body = None
    if resp.status_code != 200 or not isinstance(body, dict):
        detail = body.get("error_description") if isinstance(body, dict) else resp.reason
        click.echo(f"error: {url}: HTTP {resp.status_code}: {detail}", err=True)
        sys.exit(EXIT_USAGE)
    return body


def _print(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    sealed = report.get("sealed_through") or "nothing"
    if report.get("ok"):
        click.echo(f"OK: {report.get('checked')} record(s) checked, "
                   f"{report.get('covered', report.get('checked'))} covered; "
                   f"sealed through {sealed}")
    else:
        bad = report.get("first_bad") or {}
        click.echo(f"TAMPERED: {bad.get('problem')} at {bad.get('id') or bad.get('writer')}: "
                   f"{bad.get('detail', '')}")
        click.echo(f"{report.get('checked')} record(s) checked; sealed through {sealed}")
    for tail in report.get("unsealed", []):
        state = "stale, " if tail.get("stale") else ""
        click.echo(f"unsealed: writer {tail.get('writer')}: {tail.get('records')} record(s) "
                   f"({state}since {tail.get('since')})")


def _add_query_commands() -> None:
    from broker.cli_auditquery import export, query, report, tail

    for command in (query, tail, export, report):
        audit.add_command(command)


_add_query_commands()
