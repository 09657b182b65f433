"""Thin Flask blueprints: translate HTTP to the use cases and back. Shared helpers live here."""

from __future__ import annotations

import random
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import orjson
from flask import Response, current_app, g, request

from broker.errors import BrokerError
from broker.exchange import RequestContext
from broker.protocol import NO_STORE_HEADERS, error_response
from broker.ratelimit import client_ip

if TYPE_CHECKING:
    from broker.access import Caller, Permission
    from broker.app import Broker


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON response (orjson) with optional extra headers."""
    resp = Response(orjson.dumps(body), status=status, mimetype="application/json")
    for key, value in (headers or {}).items():
        resp.headers[key] = value
    return resp


def error_json(exc: BrokerError) -> Response:
    """Render any :class:`BrokerError` as the RFC 6749 error body."""
    headers = dict(NO_STORE_HEADERS)
    if exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    if exc.status == 401:
        headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
    return json_response(error_response(exc, request_id()), exc.status, headers)


REQUEST_ID_KEY = "token_broker.request_id"  # where a request keeps its id: its WSGI environ


def request_id(environ: dict[str, Any] | None = None) -> str:
    """This request's id (also sent as ``X-Request-Id`` and stored in audit records).
    ``environ``: the request's WSGI environ, when the caller has it at hand."""
    if environ is None:
        environ = request.environ
    rid = environ.get(REQUEST_ID_KEY)
    if rid is None:
        # A correlation id, not a secret: Python's PRNG (reseeded in each forked worker) needs
        # no system call, where secrets.token_hex makes one (dropping the GIL) per request.
        rid = environ[REQUEST_ID_KEY] = f"{random.getrandbits(64):016x}"
    return str(rid)


def request_context(
    environ: dict[str, Any] | None = None, b: Broker | None = None
) -> RequestContext:
    """Who is calling, from the transport's point of view (client IP behind trusted proxies).
    ``environ`` and ``b``: the request's WSGI environ and :func:`broker`, when at hand."""
    # Straight from the WSGI environ: the same values as request.remote_addr / request.headers,
    # without building werkzeug's header view on the hot path.
    if environ is None:
        environ = request.environ
    return RequestContext(
        request_id=request_id(environ),
        client_ip=client_ip(
            environ.get("REMOTE_ADDR"),
            environ.get("HTTP_X_FORWARDED_FOR"),
            (b or broker()).settings.server.trusted_proxies,
        ),
        user_agent=environ.get("HTTP_USER_AGENT"),
    )


def broker() -> Broker:
    """The collaborators built by :func:`broker.app.create_app` for this app."""
    return current_app.extensions["broker"]  # type: ignore[no-any-return]


def require(*allowed: Permission) -> Caller:
    """Authenticate the bearer token and demand one of ``allowed`` (401 / 403 otherwise)."""
    perms: Collection[Permission] = allowed
    caller = broker().access.require(request.headers.get("Authorization"), perms)
    g.caller = caller
    return caller
