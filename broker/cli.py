"""The ``token-broker`` command line."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

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
def keygen() -> None:
    """Print a fresh base64 32-byte cache key (for BROKER_CACHE_KEYS)."""
    from broker.cache import CacheKeys

    click.echo(CacheKeys.generate())


@cli.group()
def roles() -> None:
    """Check and explain role mappings."""


@roles.command("validate")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--config", "config_path", default="config/broker.yaml", show_default=True,
              help="broker.yaml whose issuers and gcp.allowed_service_accounts apply.")
def roles_validate(file: Path, config_path: str) -> None:
    """Validate a roles.yaml offline; exit 1 on errors, print warnings for globs."""
    from broker.policy import load_role_table
    from broker.settings import load_settings

    try:
        settings = load_settings(config_path)
    except ConfigError as exc:
        _fail(exc)
        return
    try:
        table = load_role_table(
            file,
            issuers={i.name: i.kind for i in settings.issuers},
            allowed_service_accounts=settings.gcp.allowed_service_accounts,
            allow_extended_lifetime=settings.gcp.allow_extended_lifetime,
            min_remaining_s=settings.cache.min_remaining,
        )
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    for warning in table.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"{file}: {len(table.roles)} role(s) OK (digest {table.digest[:12]})")


def main() -> None:
    cli(prog_name="token-broker")


if __name__ == "__main__":
    main()
