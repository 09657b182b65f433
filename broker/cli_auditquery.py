"""``token-broker audit query | tail | export | report``: the auditors' commands, talking to the
broker's audit API (``--server``, ``--token-file``, or env ``TOKEN_BROKER_SERVER`` /
``TOKEN_BROKER_TOKEN_FILE``). Exit codes as every remote command (:mod:`broker.cli_http`), and
130 when interrupted.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from broker.auditformat import FORMATS, RecordWriter, json_line, report_lines, safe_text
from broker.cli_http import EXIT_USAGE, ApiClient, CliFailure, server_options

F = TypeVar("F", bound=Callable[..., Any])
EVENTS_PATH = "/v1/audit/events"
EXIT_INTERRUPTED = 130
MAX_WAIT_S = 25


def _when(value: str | None, name: str) -> str | None:
    """An RFC 3339 time, or a duration before now (``24h``, ``30d``), as RFC 3339."""
    if not value:
        return None
    from broker.auditchain import parse_time, rfc3339
    from broker.settings import parse_duration

    if parse_time(value) is not None:
        return value
    try:
        return rfc3339(time.time() - parse_duration(value))
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is neither an RFC 3339 time nor a duration such as 24h or 30d",
            param_hint=name) from None


def filter_options(f: F) -> F:
    """The filters of ``GET /v1/audit/events``."""
    for opt in reversed((
        click.option("--since", help="RFC 3339 time, or a duration back from now (24h, 30d)."),
        click.option("--until", help="RFC 3339 time, or a duration back from now."),
        click.option("--subject", help="A token's sub (system:serviceaccount:NS:SA), or "
                                       "ISSUER/NS/SA with the issuer's configured name."),
        click.option("--role", help="Role name."),
        click.option("--service-account", help="GCP service account email."),
        click.option("--decision", type=click.Choice(["issued", "denied", "error"])),
        click.option("--event", help="token.exchange, audit.read, roles.changed, ..."),
    )):
        f = opt(f)
    return f


def _filters(kw: dict[str, Any]) -> dict[str, str]:
    params = {
        "since": _when(kw.get("since"), "--since"),
        "until": _when(kw.get("until"), "--until"),
        "subject": kw.get("subject"),
        "role": kw.get("role"),
        "service_account": kw.get("service_account"),
        "decision": kw.get("decision"),
        "event": kw.get("event"),
    }
    return {k: v for k, v in params.items() if v}


def _client(server: str, token_file: Path, timeout: float) -> ApiClient:
    return ApiClient.from_options(server, token_file, timeout)


def _page(client: ApiClient, params: dict[str, str]) -> dict[str, Any]:
    body = client.request("GET", EVENTS_PATH, params=params).json()
    if not isinstance(body, dict) or not isinstance(body.get("events"), list):
        raise CliFailure("the broker's answer is not an events page")
    return body


# -- query -------------------------------------------------------------------------------------


@click.command("query")
@server_options
@filter_options
@click.option("--order", type=click.Choice(["desc", "asc"]), default="desc", show_default=True,
              help="desc: newest first.")
@click.option("--limit", type=click.IntRange(min=0), default=100, show_default=True,
              help="At most this many records; 0 for all.")
@click.option("--page-size", type=click.IntRange(1, 1000), default=500, show_default=True)
@click.option("--output", "-o", "fmt", type=click.Choice(FORMATS), default="table",
              show_default=True)
@click.option("--cursor", help="Continue a query where an earlier one stopped.")
def query(server: str, token_file: Path, timeout: float, order: str, limit: int,
          page_size: int, fmt: str, cursor: str | None, **filters: Any) -> None:
    """Print the audit records matching the filters."""
    client = _client(server, token_file, timeout)
    params = {"cursor": cursor} if cursor else {**_filters(filters), "order": order}
    out = RecordWriter(fmt, sys.stdout)
    out.begin()
    count = 0
    while True:
        want = page_size if not limit else min(page_size, limit - count)
        body = _page(client, {**params, "limit": str(want)})
        for event in body["events"]:
            out.write(event)
        count += len(body["events"])
        cursor = body.get("next_cursor")
        if not cursor or (limit and count >= limit):
            break
        params = {"cursor": cursor}
    out.end()
    if cursor:
        click.echo(f"more records follow; continue with --cursor {cursor}", err=True)


# -- tail --------------------------------------------------------------------------------------


@click.command("tail")
@server_options
@filter_options
@click.option("-n", "--lines", type=click.IntRange(0, 1000), default=10, show_default=True,
              help="Print the last N records first.")
@click.option("-f", "--follow", is_flag=True, help="Then print new records as they are stored.")
@click.option("--output", "-o", "fmt", type=click.Choice(("table", "ndjson", "csv")),
              default="table", show_default=True)
@click.option("--wait", type=click.IntRange(1, MAX_WAIT_S), default=MAX_WAIT_S,
              show_default=True, help="Seconds each poll may wait on the broker for news.")
@click.option("--max-events", type=click.IntRange(min=1),
              help="With --follow: stop after this many new records.")
def tail(server: str, token_file: Path, timeout: float, lines: int, follow: bool, fmt: str,
         wait: int, max_events: int | None, **filters: Any) -> None:
    """Print the newest records, and with --follow keep printing new ones (Ctrl-C stops)."""
    client = _client(server, token_file, max(timeout, wait + 10.0))
    out = RecordWriter(fmt, sys.stdout)
    out.begin()
    params = {**_filters(filters), "order": "desc", "limit": str(max(lines, 1))}
    body = _page(client, params)
    for event in reversed(body["events"][:lines]):
        out.write(event)
    out.end()
    cursor = body.get("follow_cursor")
    if not follow:
        return
    if not cursor:
        raise CliFailure("--follow cannot be combined with --until", EXIT_USAGE)
    seen = 0
    try:
        while max_events is None or seen < max_events:
            started = time.monotonic()
            want = 100 if max_events is None else min(100, max_events - seen)
            # The token file is read again for every poll: projected tokens are rotated.
            client = _client(server, token_file, max(timeout, wait + 10.0))
            body = _page(client, {"cursor": cursor, "wait": str(wait), "limit": str(want)})
            for event in body["events"]:
                out.write(event)
            out.end()
            seen += len(body["events"])
            cursor = body.get("follow_cursor") or cursor
            if not body["events"] and time.monotonic() - started < 1.0:
                time.sleep(1.0)  # the broker had no thread free to wait: poll gently
    except KeyboardInterrupt:
        return


# -- export ------------------------------------------------------------------------------------


@click.command("export")
@server_options
@filter_options
@click.option("--cursor", help="Resume an interrupted export (printed on stderr).")
@click.option("--page-size", type=click.IntRange(1, 1000), default=1000, show_default=True)
def export(server: str, token_file: Path, timeout: float, cursor: str | None, page_size: int,
           **filters: Any) -> None:
    """Write records oldest first as NDJSON on stdout (progress on stderr), from --since up to
    --until (default: now). Resumable with the cursor printed when interrupted."""
    client = _client(server, token_file, timeout)
    if cursor:
        params = {"cursor": cursor}
    else:
        if not filters.get("since"):
            raise CliFailure("give --since (or --cursor to resume)", EXIT_USAGE)
        params = _filters(filters)
        params.setdefault("until", _when("0s", "--until") or "")
        params["order"] = "asc"
    count, resume, last_report = 0, cursor, time.monotonic()
    try:
        while True:
            client = _client(server, token_file, timeout)  # re-read: tokens rotate
            body = _page(client, {**params, "limit": str(page_size)})
            if body["events"]:
                sys.stdout.write("".join(json_line(e) + "\n" for e in body["events"]))
                sys.stdout.flush()
            count += len(body["events"])
            resume = body.get("next_cursor")
            if body["events"] and time.monotonic() - last_report >= 1.0:
                last_report = time.monotonic()
                click.echo(f"exported {count} record(s), through "
                           f"{safe_text(body['events'][-1].get('time'))}", err=True)
            if not resume:
                break
            params = {"cursor": resume}
    except (KeyboardInterrupt, BrokenPipeError, CliFailure) as exc:
        _interrupted(count, resume, exc)
    click.echo(f"exported {count} record(s); done", err=True)


def _interrupted(count: int, resume: str | None, exc: BaseException) -> NoReturn:
    how = "interrupted" if isinstance(exc, KeyboardInterrupt | BrokenPipeError) else "failed"
    if isinstance(exc, CliFailure):
        exc.show()
    hint = (f"resume with: token-broker audit export --cursor {resume}" if resume
            else "nothing to resume: run the same command again")
    click.echo(f"{how} after {count} record(s); {hint}", err=True)
    code = exc.exit_code if isinstance(exc, CliFailure) else EXIT_INTERRUPTED
    sys.exit(code)


# -- report ------------------------------------------------------------------------------------


@click.command("report")
@server_options
@click.option("--since", default="30d", show_default=True,
              help="RFC 3339 time, or a duration back from now.")
@click.option("--until", help="RFC 3339 time, or a duration back from now (default: now).")
@click.option("--top", type=click.IntRange(1, 100), default=10, show_default=True,
              help="How many of the subjects refused most to list.")
@click.option("--output", "-o", "fmt", type=click.Choice(("table", "json")), default="table",
              show_default=True)
def report(server: str, token_file: Path, timeout: float, since: str, until: str | None,
           top: int, fmt: str) -> None:
    """The access review: issuance per role and service account, subjects refused most and
    why, roles never used (whole UTC days)."""
    client = _client(server, token_file, timeout)
    params = {"since": _when(since, "--since") or "", "top": str(top)}
    if until:
        params["until"] = _when(until, "--until") or ""
    body = client.request("GET", "/v1/audit/report", params=params).json()
    if not isinstance(body, dict):
        raise CliFailure("the broker's answer is not a report")
    if fmt == "json":
        click.echo(json_line(body))
    else:
        click.echo("\n".join(report_lines(body)))
