"""The application factory: the only place that builds the broker's collaborators."""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO

import redis
from flask import Flask, Response, g
from werkzeug.exceptions import HTTPException

from broker.access import AccessControl
from broker.audit import AuditLog
from broker.cache import CacheKeys, TokenCache
from broker.errors import BrokerError, ConfigError, RequestTooLarge
from broker.exchange import TokenExchange
from broker.identity import Verifier
from broker.minting import Minter, build_minter
from broker.policy import RoleTable, load_role_table
from broker.ratelimit import RateLimiter
from broker.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Broker:
    """Everything a request handler needs, built once per worker process."""

    settings: Settings
    redis: redis.Redis
    verifier: Verifier
    roles: Callable[[], RoleTable]
    cache: TokenCache
    audit: AuditLog
    exchange: TokenExchange
    limiter: RateLimiter
    access: AccessControl


def connect_redis(url: str) -> redis.Redis:
    """A client for ``url``; ``memory://`` is an embedded store for one process (dev mode)."""
    if url.startswith("memory://"):
        import fakeredis  # only dev mode needs it

        return fakeredis.FakeRedis()
    # Short timeouts: a Redis outage must turn into a 503 quickly, not hang workers.
    return redis.Redis.from_url(
        url, socket_timeout=2.0, socket_connect_timeout=1.0, health_check_interval=30
    )


def load_cache_keys(settings: Settings, env: Mapping[str, str]) -> CacheKeys:
    value = env.get(settings.cache.keys_env, "")
    if not value.strip():
        raise ConfigError(
            "environment",
            [
                f"{settings.cache.keys_env}: not set; it must hold one or more comma-separated "
                "base64 32-byte keys (generate one with `token-broker keygen`)"
            ],
        )
    return CacheKeys.parse(value, env_var=settings.cache.keys_env)


def load_roles(settings: Settings) -> RoleTable:
    """The role table of ``settings`` (raises :class:`ConfigError` naming file, role, field)."""
    return load_role_table(
        settings.path(settings.roles.file),
        issuers={i.name: i.kind for i in settings.issuers},
        allowed_service_accounts=settings.gcp.allowed_service_accounts,
        allow_extended_lifetime=settings.gcp.allow_extended_lifetime,
        min_remaining_s=settings.cache.min_remaining,
    )


def check_startup(settings: Settings, env: Mapping[str, str]) -> None:
    """Everything that can refuse a start without connecting: roles, cache keys, key files."""
    load_roles(settings)
    load_cache_keys(settings, env)
    Verifier(settings.issuers, resolve_path=settings.path)


def create_app(
    settings: Settings,
    *,
    redis_client: redis.Redis | None = None,
    minter: Minter | None = None,
    env: Mapping[str, str] | None = None,
    audit_out: IO[str] | None = None,
    clock: Callable[[], float] = time.time,
) -> Flask:
    """Build the Flask app and every collaborator from ``settings``. Nothing connects here."""
    env = os.environ if env is None else env
    client = redis_client if redis_client is not None else connect_redis(settings.redis.url)
    prefix = settings.redis.key_prefix
    table = load_roles(settings)
    for warning in table.warnings:
        log.warning("roles: %s", warning)
    verifier = Verifier(settings.issuers, resolve_path=settings.path, clock=clock)
    cache = TokenCache(
        client,
        load_cache_keys(settings, env),
        prefix=prefix,
        min_remaining_s=settings.cache.min_remaining,
        clock=clock,
    )
    audit = AuditLog(
        client,
        prefix=prefix,
        retention_s=settings.audit.retention,
        stdout=settings.audit.stdout,
        out=audit_out,
        clock=clock,
    )
    limiter = RateLimiter(client, prefix=prefix, clock=clock)
    exchange = TokenExchange(
        settings=settings,
        verifier=verifier,
        roles=lambda: table,
        cache=cache,
        minter=minter if minter is not None else build_minter(settings.gcp),
        audit=audit,
        limiter=limiter,
        clock=clock,
    )
    broker = Broker(
        settings=settings,
        redis=client,
        verifier=verifier,
        roles=lambda: table,
        cache=cache,
        audit=audit,
        exchange=exchange,
        limiter=limiter,
        access=AccessControl(verifier, settings.access),
    )
    _start_fold_flusher(audit)

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.server.max_request_bytes
    app.extensions["broker"] = broker

    from broker.http import health, token

    app.register_blueprint(token.bp)
    app.register_blueprint(health.bp)
    app.after_request(_request_id_header)
    _register_error_handlers(app)
    return app


def _start_fold_flusher(audit: AuditLog) -> None:
    """Close denial-fold windows every second, so folded counts reach the log promptly."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(0.5):
            audit.flush_folds()

    def final_flush() -> None:
        stop.set()
        audit.flush_folds(force=True)

    threading.Thread(target=loop, name="audit-fold-flusher", daemon=True).start()
    atexit.register(final_flush)


def _register_error_handlers(app: Flask) -> None:
    """The one place where errors become HTTP responses."""
    from broker.http import error_json

    @app.errorhandler(BrokerError)
    def _broker_error(exc: BrokerError) -> Response:
        return error_json(exc)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        if exc.code == 413:
            return error_json(RequestTooLarge("request body is too large"))
        err = BrokerError(exc.description or exc.name, reason=f"http_{exc.code}")
        err.status = exc.code or 500
        err.error = "invalid_request" if (exc.code or 500) < 500 else "server_error"
        return error_json(err)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unexpected error handling request %s", g.get("request_id", "-"))
        return error_json(BrokerError("internal error; see the broker's log"))


def _request_id_header(resp: Response) -> Response:
    from broker.http import request_id

    resp.headers["X-Request-Id"] = request_id()
    return resp

