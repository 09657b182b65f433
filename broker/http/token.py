"""``POST /v1/token``: RFC 8693 token exchange."""

from __future__ import annotations

import functools
from urllib.parse import unquote

import orjson
from flask import Blueprint, Response, request
from werkzeug.exceptions import RequestEntityTooLarge

from broker.errors import BrokerError, InvalidRequest, RequestTooLarge
from broker.http import broker, json_response, request_context
from broker.protocol import NO_STORE_HEADERS, params_from_json, params_from_pairs

bp = Blueprint("token", __name__)
MAX_FIELDS = 64  # a token request has fewer than ten


@bp.post("/v1/token")
def token() -> Response:
    b = broker()
    ctx = request_context()
    try:
        params = _token_params()
    except BrokerError as exc:
        final = b.exchange.refuse(exc, ctx)
        if final is exc:
            raise
        raise final from exc
    result = b.exchange.run(params, ctx)
    return json_response(result.body, 200, dict(NO_STORE_HEADERS))


def _token_params() -> dict[str, list[str]]:
    mimetype = request.mimetype
    try:
        if mimetype == "application/x-www-form-urlencoded":
            # Parsed straight from the body: the same result as request.form, without building
            # werkzeug's form machinery on the hot path.
            try:
                text = _body().decode("utf-8")
                pairs = _form_pairs(text)
            except (UnicodeDecodeError, ValueError) as exc:
                raise InvalidRequest(
                    "form body is not valid UTF-8 application/x-www-form-urlencoded",
                    reason="malformed_body",
                ) from exc
            return params_from_pairs(pairs)
        if mimetype == "application/json":
            try:
                return params_from_json(orjson.loads(_body()))
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


def _body() -> bytes:
    """The request body, bounded by MAX_CONTENT_LENGTH (413). Read straight from the WSGI input
    when its length is declared (werkzeug's stream wrappers cost more than the read itself)."""
    length = request.content_length
    if length is None:  # chunked: werkzeug bounds the stream as it reads
        return request.get_data(cache=False)
    limit = request.max_content_length
    if limit is not None and length > limit:
        raise RequestEntityTooLarge()
    return request.environ["wsgi.input"].read(length) if length else b""


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
