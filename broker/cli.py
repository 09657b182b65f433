"""The ``token-broker`` command line."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from broker.cli_audit import audit as audit_group
from broker.cli_roles import cache as cache_group
from broker.cli_roles import roles as roles_group
from broker.errors import ConfigError


def _fail(exc: ConfigError) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(2)


@click.group()
@click.version_option(package_name="token-broker")
def cli() -> None:
    """token-broker: Kubernetes service-account JWT in, short-lived GCP access token out."""


@cli.command()
@click.option("--config", "config_path", default="config/broker.yaml", show_default=True)
@click.option("--check", is_flag=True, help="Validate the configuration and exit.")
def serve(config_path: str, check: bool) -> None:
    """Run the broker under gunicorn (gthread workers)."""
    _multiprocess_metrics()
    from broker.app import check_startup
    from broker.settings import load_settings

    try:
        settings = load_settings(config_path)
        check_startup(settings, os.environ)
    except ConfigError as exc:
        _fail(exc)
        return
    if check:
        click.echo(f"{config_path}: OK")
        return
    from broker.server import serve as run

    run(config_path, settings)


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # not imported from broker.metrics: see below


def _multiprocess_metrics() -> None:
    """Give gunicorn workers a shared metrics directory; must run before prometheus_client loads."""
    import tempfile

    if not os.environ.get(MULTIPROC_ENV):
        os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="token-broker-metrics-")
    else:
        for stale in Path(os.environ[MULTIPROC_ENV]).glob("*.db"):
            stale.unlink()


@cli.command()
@click.option("--bind", default="127.0.0.1:8085", show_default=True, help="HOST:PORT")
def emulator(bind: str) -> None:
    """Serve the local IAM Credentials emulator (for dev, compose and tests)."""
    from broker.emulator import serve_emulator

    host, _, port = bind.rpartition(":")
    click.echo(f"IAM Credentials emulator on http://{bind}", err=True)
    serve_emulator(host or "127.0.0.1", int(port))


@cli.command()
@click.option("--bind", default="127.0.0.1:8080", show_default=True, help="HOST:PORT")
def dev(bind: str) -> None:
    """Run everything in one process: embedded store, IAM emulator, a local issuer."""
    from broker import dev as devmode

    try:
        devmode.run(bind)
    except OSError as exc:
        click.echo(f"error: cannot serve on {bind}: {exc.strerror or exc}", err=True)
        sys.exit(2)


@cli.command()
@click.option("--server", envvar="TOKEN_BROKER_SERVER", required=True,
              help="Broker URL, e.g. https://token-broker.example.com [env TOKEN_BROKER_SERVER]")
@click.option("--token-file", envvar="TOKEN_BROKER_TOKEN_FILE", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="The subject token, e.g. a projected service-account token file "
              "[env TOKEN_BROKER_TOKEN_FILE]")
@click.option("--role", default=None,
              help="Role to assume (default: the one role that admits you).")
@click.option("--output", type=click.Choice(["token", "json"]), default="token", show_default=True)
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for the broker.")
def token(server: str, token_file: Path, role: str | None, output: str, timeout: float) -> None:
    """Exchange a service-account token for a GCP access token and print it.

    Exit codes: 0 issued; 1 refused (the broker's error is printed; also IAM refusing the
    broker, 502: an operator must act); 2 bad usage or unreadable token file; 3 broker
    unreachable, rate-limited or temporarily unavailable (retry later).
    """
    import json

    import requests

    if not server.lower().startswith(("http://", "https://")):
        click.echo(f"error: --server must be an http:// or https:// URL, not {server!r}", err=True)
        sys.exit(2)
    try:
        subject = token_file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        click.echo(f"error: cannot read {token_file}: {exc.strerror}", err=True)
        sys.exit(2)
    except UnicodeDecodeError:
        click.echo(f"error: {token_file} is not a token (not UTF-8 text)", err=True)
        sys.exit(2)
    form = {
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "requested_token_type": "urn:ietf:params:oauth:token-type:access_token",
        "subject_token": subject,
    }
    if role:
        form["audience"] = role
    url = server.rstrip("/") + "/v1/token"
    try:
        resp = requests.post(url, data=form, timeout=timeout, allow_redirects=False)
    except requests.RequestException as exc:
        click.echo(f"error: cannot reach {url}: {type(exc).__name__}", err=True)
        sys.exit(3)
    try:
        body = resp.json()
    except ValueError:
        body = {}
    if resp.status_code == 200 and isinstance(body, dict) and "access_token" in body:
        click.echo(json.dumps(body) if output == "json" else body["access_token"])
        return
    error = body.get("error", f"HTTP {resp.status_code}") if isinstance(body, dict) else "?"
    desc = body.get("error_description", "") if isinstance(body, dict) else ""
    rid = body.get("request_id", "") if isinstance(body, dict) else ""
    click.echo(f"error: {error}: {desc}" + (f" (request_id {rid})" if rid else ""), err=True)
    # The broker's own 502 (IAM refused, its credentials failed) needs a fix, not a retry; a
    # proxy's 502 without the broker's JSON error is retried like any other 5xx.
    needs_fix = resp.status_code == 502 and error == "server_error"
    if resp.status_code == 429 or (resp.status_code >= 500 and not needs_fix):
        retry = resp.headers.get("Retry-After")
        if retry:
            click.echo(f"retry after {retry}s", err=True)
        sys.exit(3)
    sys.exit(1)


@cli.command()
def keygen() -> None:
    """Print a fresh base64 32-byte cache key (for BROKER_CACHE_KEYS)."""
    from broker.cache import CacheKeys

    click.echo(CacheKeys.generate())


cli.add_command(audit_group)
cli.add_command(roles_group)
cli.add_command(cache_group)


def main() -> None:
    cli(prog_name="token-broker")


if __name__ == "__main__":
    main()
