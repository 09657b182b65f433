"""Role table, cache purge and explain endpoints (DESIGN.md §4).

Reads and explain: admins and auditors. Writes and purges: admins. ETags are strong: the
table's digest for the table, a role's digest for one role.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from flask import Blueprint, Response, request
from werkzeug.exceptions import RequestEntityTooLarge

from broker.access import Permission
from broker.errors import InvalidRequest, RequestTooLarge
from broker.http import broker, json_response, request_context, require
from broker.policy import role_digest, role_to_dict
from broker.roles_admin import Preconditions, RoleAdmin, WriteResult

if TYPE_CHECKING:
    from broker.roles_source import RoleSource

bp = Blueprint("roles", __name__)

READ = (Permission.ADMIN, Permission.AUDITOR)
WRITE = (Permission.ADMIN,)
MAX_HISTORY = 100


def _admin() -> RoleAdmin:
    return broker().role_admin


def _etag(digest: str) -> str:
    return f'"{digest}"'



def _preconditions() -> Preconditions:
    def tags(header: str) -> frozenset[str] | None:
        if header not in request.headers:
            return None
        parsed = request.if_match if header == "If-Match" else request.if_none_match
        # Strong comparison (RFC 9110 §13.1.1): weak tags never match a write precondition.
        return frozenset(parsed.as_set(include_weak=False)) | (
            {"*"} if parsed.star_tag else frozenset()
        )

    return Preconditions(if_match=tags("If-Match"), if_none_match=tags("If-None-Match"))


def _json_body() -> Any:
    try:
        raw = request.get_data(cache=False)
    except RequestEntityTooLarge as exc:
        raise RequestTooLarge(
            f"request body is larger than {request.max_content_length} bytes"
        ) from exc
    if request.mimetype != "application/json":
        raise InvalidRequest("Content-Type must be application/json")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest("body is not valid JSON", reason="malformed_body") from exc


def _source_info(source: RoleSource) -> dict[str, Any]:
    return {"source": source.kind, "revision": source.revision}


def _write_response(result: WriteResult, status: int = 200, **extra: Any) -> Response:
    body = {**result.to_data(), **extra}
    return json_response(body, status, {"ETag": _etag(result.table.digest)})


@bp.get("/v1/roles")
def list_roles() -> Response:
    require(*READ)
    admin = _admin()
    table = admin.table()
    body = {
        **table.to_data(),
        "version": table.digest,
        **_source_info(admin.source),
        "warnings": list(table.warnings),
    }
    return json_response(body, 200, {"ETag": _etag(table.digest)})


@bp.put("/v1/roles")
def put_table() -> Response:
    dry_run = request.args.get("dry_run", "").lower() in ("1", "true", "yes")
    caller = require(*(READ if dry_run else WRITE))
    result = _admin().put_table(
        _json_body(), _preconditions(), caller, request_context(), dry_run=dry_run
    )
    return _write_response(result)


@bp.get("/v1/roles/_history")
def history() -> Response:
    require(*READ)
    try:
        limit = min(MAX_HISTORY, max(1, int(request.args.get("limit", "20"))))
    except ValueError as exc:
        raise InvalidRequest("limit must be an integer") from exc
    return json_response({"versions": _admin().history(limit)})


@bp.get("/v1/roles/_history/<int:revision>")
def history_version(revision: int) -> Response:
    require(*READ)
    return json_response(_admin().version(revision))


@bp.get("/v1/roles/<name>")
def get_role(name: str) -> Response:
    require(*READ)
    role = _admin().role(name)
    return json_response(role_to_dict(role), 200, {"ETag": _etag(role_digest(role))})


@bp.put("/v1/roles/<name>")
def put_role(name: str) -> Response:
    caller = require(*WRITE)
    admin = _admin()
    pre = _preconditions()
    body = _json_body()
    result, role, created = admin.put_role(name, body, pre, caller, request_context())
    resp = _write_response(result, 201 if created else 200, role=role_to_dict(role))
    resp.headers["ETag"] = _etag(role_digest(role))
    return resp


@bp.delete("/v1/roles/<name>")
def delete_role(name: str) -> Response:
    caller = require(*WRITE)
    result = _admin().delete_role(name, _preconditions(), caller, request_context())
    return _write_response(result, 200, deleted=name)


@bp.post("/v1/cache/purge")
def purge() -> Response:
    caller = require(*WRITE)
    return json_response(_admin().purge(_json_body(), caller, request_context()))


@bp.post("/v1/explain")
def explain() -> Response:
    require(*READ)
    return json_response(_admin().explain(_json_body()))
