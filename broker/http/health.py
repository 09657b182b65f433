"""Liveness, readiness, metrics and the API description."""

from __future__ import annotations

import redis
from flask import Blueprint, Response

from broker import metrics
from broker.http import broker, json_response

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    """Liveness: the process answers. Touches nothing else, so it answers under load."""
    return json_response({"status": "ok"})


@bp.get("/readyz")
def readyz() -> Response:
    """Readiness: Redis reachable, role table and keys loaded."""
    b = broker()
    checks: dict[str, str] = {}
    try:
        b.redis.ping()
        checks["redis"] = "ok"
    except redis.RedisError as exc:
        checks["redis"] = f"unreachable ({type(exc).__name__})"
    checks["roles"] = "ok" if b.roles() is not None else "not loaded"
    checks["keys"] = "ok" if b.verifier.ready() else "no verification keys"
    ok = all(v == "ok" for v in checks.values())
    return json_response({"ready": ok, "checks": checks}, 200 if ok else 503)


@bp.get("/metrics")
def prometheus() -> Response:
    body, content_type = metrics.render()
    return Response(body, mimetype=None, content_type=content_type)
