"""Local IAM Credentials emulator (DESIGN.md §7): dev mode, docker compose and tests.

Serves the subset of the IAM Credentials REST API the broker uses, with Google's request
validation and error shape (``{"error": {"code", "message", "status"}}``), so the real
``google-cloud-iam`` client can talk to it over plain HTTP:

* ``POST /v1/projects/-/serviceAccounts/{email}:generateAccessToken`` — ``scope`` (required,
  non-empty), ``lifetime`` (``"1s"`` .. ``"43200s"``, default ``"3600s"``), ``delegates`` →
  ``{"accessToken", "expireTime"}``. Tokens are random (``ya29.emulator.<urlsafe>``) and
  remembered for introspection.
* ``POST /v1/projects/-/serviceAccounts/{email}:generateIdToken`` — ``audience`` (required),
  ``includeEmail``, ``delegates`` → ``{"token"}``. The token is a JWT signed with HS256 under a
  random per-process secret: well-formed for parsers, verifiable by nobody, so it can never be
  mistaken for a Google-signed ID token.

Test hooks under ``/emulator/``:

* ``GET /emulator/tokens/{token}`` → ``{service_account, scopes, expire_time, delegates}``
  (404 when unknown).
* ``GET /emulator/stats`` → calls by method. Every call routed to a method counts, including
  those answered with an injected fault or a validation error.
* ``POST /emulator/faults`` ``{latency_ms, fail_next, status}``: each key optional. The latency
  applies to every later generate call until changed; the next ``fail_next`` generate calls fail
  with ``status`` (default 503) in Google's error shape.
* ``POST /emulator/reset`` clears tokens, stats and faults.

It authenticates nobody: it is for loopback use only (the broker's settings enforce that).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

log = logging.getLogger(__name__)

TOKEN_PREFIX = "ya29.emulator."  # noqa: S105 - a marker prefix, not a secret
METHODS = ("generateAccessToken", "generateIdToken")
MIN_LIFETIME_S = 1.0
MAX_LIFETIME_S = 43200.0
DEFAULT_LIFETIME_S = 3600.0
ID_TOKEN_LIFETIME_S = 3600
# Remembered tokens are capped so a long-running dev emulator does not grow without bound.
MAX_REMEMBERED_TOKENS = 100_000

# HTTP status → google.rpc.Code name, as Google's REST front end reports them.
GOOGLE_STATUS: dict[int, str] = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",  # not an rpc code; only for wrong HTTP verbs on emulator routes
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    501: "NOT_IMPLEMENTED",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
FAULT_STATUSES = frozenset(GOOGLE_STATUS) - {405}

_LIFETIME = re.compile(r"^(\d{1,12})(?:\.(\d{1,9}))?s$")
# Loose on purpose: Google accepts any service-account email or unique id; we refuse what
# cannot be one (no "@", whitespace, slashes, colons).
_EMAIL = re.compile(r"^[^@\s/:]+@[^@\s/:]+\.[^@\s/:]+$")
_UNIQUE_ID = re.compile(r"^\d{1,30}$")
_DELEGATE = re.compile(r"^projects/-/serviceAccounts/([^/]+)$")


class _ApiError(Exception):
    """An error answered in Google's shape."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class _MintedToken:
    service_account: str
    scopes: tuple[str, ...]
    expire_time: str
    delegates: tuple[str, ...]


@dataclass(slots=True)
class _Faults:
    latency_ms: int = 0
    fail_next: int = 0
    status: int = 503


@dataclass(slots=True)
class _State:
    """Everything mutable, guarded by ``lock``."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    tokens: dict[str, _MintedToken] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=lambda: dict.fromkeys(METHODS, 0))
    faults: _Faults = field(default_factory=_Faults)


def _error(code: int, message: str) -> tuple[Response, int]:
    status = GOOGLE_STATUS.get(code, "UNKNOWN")
    return jsonify({"error": {"code": code, "message": message, "status": status}}), code


def _rfc3339(unix_s: float) -> str:
    return datetime.fromtimestamp(int(unix_s), tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _parse_lifetime(value: Any) -> float:
    if value is None:
        return DEFAULT_LIFETIME_S
    if not isinstance(value, str):
        raise _ApiError(400, "Invalid value at 'lifetime': expected a duration like \"3600s\"")
    m = _LIFETIME.match(value)
    if not m:
        raise _ApiError(400, f"Invalid value at 'lifetime' ({value!r}): Illegal duration format")
    seconds = int(m.group(1)) + (int(m.group(2).ljust(9, "0")) / 1e9 if m.group(2) else 0.0)
    if not MIN_LIFETIME_S <= seconds <= MAX_LIFETIME_S:
        raise _ApiError(
            400,
            f"The lifetime {value} is out of range: it must be between "
            f"{int(MIN_LIFETIME_S)}s and {int(MAX_LIFETIME_S)}s",
        )
    return seconds


def _string_list(body: dict[str, Any], key: str) -> tuple[str, ...]:
    value = body.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _ApiError(400, f"Invalid value at '{key}': expected a list of strings")
    return tuple(value)


def _delegates(body: dict[str, Any]) -> tuple[str, ...]:
    delegates = _string_list(body, "delegates")
    for d in delegates:
        m = _DELEGATE.match(d)
        if not m or not (_EMAIL.match(m.group(1)) or _UNIQUE_ID.match(m.group(1))):
            raise _ApiError(
                400,
                f"Invalid delegate {d!r}: expected projects/-/serviceAccounts/{{EMAIL_OR_ID}}",
            )
    return delegates


def _check_body(body: dict[str, Any], allowed: frozenset[str]) -> None:
    for key in body:
        if key not in allowed:
            raise _ApiError(
                400, f'Invalid JSON payload received. Unknown name "{key}": Cannot find field.'
            )


def create_emulator_app(
    *,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> Flask:
    """Build the emulator's Flask app (state lives in the app; ``clock``/``sleep`` for tests)."""
    app = Flask("broker.emulator")
    state = _State()
    id_token_secret = secrets.token_bytes(32)

    def run_method(method: str) -> None:
        """Count the call, then apply injected latency (outside the lock) and faults."""
        with state.lock:
            state.stats[method] += 1
            latency_s = state.faults.latency_ms / 1000.0
            fail_status: int | None = None
            if state.faults.fail_next > 0:
                state.faults.fail_next -= 1
                fail_status = state.faults.status
        if latency_s > 0:
            sleep(latency_s)
        if fail_status is not None:
            raise _ApiError(fail_status, f"Injected fault ({fail_status}) by the emulator.")

    def generate_access_token(email: str, body: dict[str, Any]) -> dict[str, Any]:
        _check_body(body, frozenset({"scope", "lifetime", "delegates", "name"}))
        scopes = _string_list(body, "scope")
        if not scopes or not all(s.strip() for s in scopes):
            raise _ApiError(400, "Scope required.")
        lifetime_s = _parse_lifetime(body.get("lifetime"))
        delegates = _delegates(body)
        token = TOKEN_PREFIX + secrets.token_urlsafe(48)
        expire_time = _rfc3339(clock() + lifetime_s)
        minted = _MintedToken(email, scopes, expire_time, delegates)
        with state.lock:
            if len(state.tokens) >= MAX_REMEMBERED_TOKENS:
                del state.tokens[next(iter(state.tokens))]  # the oldest
            state.tokens[token] = minted
        return {"accessToken": token, "expireTime": expire_time}

    def generate_id_token(email: str, body: dict[str, Any]) -> dict[str, Any]:
        _check_body(body, frozenset({"audience", "includeEmail", "delegates", "name"}))
        audience = body.get("audience")
        if not isinstance(audience, str) or not audience.strip():
            raise _ApiError(400, "Audience required.")
        include_email = body.get("includeEmail", False)
        if not isinstance(include_email, bool):
            raise _ApiError(400, "Invalid value at 'include_email': expected a boolean")
        _delegates(body)
        now = int(clock())
        claims: dict[str, Any] = {
            "iss": "https://accounts.google.com",
            "aud": audience,
            # Google puts the account's numeric unique id here; derive a stable fake one.
            "sub": str(int.from_bytes(hashlib.sha256(email.encode()).digest()[:8], "big")),
            "azp": email,
            "iat": now,
            "exp": now + ID_TOKEN_LIFETIME_S,
        }
        if include_email:
            claims.update(email=email, email_verified=True)
        header = {"alg": "HS256", "typ": "JWT", "kid": "iam-emulator"}
        signing_input = (
            _b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + _b64url(json.dumps(claims, separators=(",", ":")).encode())
        )
        mac = hmac.new(id_token_secret, signing_input.encode("ascii"), hashlib.sha256).digest()
        return {"token": signing_input + "." + _b64url(mac)}

    @app.errorhandler(_ApiError)
    def _api_error(exc: _ApiError) -> tuple[Response, int]:
        return _error(exc.code, exc.message)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> tuple[Response, int]:
        code = exc.code or 500
        return _error(code, exc.description or exc.name)

    @app.post("/v1/projects/<project>/serviceAccounts/<name>")
    def generate(project: str, name: str) -> tuple[Response, int]:
        email, _, method = name.rpartition(":")
        if method not in METHODS:
            return _error(404, f"Method not found: {method or name!r}")
        run_method(method)
        if project != "-":
            raise _ApiError(
                400, "The project must be the wildcard '-' (projects/-/serviceAccounts/...)"
            )
        if not (_EMAIL.match(email) or _UNIQUE_ID.match(email)):
            raise _ApiError(400, f"Invalid service account name {email!r}")
        body = request.get_json(silent=True) if request.get_data() else {}
        if not isinstance(body, dict):
            raise _ApiError(400, "Invalid JSON payload received: expected a JSON object")
        if method == "generateAccessToken":
            return jsonify(generate_access_token(email, body)), 200
        return jsonify(generate_id_token(email, body)), 200

    @app.get("/emulator/tokens/<token>")
    def token_info(token: str) -> tuple[Response, int]:
        with state.lock:
            minted = state.tokens.get(token)
        if minted is None:
            return _error(404, "Unknown token.")
        return jsonify(
            {
                "service_account": minted.service_account,
                "scopes": list(minted.scopes),
                "expire_time": minted.expire_time,
                "delegates": list(minted.delegates),
            }
        ), 200

    @app.get("/emulator/stats")
    def stats() -> tuple[Response, int]:
        with state.lock:
            return jsonify(dict(state.stats)), 200

    @app.post("/emulator/faults")
    def faults() -> tuple[Response, int]:
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            return _error(400, "Expected a JSON object {latency_ms, fail_next, status}")
        _check_body(body, frozenset({"latency_ms", "fail_next", "status"}))
        for key in body:
            value = body[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                return _error(400, f"{key} must be a non-negative integer")
        status = body.get("status", 503)
        if status not in FAULT_STATUSES:
            return _error(400, f"status must be one of {sorted(FAULT_STATUSES)}")
        with state.lock:
            if "latency_ms" in body:
                state.faults.latency_ms = body["latency_ms"]
            if "fail_next" in body:
                state.faults.fail_next = body["fail_next"]
                state.faults.status = status
            elif "status" in body:
                state.faults.status = status
            current = {
                "latency_ms": state.faults.latency_ms,
                "fail_next": state.faults.fail_next,
                "status": state.faults.status,
            }
        return jsonify(current), 200

    @app.post("/emulator/reset")
    def reset() -> tuple[Response, int]:
        with state.lock:
            state.tokens.clear()
            state.stats = dict.fromkeys(METHODS, 0)
            state.faults = _Faults()
        return jsonify({}), 200

    return app


class EmulatorServer:
    """The emulator running in a background daemon thread (see :func:`start_emulator`)."""

    def __init__(self, server: BaseWSGIServer, thread: threading.Thread, host: str) -> None:
        self._server = server
        self._thread = thread
        self.host = host
        self.port: int = server.server_port

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8085``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def shutdown(self) -> None:
        """Stop serving and release the socket; waits for the serving thread."""
        self._server.shutdown()
        self._thread.join()
        self._server.server_close()

    def __repr__(self) -> str:
        return f"EmulatorServer(url={self.url!r})"


class _QuietHandler(WSGIRequestHandler):
    """No access log: its paths include emulator tokens (/emulator/tokens/<token>)."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


def start_emulator(host: str, port: int) -> EmulatorServer:
    """Serve the emulator on ``host:port`` (``0`` picks a free port) in a daemon thread."""
    server = make_server(
        host, port, create_emulator_app(), threaded=True, request_handler=_QuietHandler
    )
    thread = threading.Thread(target=server.serve_forever, name="iam-emulator", daemon=True)
    thread.start()
    return EmulatorServer(server, thread, host)


def serve_emulator(host: str, port: int) -> None:
    """Serve the emulator on ``host:port`` in the foreground until interrupted."""
    server = make_server(
        host, port, create_emulator_app(), threaded=True, request_handler=_QuietHandler
    )
    log.info("IAM Credentials emulator listening on http://%s:%d", host, server.server_port)
    try:
        server.serve_forever()
    finally:
        server.server_close()
