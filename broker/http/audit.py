"""Audit endpoints: events (auditors), verification (auditors), public keys (anyone)."""

from __future__ import annotations

from flask import Blueprint, Response, request

from broker.access import Permission
from broker.auditchain import parse_time
from broker.errors import InvalidRequest
from broker.http import broker, json_response, require
from broker.protocol import NO_STORE_HEADERS

bp = Blueprint("audit", __name__)

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100


def _time_arg(name: str) -> float | None:
    value = request.args.get(name)
    if value is None or value == "":
        return None
    parsed = parse_time(value)
    if parsed is None:
        raise InvalidRequest(f"{name} must be an RFC 3339 time such as 2026-01-31T12:00:00Z",
                             reason="bad_time")
    return parsed


def _limit_arg() -> int:
    value = request.args.get("limit", str(DEFAULT_LIMIT))
    if not value.isdigit() or not 1 <= int(value) <= MAX_LIMIT:
        raise InvalidRequest(f"limit must be an integer from 1 to {MAX_LIMIT}", reason="bad_limit")
    return int(value)


def _flag(name: str) -> bool:
    value = request.args.get(name, "").lower()
    if value not in ("", "0", "1", "true", "false"):
        raise InvalidRequest(f"{name} must be true or false", reason="bad_flag")
    return value in ("1", "true")


@bp.get("/v1/audit/events")
def events() -> Response:
    """Records newest first: ``since``/``until`` (RFC 3339), ``limit`` (≤ 1000), ``cursor``."""
    require(Permission.AUDITOR)
    since, until = _time_arg("since"), _time_arg("until")
    if since is not None and until is not None and since > until:
        raise InvalidRequest("since is after until", reason="bad_time")
    records, next_cursor = broker().audit.store.events(
        since=since, until=until, limit=_limit_arg(), cursor=request.args.get("cursor") or None
    )
    return json_response({"events": records, "next_cursor": next_cursor},
                         headers=dict(NO_STORE_HEADERS))


@bp.get("/v1/audit/verify")
def verify() -> Response:
    """Verify every chain; ``full=true`` re-reads everything, ``strict=true`` fails on a stale
    unsealed tail."""
    require(Permission.AUDITOR)
    report = broker().audit_verifier.verify(full=_flag("full"), strict=_flag("strict"))
    return json_response(report.to_dict(), headers=dict(NO_STORE_HEADERS))


@bp.get("/v1/audit/public-key")
def public_key() -> Response:
    """The trusted Ed25519 public keys; ``current`` signs new checkpoints."""
    return json_response(broker().audit_keys.to_dict())
