"""RFC 8693 wire format: constants, request parsing, response rendering. No I/O, no Flask."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from broker.errors import (
    BrokerError,
    InvalidRequest,
    InvalidScope,
    InvalidSubjectToken,
    UnsupportedGrantType,
)

# URNs of RFC 8693, not secrets.
GRANT_TYPE_TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"  # noqa: S105
TOKEN_TYPE_JWT = "urn:ietf:params:oauth:token-type:jwt"  # noqa: S105
TOKEN_TYPE_ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"  # noqa: S105
TOKEN_TYPE_ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105
SUBJECT_TOKEN_TYPES = frozenset({TOKEN_TYPE_JWT, TOKEN_TYPE_ID_TOKEN})

MAX_SUBJECT_TOKEN_BYTES = 16 * 1024
# Credential configs written for Google's STS carry a workload-identity-pool URI as `audience`;
# such a value names no role here, so it is treated as absent (the single admitting role).
WIF_AUDIENCE_PREFIX = "//iam.googleapis.com/"

# RFC 6749 §3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
_SCOPE_TOKEN = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")

NO_STORE_HEADERS: Mapping[str, str] = {"Cache-Control": "no-store", "Pragma": "no-cache"}


@dataclass(frozen=True, slots=True)
class TokenRequest:
    """A parsed, syntactically valid token-exchange request."""

    subject_token: str = field(repr=False)
    subject_token_type: str
    requested_role: str | None
    scopes: tuple[str, ...]


def parse_token_request(params: Mapping[str, list[str]]) -> TokenRequest:
    """Validate RFC 8693 parameters (each name mapped to every value it was given)."""
    for name, values in params.items():
        if len(values) > 1:
            raise InvalidRequest(
                f"parameter {name!r} was given more than once (RFC 6749 §3.1)",
                reason="duplicate_parameter",
            )

    def one(name: str) -> str | None:
        values = params.get(name)
        return values[0] if values else None

    grant_type = one("grant_type")
    if not grant_type:
        raise InvalidRequest("missing grant_type", reason="missing_grant_type")
    if grant_type != GRANT_TYPE_TOKEN_EXCHANGE:
        raise UnsupportedGrantType(
            f"grant_type must be {GRANT_TYPE_TOKEN_EXCHANGE}",
            reason="unsupported_grant_type",
        )
    raw_token = one("subject_token")
    token = raw_token.strip() if raw_token is not None else ""
    if not token:
        raise InvalidSubjectToken("missing or empty subject_token", reason="token_missing")
    if len(token) > MAX_SUBJECT_TOKEN_BYTES:
        raise InvalidSubjectToken(
            f"subject_token is longer than {MAX_SUBJECT_TOKEN_BYTES} bytes",
            reason="token_too_large",
        )
    token_type = one("subject_token_type")
    if not token_type:
        raise InvalidRequest("missing subject_token_type", reason="missing_subject_token_type")
    if token_type not in SUBJECT_TOKEN_TYPES:
        raise InvalidRequest(
            f"subject_token_type must be {TOKEN_TYPE_JWT} or {TOKEN_TYPE_ID_TOKEN}",
            reason="unsupported_subject_token_type",
        )
    requested = one("requested_token_type")
    if requested and requested != TOKEN_TYPE_ACCESS_TOKEN:
        raise InvalidRequest(
            f"requested_token_type must be {TOKEN_TYPE_ACCESS_TOKEN}",
            reason="unsupported_requested_token_type",
        )
    if one("actor_token") or one("actor_token_type"):
        raise InvalidRequest("delegation (actor_token) is not supported", reason="actor_token")
    return TokenRequest(
        subject_token=token,
        subject_token_type=token_type,
        requested_role=requested_role(params),
        scopes=parse_scope(one("scope")),
    )


def requested_role(params: Mapping[str, list[str]]) -> str | None:
    """The role a request names: its (first) ``audience``; None when there is none or it is a
    workload-identity-pool URI. Also read for the audit record of a request refused as malformed."""
    values = params.get("audience")
    audience = values[0].strip() if values else ""
    return None if not audience or audience.startswith(WIF_AUDIENCE_PREFIX) else audience


def parse_scope(value: str | None) -> tuple[str, ...]:
    """Space-separated scope list; empty is fine (Go always sends it), malformed is not."""
    if not value:
        return ()
    tokens = value.split(" ")
    if any(not t or not _SCOPE_TOKEN.match(t) for t in tokens):
        raise InvalidScope("scope must be space-separated scope tokens (RFC 6749 §3.3)")
    return tuple(tokens)


class _Object(list[tuple[str, Any]]):
    """A JSON object as its ``(key, value)`` pairs, in order, repeats kept."""


def params_from_json(raw: bytes) -> dict[str, list[str]]:
    """Turn a JSON object body into the same shape as form parameters: each name mapped to every
    value it was given, so a repeated key is refused by :func:`parse_token_request` exactly as a
    repeated form field is (RFC 6749 §3.1). Refuses malformed JSON and non-string values."""
    try:
        orjson.loads(raw)  # strict RFC 8259: no NaN, no lone surrogates (they could not be audited)
        # orjson keeps only the last of repeated keys; json with a pairs hook keeps them all. A
        # body nested deeper than json's recursion allows is not a token request either.
        body = json.loads(raw, object_pairs_hook=_Object)
    except (ValueError, RecursionError) as exc:  # orjson's and json's errors are ValueErrors
        raise InvalidRequest("body is not valid JSON", reason="malformed_body") from exc
    if not isinstance(body, _Object):
        raise InvalidRequest("JSON body must be an object", reason="malformed_body")
    params: dict[str, list[str]] = {}
    for key, value in body:
        if value is None:
            continue
        if not isinstance(value, str):
            raise InvalidRequest(f"parameter {key!r} must be a string", reason="malformed_body")
        params.setdefault(key, []).append(value)
    return params


def params_from_pairs(pairs: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    params: dict[str, list[str]] = {}
    for key, value in pairs:
        params.setdefault(key, []).append(value)
    return params


def token_response(access_token: str, expires_in: int, scopes: Iterable[str]) -> dict[str, Any]:
    """RFC 8693 §2.2.1 success body. ``expires_in`` is an int > 0 (Go's client insists)."""
    return {
        "access_token": access_token,
        "issued_token_type": TOKEN_TYPE_ACCESS_TOKEN,
        "token_type": "Bearer",
        "expires_in": max(1, int(expires_in)),
        "scope": " ".join(scopes),
    }


def error_response(error: BrokerError, request_id: str) -> dict[str, Any]:
    """RFC 6749 §5.2 error body plus our request id (and the error's extra members)."""
    return {
        **(error.extra or {}),
        "error": error.error,
        "error_description": error.description,
        "request_id": request_id,
    }
