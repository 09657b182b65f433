"""The CLI's HTTP side: ``--server`` / ``--token-file`` options, one client, exit codes.

Exit codes of every remote command: 0 done; 1 refused or failed (the broker's error is
printed); 2 bad usage or configuration (click's own usage errors are 2 as well); 3 the broker is
unreachable or temporarily unavailable (retry later).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import click
import requests

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3

F = TypeVar("F", bound=Callable[..., Any])


class CliFailure(click.ClickException):
    """A failure with its exit code; printed as ``error: ...`` on stderr."""

    def __init__(self, message: str, exit_code: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        # click >= 8.5 declares exit_code a ClassVar; an instance value still wins at runtime.
        setattr(self, "exit_code", exit_code)  # noqa: B010

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"error: {self.message}", err=True)


def server_options(f: F) -> F:
    """``--server``, ``--token-file`` and ``--timeout`` for a remote command."""
    f = click.option(
        "--timeout", default=30.0, show_default=True, help="Seconds to wait for the broker."
    )(f)
    f = click.option(
        "--token-file",
        envvar="TOKEN_BROKER_TOKEN_FILE",
        required=True,
        type=click.Path(dir_okay=False, path_type=Path),
        help="A JWT for access.audience of a listed admin or auditor [env TOKEN_BROKER_TOKEN_FILE]",
    )(f)
    f = click.option(
        "--server",
        envvar="TOKEN_BROKER_SERVER",
        required=True,
        help="Broker URL, e.g. https://token-broker.example.com [env TOKEN_BROKER_SERVER]",
    )(f)
    return f


@dataclass
class ApiClient:
    """Calls the broker's admin API with a bearer token; turns failures into exit codes."""

    server: str
    token: str = field(repr=False)
    timeout: float = 30.0

    @classmethod
    def from_options(cls, server: str, token_file: Path, timeout: float = 30.0) -> ApiClient:
        """Read the token file (exit 2 when unreadable or empty)."""
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or type(exc).__name__
            raise CliFailure(f"cannot read {token_file}: {reason}", EXIT_USAGE) from exc
        if not token:
            raise CliFailure(f"{token_file} is empty", EXIT_USAGE)
        if not server.startswith(("http://", "https://")):
            raise CliFailure(f"--server {server!r} is not an http(s) URL", EXIT_USAGE)
        return cls(server.rstrip("/"), token, timeout)

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        accept: tuple[int, ...] = (200,),
    ) -> requests.Response:
        """One call; a status outside ``accept`` raises :class:`CliFailure` with the broker's
        error and the right exit code."""
        url = self.server + path
        all_headers = {"Authorization": f"Bearer {self.token}", **(headers or {})}
        try:
            resp = requests.request(
                method,
                url,
                json=json,
                headers=all_headers,
                params=params,
                timeout=self.timeout,
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            raise CliFailure(f"cannot reach {url}: {type(exc).__name__}", EXIT_UNAVAILABLE) from exc
        if resp.status_code in accept:
            return resp
        raise self.failure(resp)

    @staticmethod
    def failure(resp: requests.Response) -> CliFailure:
        """The :class:`CliFailure` for an error response."""
        try:
            body = resp.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            body = {}
        error = body.get("error") or f"HTTP {resp.status_code}"
        lines = [f"{error}: {body.get('error_description') or resp.reason}"]
        lines.extend(f"  - {p}" for p in body.get("problems") or ())
        if body.get("request_id"):
            lines.append(f"(request_id {body['request_id']})")
        unavailable = resp.status_code == 429 or resp.status_code >= 500
        if unavailable and resp.headers.get("Retry-After"):
            lines.append(f"retry after {resp.headers['Retry-After']}s")
        return CliFailure("\n".join(lines), EXIT_UNAVAILABLE if unavailable else EXIT_REFUSED)
