"""``/openapi.json``: the HTTP API described (OpenAPI 3.1).

``OPERATIONS`` documents every endpoint the broker can serve; the spec served lists exactly those
the running app has registered, and a test fails if an endpoint is registered but undocumented.
"""

from __future__ import annotations

import re
from typing import Any

from flask import Blueprint, Flask, Response, current_app

from broker.http import json_response
from broker.protocol import MAX_SUBJECT_TOKEN_BYTES

bp = Blueprint("openapi", __name__)

_ERROR = {"$ref": "#/components/schemas/Error"}


def _resp(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"description": description}
    if schema is not None:
        body["content"] = {"application/json": {"schema": schema}}
    return body


_ERRORS = {
    "400": _resp("invalid_request, invalid_target, invalid_scope, unsupported_grant_type", _ERROR),
    "429": _resp("rate limited; see Retry-After", _ERROR),
    "503": _resp("temporarily_unavailable (IAM or Redis); see Retry-After", _ERROR),
}
_AUTH_ERRORS = {
    "401": _resp("no valid bearer token for access.audience", _ERROR),
    "403": _resp("caller not listed in access.admins / access.auditors", _ERROR),
}
_BEARER: list[dict[str, list[str]]] = [{"bearer": []}]

# path (OpenAPI form) -> method -> operation. Flask's <name> is written {name}.
OPERATIONS: dict[str, dict[str, dict[str, Any]]] = {
    "/v1/token": {
        "post": {
            "summary": "RFC 8693 token exchange: Kubernetes JWT in, GCP access token out",
            "requestBody": {
                "required": True,
                "content": {
                    "application/x-www-form-urlencoded": {
                        "schema": {"$ref": "#/components/schemas/TokenRequest"}
                    },
                    "application/json": {"schema": {"$ref": "#/components/schemas/TokenRequest"}},
                },
            },
            "responses": {
                "200": _resp("issued", {"$ref": "#/components/schemas/TokenResponse"}),
                **_ERRORS,
                "413": _resp("body larger than server.max_request_bytes", _ERROR),
                "502": _resp(
                    "server_error: IAM refused the broker (iam_refused) or its own GCP "
                    "credentials failed (iam_credentials); an operator must act, retrying "
                    "will not help",
                    _ERROR,
                ),
            },
        }
    },
    "/healthz": {"get": {"summary": "Liveness", "responses": {"200": _resp("alive")}}},
    "/readyz": {
        "get": {
            "summary": "Readiness: Redis reachable, roles and verification keys loaded",
            "responses": {"200": _resp("ready"), "503": _resp("not ready")},
        }
    },
    "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": _resp("text")}}},
    "/openapi.json": {"get": {"summary": "This document", "responses": {"200": _resp("spec")}}},
    "/v1/roles": {
        "get": {
            "summary": "The role table and its version (ETag)",
            "security": _BEARER,
            "responses": {"200": _resp("roles"), **_AUTH_ERRORS},
        },
        "put": {
            "summary": "Replace the whole table atomically (If-Match: the table's ETag)",
            "security": _BEARER,
            "responses": {
                "200": _resp("replaced"),
                "400": _resp("invalid_role_table: see problems", _ERROR),
                "409": _resp("roles.source is file", _ERROR),
                "412": _resp("stale ETag", _ERROR),
                "428": _resp("If-Match required", _ERROR),
                **_AUTH_ERRORS,
            },
        },
    },
    "/v1/roles/_history": {
        "get": {
            "summary": "Versions of the role table kept (redis source): revision, digest, who",
            "security": _BEARER,
            "responses": {"200": _resp("history"), **_AUTH_ERRORS},
        }
    },
    "/v1/roles/_history/{revision}": {
        "get": {
            "summary": "One past version of the role table",
            "security": _BEARER,
            "responses": {"200": _resp("table"), "404": _resp("no such revision", _ERROR),
                          **_AUTH_ERRORS},
        }
    },
    "/v1/roles/{name}": {
        "get": {
            "summary": "One role (ETag)",
            "security": _BEARER,
            "responses": {"200": _resp("role"), "404": _resp("no such role", _ERROR),
                          **_AUTH_ERRORS},
        },
        "put": {
            "summary": "Create (If-None-Match: *) or replace (If-Match) a role",
            "security": _BEARER,
            "responses": {
                "200": _resp("replaced"),
                "201": _resp("created"),
                "400": _resp("invalid_role_table: see problems", _ERROR),
                "409": _resp("roles.source is file", _ERROR),
                "412": _resp("stale ETag", _ERROR),
                "428": _resp("If-Match or If-None-Match required", _ERROR),
                **_AUTH_ERRORS,
            },
        },
        "delete": {
            "summary": "Delete a role (If-Match required)",
            "security": _BEARER,
            "responses": {
                "200": _resp("deleted: the new version, revision, diff and purge count"),
                "404": _resp("no such role", _ERROR),
                "409": _resp("roles.source is file", _ERROR),
                "412": _resp("stale ETag", _ERROR),
                "428": _resp("If-Match required", _ERROR),
                **_AUTH_ERRORS,
            },
        },
    },
    "/v1/cache/purge": {
        "post": {
            "summary": "Drop cached tokens of a role or GCP service account now",
            "security": _BEARER,
            "responses": {"200": _resp("purged"), **_AUTH_ERRORS},
        }
    },
    "/v1/explain": {
        "post": {
            "summary": "The decision the token endpoint would take, with reasons, without minting",
            "security": _BEARER,
            "responses": {"200": _resp("decision"), **_AUTH_ERRORS},
        }
    },
    "/v1/audit/events": {
        "get": {
            "summary": "Audit records (filters: since, until, subject, role, service_account, "
            "decision, event; order, limit, cursor, wait); NDJSON with Accept: "
            "application/x-ndjson",
            "security": _BEARER,
            "responses": {"200": _resp("events"), **_AUTH_ERRORS},
        }
    },
    "/v1/audit/report": {
        "get": {
            "summary": "Access review: issuance per role and service account, refusals, roles "
            "never used (since, until, top)",
            "security": _BEARER,
            "responses": {"200": _resp("report"), **_AUTH_ERRORS},
        }
    },
    "/v1/audit/verify": {
        "get": {
            "summary": "Verify every writer's hash chain and signed checkpoints",
            "security": _BEARER,
            "responses": {"200": _resp("verification report"), **_AUTH_ERRORS},
        }
    },
    "/v1/audit/public-key": {
        "get": {
            "summary": "Ed25519 public key(s) that sign audit checkpoints",
            "responses": {"200": _resp("keys")},
        }
    },
}

COMPONENTS: dict[str, Any] = {
    "securitySchemes": {
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT for access.audience",
        }
    },
    "schemas": {
        "TokenRequest": {
            "type": "object",
            "required": ["grant_type", "subject_token", "subject_token_type"],
            "properties": {
                "grant_type": {"const": "urn:ietf:params:oauth:grant-type:token-exchange"},
                "subject_token": {"type": "string", "maxLength": MAX_SUBJECT_TOKEN_BYTES},
                "subject_token_type": {
                    "enum": [
                        "urn:ietf:params:oauth:token-type:jwt",
                        "urn:ietf:params:oauth:token-type:id_token",
                    ]
                },
                "requested_token_type": {"const": "urn:ietf:params:oauth:token-type:access_token"},
                "audience": {"type": "string", "description": "the role name (optional)"},
                "scope": {"type": "string", "description": "advisory: the role scopes are issued"},
            },
        },
        "TokenResponse": {
            "type": "object",
            "required": ["access_token", "issued_token_type", "token_type", "expires_in", "scope"],
            "properties": {
                "access_token": {"type": "string"},
                "issued_token_type": {"const": "urn:ietf:params:oauth:token-type:access_token"},
                "token_type": {"const": "Bearer"},
                "expires_in": {"type": "integer", "minimum": 1},
                "scope": {"type": "string"},
            },
        },
        "Error": {
            "type": "object",
            "required": ["error", "error_description", "request_id"],
            "properties": {
                "error": {"type": "string"},
                "error_description": {"type": "string"},
                "request_id": {"type": "string"},
            },
        },
    },
}


def registered_operations(app: Flask) -> dict[str, set[str]]:
    """Path (OpenAPI form) → HTTP methods the app actually serves."""
    out: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)  # <int:rev> -> {rev}
        methods = {m.lower() for m in (rule.methods or set())} - {"head", "options"}
        out.setdefault(path, set()).update(methods)
    return out


def build_spec(app: Flask) -> dict[str, Any]:
    """The OpenAPI document for the endpoints ``app`` serves."""
    paths: dict[str, Any] = {}
    for path, methods in sorted(registered_operations(app).items()):
        documented = OPERATIONS.get(path, {})
        paths[path] = {m: documented[m] for m in sorted(methods) if m in documented}
    return {
        "openapi": "3.1.0",
        "info": {"title": "token-broker", "version": "1"},
        "paths": paths,
        "components": COMPONENTS,
    }


@bp.get("/openapi.json")
def openapi() -> Response:
    return json_response(build_spec(current_app))
