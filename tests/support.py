"""Test helpers: a local issuer with a real key, broker configs, and free ports."""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"
K8S_TOKENS = FIXTURES / "k8s-tokens"
CLIENT_REQUESTS = FIXTURES / "client-requests"

ISSUER_URL = "https://k8s.test.example/clusters/test"
AUDIENCE = "https://token-broker.test"
ADMIN_AUDIENCE = "token-broker-admin"
SA_DOMAIN = "test-project.iam.gserviceaccount.com"
CACHE_KEY = base64.b64encode(b"k" * 32).decode()
# Ed25519 seed (base64 raw 32 bytes) for BROKER_AUDIT_SIGNING_KEY in tests.
AUDIT_SIGNING_KEY = base64.b64encode(b"a" * 32).decode()
GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"


class FakeClock:
    """A clock tests move by hand (``clock.now += 60``); starts now unless told otherwise."""

    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def k8s_kid(public_key: Any) -> str:
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


@dataclass
class LocalIssuer:
    """An RSA signing key standing in for a cluster's service-account issuer."""

    issuer: str = ISSUER_URL
    key: Any = field(default_factory=lambda: rsa.generate_private_key(65537, 2048))

    @property
    def kid(self) -> str:
        return k8s_kid(self.key.public_key())

    def jwks(self) -> dict[str, Any]:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        jwk.update(kid=self.kid, alg="RS256", use="sig")
        return {"keys": [jwk]}

    def write_jwks(self, path: Path) -> Path:
        path.write_text(json.dumps(self.jwks()))
        return path

    def token(
        self,
        namespace: str = "flux-system",
        service_account: str = "source-controller",
        *,
        audience: str | list[str] = AUDIENCE,
        lifetime: int = 600,
        pod: bool = False,
        drop: tuple[str, ...] = (),
        headers: dict[str, Any] | None = None,
        **overrides: Any,
    ) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": f"system:serviceaccount:{namespace}:{service_account}",
            "aud": audience if isinstance(audience, list) else [audience],
            "iat": now,
            "nbf": now,
            "exp": now + lifetime,
            "jti": str(uuid.uuid4()),
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": {"name": service_account, "uid": str(uuid.uuid4())},
            },
        }
        if pod:
            claims["kubernetes.io"]["pod"] = {"name": "p-1", "uid": str(uuid.uuid4())}
        claims.update(overrides)
        for name in drop:
            claims.pop(name, None)
        hdr = {"kid": self.kid}
        hdr.update(headers or {})
        return jwt.encode(claims, self.key, algorithm="RS256", headers=hdr)


ROLES = {
    "roles": [
        {
            "name": "flux-source-reader",
            "description": "source-controller pulls OCI artifacts",
            "subjects": [
                {"issuer": "test", "namespace": "flux-system", "service_account": "source-controller"}
            ],
            "service_account": f"flux-source@{SA_DOMAIN}",
            "scopes": ["https://www.googleapis.com/auth/devstorage.read_only"],
            "lifetime": "1h",
        },
        {
            "name": "batch-a",
            "subjects": [{"issuer": "test", "namespace": "team-*", "service_account": "runner"}],
            "service_account": f"batch-a@{SA_DOMAIN}",
            "scopes": ["https://www.googleapis.com/auth/cloud-platform"],
            "lifetime": "30m",
        },
        {
            "name": "batch-b",
            "subjects": [{"issuer": "test", "namespace": "team-x", "service_account": "runner"}],
            "service_account": f"batch-b@{SA_DOMAIN}",
            "scopes": ["https://www.googleapis.com/auth/cloud-platform"],
            "lifetime": "30m",
        },
    ]
}


def broker_config(
    tmp: Path,
    issuer: LocalIssuer,
    *,
    redis_url: str = "redis://127.0.0.1:6379/13",
    iam_endpoint: str = "http://127.0.0.1:9",
    prefix: str | None = None,
    roles: dict[str, Any] | None = None,
    workers: int = 2,
    bind: str = "127.0.0.1:0",
    extra_issuers: list[dict[str, Any]] | None = None,
    rate_limit: dict[str, int] | None = None,
    cache: dict[str, Any] | None = None,
) -> Path:
    """Write broker.yaml, roles.yaml and jwks.json into ``tmp``; return broker.yaml's path."""
    jwks = issuer.write_jwks(tmp / "jwks.json")
    (tmp / "roles.yaml").write_text(yaml.safe_dump(roles or ROLES))
    cfg = {
        "server": {"bind": bind, "workers": workers, "threads": 8},
        "redis": {"url": redis_url, "key_prefix": prefix or f"tbt-{uuid.uuid4().hex[:8]}:"},
        "issuers": [
            {
                "name": "test",
                "issuer": issuer.issuer,
                "audiences": [AUDIENCE],
                "jwks_file": str(jwks),
                "max_token_lifetime": "2h",
            },
            *(extra_issuers or []),
        ],
        "gcp": {
            "iam_endpoint": iam_endpoint,
            "credentials": "anonymous",
            "allowed_service_accounts": [f"*@{SA_DOMAIN}"],
        },
        "roles": {"source": "file", "file": str(tmp / "roles.yaml")},
        "rate_limit": rate_limit or {"per_subject_per_minute": 0, "per_client_ip_per_minute": 0},
        "access": {"audience": ADMIN_AUDIENCE},
    }
    if cache:
        cfg["cache"] = cache
    path = tmp / "broker.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def exchange_form(token: str, **extra: str) -> dict[str, str]:
    form = {"grant_type": GRANT, "subject_token": token, "subject_token_type": JWT_TYPE}
    form.update(extra)
    return form
