"""``POST /v1/token``: RFC 8693 token exchange."""

from __future__ import annotations

import functools
from typing import Any
from urllib.parse import unquote

from flask import Blueprint, Response, request
from werkzeug.exceptions import RequestEntityTooLarge

from broker.errors import BrokerError, InvalidRequest, RequestTooLarge
from broker.http import broker, json_response, request_context
from broker.protocol import NO_STORE_HEADERS, params_from_json, params_from_pairs

bp = Blueprint("token", __name__)
MAX_FIELDS = 64  # a token request has fewer than ten
_PLAIN_TYPES = frozenset({"application/x-www-form-urlencoded", "application/json"})


@bp.post("/v1/token")
def token() -> Response:
    b = broker()
    environ = request.environ
    ctx = request_context(environ, b)
    try:
        params = _token_params(environ, b.settings.server.max_request_bytes)
    except BrokerError as exc:
        final = b.exchange.refuse(exc, ctx)
        if final is exc:
            raise
        raise final from exc
    result = b.exchange.run(params, ctx)
    return json_response(result.body, 200, dict(NO_STORE_HEADERS))


def _token_params(environ: dict[str, Any], limit: int) -> dict[str, list[str]]:
    # The usual Content-Type as sent; anything else (parameters, case) as werkzeug parses it.
    mimetype = environ.get("CONTENT_TYPE")
    if mimetype not in _PLAIN_TYPES:
        mimetype = request.mimetype
    try:
        if mimetype == "application/x-www-form-urlencoded":
            # Parsed straight from the body: the same result as request.form, without building
            # werkzeug's form machinery on the hot path.
            try:
                text = _body(environ, limit).decode("utf-8")
                pairs = _form_pairs(text)
            except (UnicodeDecodeError, ValueError) as exc:
                raise InvalidRequest(
                    "form body is not valid UTF-8 application/x-www-form-urlencoded",
                    reason="malformed_body",
                ) from exc
            return params_from_pairs(pairs)
        if mimetype == "application/json":
            return params_from_json(_body(environ, limit))
    except RequestEntityTooLarge as exc:
        raise RequestTooLarge(f"request body is larger than {limit} bytes") from exc
    raise InvalidRequest(
        "Content-Type must be application/x-www-form-urlencoded or application/json",
        reason="unsupported_content_type",
    )


def _body(environ: dict[str, Any], limit: int) -> bytes:
    """The request body, bounded by ``limit`` (the app's MAX_CONTENT_LENGTH; 413). Read straight
    from the WSGI input when its length is declared as plain digits (werkzeug's stream wrappers
    and header parsing cost more than the read itself)."""
    declared = environ.get("CONTENT_LENGTH", "")
    if (
        declared.isascii()  # isdigit alone admits "²", which int() refuses
        and declared.isdigit()
        and len(declared) <= 18
        and "HTTP_TRANSFER_ENCODING" not in environ
    ):
        length = int(declared)
    else:
        # Chunked, absent or odd: as werkzeug reads it (an unreadable length reads as 0).
        streamed = request.content_length
        if streamed is None:
            # No length: read a stream the server terminates (gunicorn does), one byte past
            # the limit to tell "too large" (werkzeug's bounded stream would cut it silently).
            if "wsgi.input_terminated" not in environ:
                return b""  # werkzeug's safe fallback: an endless stream is not read
            data: bytes = environ["wsgi.input"].read(limit + 1)
            if len(data) > limit:
                raise RequestEntityTooLarge()
            return data
        length = streamed
    if length > limit:
        raise RequestEntityTooLarge()
    return environ["wsgi.input"].read(length) if length else b""


def _form_pairs(text: str) -> list[tuple[str, str]]:
    """``parse_qsl(text, keep_blank_values=True, max_num_fields=MAX_FIELDS)``, unquoting only
    the parts that need it: a subject token (base64url and dots, about a kilobyte) never does,
    and it is most of the body."""
    if text.count("&") >= MAX_FIELDS:
        raise ValueError("Max number of fields exceeded")
    pairs = []
    for field in text.split("&"):
        if field:
            name, _, value = field.partition("=")
            if "%" in name or "+" in name:
                name = _unquote(name)
            if "%" in value or "+" in value:
                value = _unquote(value) if name in _VOCABULARY else _unquote_plus(value)
            pairs.append((name, value))
    return pairs


def _unquote_plus(text: str) -> str:
    return unquote(text.replace("+", " "))


# Field names and the values of these fields (URNs, role names) repeat from request to request:
# each is unquoted once. Never a token (nothing secret is kept), and bounded in count and size.
_VOCABULARY = frozenset(
    {"grant_type", "subject_token_type", "actor_token_type", "requested_token_type",
     "audience", "scope", "resource"}
)
_MEMO_CHARS = 256
_unquote_short = functools.lru_cache(maxsize=256)(_unquote_plus)


def _unquote(text: str) -> str:
    return _unquote_short(text) if len(text) <= _MEMO_CHARS else _unquote_plus(text)
