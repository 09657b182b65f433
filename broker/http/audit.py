"""Audit endpoints: events and report (auditors), verification (auditors), public keys (anyone).

Every call to an auditor endpoint, refused ones included, leaves an ``audit.read`` record naming
the caller and the filter; a read is answered only once its record is stored (fail closed).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson
from flask import Blueprint, Response, current_app, g, request

from broker.access import Caller, Permission
from broker.auditchain import parse_time
from broker.auditquery import FILTERS, AuditReader, Cursor, Page, Query, issuer_refs
from broker.auditreads import bearer_token, params_of, read_record
from broker.auditreport import build_report
from broker.errors import BrokerError, Forbidden, InvalidRequest, StoreUnavailable, Unauthorized
from broker.http import broker, json_response, request_context
from broker.protocol import NO_STORE_HEADERS

bp = Blueprint("audit", __name__)

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
MAX_WAIT_S = 25
MAX_TOP = 100
REPORT_DEFAULT_S = 30 * 86400
NDJSON = "application/x-ndjson"
_FOLLOW_SLOTS = "broker.audit.follow_slots"


# -- arguments ---------------------------------------------------------------------------------


def _time_arg(name: str) -> float | None:
    value = request.args.get(name)
    if value is None or value == "":
        return None
    parsed = parse_time(value)
    if parsed is None:
        raise InvalidRequest(f"{name} must be an RFC 3339 time such as 2026-01-31T12:00:00Z",
                             reason="bad_time")
    return parsed


def _int_arg(name: str, default: int, low: int, high: int, reason: str) -> int:
    value = request.args.get(name, "") or str(default)
    # isdigit alone admits digits such as "²", which int() refuses
    if not (value.isascii() and value.isdigit()) or not low <= int(value) <= high:
        raise InvalidRequest(f"{name} must be an integer from {low} to {high}", reason=reason)
    return int(value)


def _only_args(*accepted: str) -> None:
    """Refuse parameters the endpoint does not know, and any given twice: a misspelt filter
    must not answer as if it were absent (every record, unfiltered)."""
    for name in request.args:
        if name not in accepted:
            raise InvalidRequest(
                f"unknown parameter {name!r} (accepted: {', '.join(accepted)})",
                reason="bad_filter",
            )
        if len(request.args.getlist(name)) > 1:
            raise InvalidRequest(f"parameter {name!r} was given more than once",
                                 reason="bad_filter")


def _flag(name: str) -> bool:
    value = request.args.get(name, "").lower()
    if value not in ("", "0", "1", "true", "false"):
        raise InvalidRequest(f"{name} must be true or false", reason="bad_flag")
    return value in ("1", "true")


def _query_args() -> tuple[Query, str | None]:
    """The query the parameters describe, and the cursor; parameters sent with a cursor must
    agree with the query it continues."""
    since, until = _time_arg("since"), _time_arg("until")
    if since is not None and until is not None and since > until:
        raise InvalidRequest("since is after until", reason="bad_time")
    given: dict[str, Any] = {f: v for f in FILTERS if (v := request.args.get(f))}
    if since is not None:
        given["since_ms"] = max(0, int(since * 1000))
    if until is not None:
        given["until_ms"] = max(0, int(until * 1000))
    order = request.args.get("order")
    if order:
        if order not in ("asc", "desc"):
            raise InvalidRequest("order must be asc or desc", reason="bad_order")
        given["order"] = order
    try:
        query = Query(**given)
    except ValueError as exc:
        raise InvalidRequest(str(exc), reason="bad_filter") from exc
    cursor = request.args.get("cursor") or None
    if cursor is not None:
        continued = Cursor.decode(cursor).query
        if any(getattr(continued, k) != v for k, v in given.items()):
            raise InvalidRequest("cursor belongs to another query: send it alone, or with the "
                                 "same parameters", reason="bad_cursor")
        query = continued
    return query, cursor


# -- audit.read records ------------------------------------------------------------------------



def _audited(endpoint: str, handler: Callable[[Caller], tuple[Response, dict[str, Any]]]
             ) -> Response:
    """Authenticate an auditor and run ``handler``; record the read (or its refusal). The
    response leaves only once its record is stored."""
    b = broker()
    ctx, token = request_context(), bearer_token(request.headers.get("Authorization"))
    caller: Caller | None = None
    try:
        caller = b.access.authenticate(request.headers.get("Authorization"))
        if Permission.AUDITOR not in caller.permissions:
            raise Forbidden(f"{caller.principal} is not listed in access.auditors",
                            reason="not_listed")
        g.caller = caller
        response, details = handler(caller)
    except BrokerError as exc:
        details = {"endpoint": endpoint}
        if not isinstance(exc, Unauthorized | Forbidden):
            details["params"] = params_of(request.args)
        decision = "denied" if exc.status < 500 else "error"
        record = read_record(ctx, caller=caller, token=token, decision=decision,
                             reason=exc.reason, details=details)
        if decision == "denied":
            b.audit.append_denial(record, (ctx.client_ip or "", exc.reason,
                                           record.subject_token_sha256 or ""))
        else:
            with contextlib.suppress(StoreUnavailable):  # already on stdout, stored: false
                b.audit.append(record)
        raise
    b.audit.append(read_record(ctx, caller=caller, token=token, decision="issued",
                               reason="read", details={"endpoint": endpoint, **details}))
    return response


# -- endpoints ---------------------------------------------------------------------------------


@bp.get("/v1/audit/events")
def events() -> Response:
    """Records matching ``since``, ``until`` (RFC 3339), ``subject``, ``role``,
    ``service_account``, ``decision``, ``event``; ``order`` desc (newest first, default) or asc;
    ``limit`` (≤ 1000), ``cursor``; ``wait`` (≤ 25 s, asc only) long-polls for new records.
    ``Accept: application/x-ndjson`` streams one record a line."""

    def handle(caller: Caller) -> tuple[Response, dict[str, Any]]:
        _only_args(*FILTERS, "since", "until", "order", "limit", "cursor", "wait")
        query, cursor = _query_args()
        limit = _int_arg("limit", DEFAULT_LIMIT, 1, MAX_LIMIT, "bad_limit")
        wait = _int_arg("wait", 0, 0, MAX_WAIT_S, "bad_wait")
        ndjson = request.accept_mimetypes.best_match(["application/json", NDJSON]) == NDJSON
        reader = AuditReader(broker().audit.store, issuers=issuer_refs(broker().settings.issuers))
        if wait and query.order != "asc":
            raise InvalidRequest("wait needs order=asc", reason="bad_wait")
        with _follow_slot(wait > 0) as waiting:
            if waiting:
                page = reader.wait(query, cursor=cursor, limit=limit, wait_s=wait)
            else:
                page = reader.page(query, cursor=cursor, limit=limit)
        details = {"filter": query.described(), "cursor": cursor is not None,
                   "returned": len(page.events), "format": "ndjson" if ndjson else "json"}
        if wait:
            details["wait"] = wait if waiting else 0
        return (_ndjson(page) if ndjson else json_response(page.to_dict(),
                                                           headers=dict(NO_STORE_HEADERS))), details

    return _audited("events", handle)


def _ndjson(page: Page) -> Response:
    def lines() -> Iterator[bytes]:
        for event in page.events:
            yield orjson.dumps(event) + b"\n"
        yield orjson.dumps({"next_cursor": page.next_cursor,
                            "follow_cursor": page.follow_cursor}) + b"\n"

    resp = Response(lines(), mimetype=NDJSON)
    for key, value in NO_STORE_HEADERS.items():
        resp.headers[key] = value
    for name, cursor in (("X-Next-Cursor", page.next_cursor),
                         ("X-Follow-Cursor", page.follow_cursor)):
        if cursor:
            resp.headers[name] = cursor
    return resp


@contextlib.contextmanager
def _follow_slot(wanted: bool) -> Iterator[bool]:
    """A long poll holds a worker thread for up to ``MAX_WAIT_S``; at most a quarter of a
    worker's threads may do so at once. Without a free slot the request answers at once."""
    if not wanted:
        yield False
        return
    n = max(1, broker().settings.server.threads // 4)
    slots: threading.BoundedSemaphore = current_app.extensions.setdefault(
        _FOLLOW_SLOTS, threading.BoundedSemaphore(n))
    if not slots.acquire(blocking=False):
        yield False
        return
    try:
        yield True
    finally:
        slots.release()


@bp.get("/v1/audit/report")
def report() -> Response:
    """Issuance per role and GCP service account, refusals by reason and subject, roles never
    used, over the UTC days that ``since``..``until`` touch (default: the last 30 days)."""

    def handle(caller: Caller) -> tuple[Response, dict[str, Any]]:
        _only_args("since", "until", "top")
        now = time.time()
        since, until = _time_arg("since"), _time_arg("until")
        until = now if until is None else until
        since = until - REPORT_DEFAULT_S if since is None else since
        if since > until:
            raise InvalidRequest("since is after until", reason="bad_time")
        top = _int_arg("top", 10, 1, MAX_TOP, "bad_limit")
        b = broker()
        body = build_report(b.redis, b.audit.store.index_keys, since=since, until=until,
                            roles=[r.name for r in b.roles().roles], top=top)
        details = {"filter": {"from_day": body["from_day"], "to_day": body["to_day"],
                              "top": top}}
        return json_response(body, headers=dict(NO_STORE_HEADERS)), details

    return _audited("report", handle)


@bp.get("/v1/audit/verify")
def verify() -> Response:
    """Verify every chain; ``full=true`` re-reads everything, ``strict=true`` fails on a stale
    unsealed tail."""

    def handle(caller: Caller) -> tuple[Response, dict[str, Any]]:
        _only_args("full", "strict")
        full, strict = _flag("full"), _flag("strict")
        result = broker().audit_verifier.verify(full=full, strict=strict).to_dict()
        details = {"filter": {"full": full, "strict": strict}, "ok": result.get("ok"),
                   "checked": result.get("checked")}
        return json_response(result, headers=dict(NO_STORE_HEADERS)), details

    return _audited("verify", handle)


@bp.get("/v1/audit/public-key")
def public_key() -> Response:
    """The trusted Ed25519 public keys; ``current`` signs new checkpoints."""
    return json_response(broker().audit_keys.to_dict())
