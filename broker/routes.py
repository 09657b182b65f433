"""Thin Flask handlers: translate HTTP to the use cases and back."""

from __future__ import annotations

import logging
import secrets
from typing import Any

import orjson
import redis
from flask import Blueprint, Response, current_app, g, request
from werkzeug.exceptions import RequestEntityTooLarge

from broker.errors import BrokerError, InvalidRequest, RequestTooLarge
from broker.exchange import RequestContext
from broker.protocol import NO_STORE_HEADERS, error_response, params_from_json, params_from_pairs
from broker.ratelimit import client_ip

log = logging.getLogger(__name__)

api = Blueprint("api", __name__)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    resp = Response(orjson.dumps(body), status=status, mimetype="application/json")
    for key, value in (headers or {}).items():
        resp.headers[key] = value
    return resp


def error_json(exc: BrokerError) -> Response:
    """Render any :class:`BrokerError` as the RFC 6749 error body."""
    headers = dict(NO_STORE_HEADERS)
    if exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    return json_response(error_response(exc, request_id()), exc.status, headers)


def request_id() -> str:
    rid = g.get("request_id")
    if rid is None:
        rid = secrets.token_hex(8)
        g.request_id = rid
    return str(rid)


def _broker() -> Any:
    return current_app.extensions["broker"]


@api.after_request
def _request_id_header(resp: Response) -> Response:
    resp.headers["X-Request-Id"] = request_id()
    return resp


@api.post("/v1/token")
def token() -> Response:
    broker = _broker()
    ctx = RequestContext(
        request_id=request_id(),
        client_ip=client_ip(
            request.remote_addr,
            request.headers.get("X-Forwarded-For"),
            broker.settings.server.trusted_proxies,
        ),
        user_agent=request.headers.get("User-Agent"),
    )
    try:
        params = _token_params()
    except BrokerError as exc:
        broker.exchange.refuse(exc, ctx)
        raise
    result = broker.exchange.run(params, ctx)
    return json_response(result.body, 200, dict(NO_STORE_HEADERS))


def _token_params() -> dict[str, list[str]]:
    mimetype = request.mimetype
    try:
        if mimetype == "application/x-www-form-urlencoded":
            return params_from_pairs(request.form.items(multi=True))
        if mimetype == "application/json":
            try:
                return params_from_json(orjson.loads(request.get_data(cache=False)))
            except orjson.JSONDecodeError as exc:
                raise InvalidRequest("body is not valid JSON", reason="malformed_body") from exc
    except RequestEntityTooLarge as exc:
        raise RequestTooLarge(
            f"request body is larger than {request.max_content_length} bytes"
        ) from exc
    raise InvalidRequest(
        "Content-Type must be application/x-www-form-urlencoded or application/json",
        reason="unsupported_content_type",
    )


@api.get("/healthz")
def healthz() -> Response:
    return json_response({"status": "ok"})


@api.get("/readyz")
def readyz() -> Response:
    broker = _broker()
    checks: dict[str, str] = {}
    try:
        broker.redis.ping()
        checks["redis"] = "ok"
    except redis.RedisError as exc:
        checks["redis"] = f"unreachable: {type(exc).__name__}"
    checks["roles"] = "ok" if broker.roles() is not None else "not loaded"
    checks["cache_keys"] = "ok"
    ok = all(v == "ok" for v in checks.values())
    return json_response({"ready": ok, "checks": checks}, 200 if ok else 503)
