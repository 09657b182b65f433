"""``token-broker dev``: the whole broker in one process with nothing else installed.

Embedded store (``memory://``), the IAM emulator in-process, and a local issuer with a freshly
generated key. Everything a newcomer needs is written to ``.token-broker-dev/`` (mode 0700,
files 0600): tokens, an ``external_account`` credential file, the config it runs with.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shlex
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from broker.identity import key_id

DEV_DIR = ".token-broker-dev"
DEV_ISSUER_NAME = "dev"
DEV_ISSUER = "https://token-broker.dev.invalid"
DEV_AUDIENCE = "token-broker-dev"
ADMIN_AUDIENCE = "token-broker-admin"
# Keys generated here carry this kid prefix; `serve` refuses any issuer that trusts one.
DEV_KID_PREFIX = "token-broker-dev-"
DEV_ROLE = "flux-source-reader"
DEV_PROJECT_DOMAIN = "dev-project.iam.gserviceaccount.com"
TOKEN_LIFETIME_S = 24 * 3600
GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"


@dataclass(frozen=True)
class DevFiles:
    """Paths of what dev mode wrote, and the environment it runs with."""

    directory: Path
    config: Path
    subject_token: Path
    credentials: Path
    admin_token: Path
    auditor_token: Path
    env: Mapping[str, str]


def _write(path: Path, text: str) -> Path:
    """Write a file readable by its owner only (it may hold a credential)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(path, 0o600)
    return path


def _sign(key: rsa.RSAPrivateKey, kid: str, namespace: str, name: str, audience: str) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": DEV_ISSUER,
        "sub": f"system:serviceaccount:{namespace}:{name}",
        "aud": [audience],
        "iat": now,
        "nbf": now,
        "exp": now + TOKEN_LIFETIME_S,
        "jti": str(uuid.uuid4()),
        "kubernetes.io": {
            "namespace": namespace,
            "serviceaccount": {"name": name, "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, name))},
        },
    }
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})


def prepare(directory: Path, bind: str, iam_endpoint: str) -> DevFiles:
    """Generate the dev issuer, tokens, config and roles in ``directory``."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    directory = directory.resolve()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    kid = DEV_KID_PREFIX + key_id(key.public_key())
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid=kid, alg="RS256", use="sig")
    jwks = _write(directory / "jwks.json", json.dumps({"keys": [jwk]}, indent=2))

    roles = {
        "roles": [
            {
                "name": DEV_ROLE,
                "description": "dev: source-controller reads OCI artifacts",
                "subjects": [
                    {
                        "issuer": DEV_ISSUER_NAME,
                        "namespace": "flux-system",
                        "service_account": "source-controller",
                    }
                ],
                "service_account": f"flux-source@{DEV_PROJECT_DOMAIN}",
                "scopes": ["https://www.googleapis.com/auth/cloud-platform"],
                "lifetime": "1h",
            }
        ]
    }
    roles_path = _write(directory / "roles.yaml", yaml.safe_dump(roles, sort_keys=False))
    config: dict[str, Any] = {
        "server": {"bind": bind, "workers": 1, "threads": 8},
        "redis": {"url": "memory://", "key_prefix": "tb:"},
        "issuers": [
            {
                "name": DEV_ISSUER_NAME,
                "kind": "kubernetes",
                "issuer": DEV_ISSUER,
                "audiences": [DEV_AUDIENCE],
                "jwks_file": str(jwks),
                "max_token_lifetime": "25h",
            }
        ],
        "gcp": {
            "iam_endpoint": iam_endpoint,
            "credentials": "anonymous",
            "allowed_service_accounts": [f"*@{DEV_PROJECT_DOMAIN}"],
        },
        "roles": {"source": "file", "file": str(roles_path)},
        "access": {
            "audience": ADMIN_AUDIENCE,
            "admins": [f"{DEV_ISSUER_NAME}/token-broker/admin"],
            "auditors": [f"{DEV_ISSUER_NAME}/token-broker/auditor"],
        },
    }
    config_path = _write(directory / "broker.yaml", yaml.safe_dump(config, sort_keys=False))
    subject = _write(
        directory / "subject-token.jwt",
        _sign(key, kid, "flux-system", "source-controller", DEV_AUDIENCE),
    )
    admin = _write(
        directory / "admin-token.jwt", _sign(key, kid, "token-broker", "admin", ADMIN_AUDIENCE)
    )
    auditor = _write(
        directory / "auditor-token.jwt",
        _sign(key, kid, "token-broker", "auditor", ADMIN_AUDIENCE),
    )
    credentials = _write(
        directory / "credentials.json",
        json.dumps(
            {
                "type": "external_account",
                "audience": DEV_ROLE,
                "subject_token_type": JWT_TYPE,
                "token_url": f"http://{bind}/v1/token",
                "credential_source": {"file": str(subject)},
            },
            indent=2,
        ),
    )
    signing = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )
    env = {
        "BROKER_CACHE_KEYS": base64.b64encode(secrets.token_bytes(32)).decode(),
        "BROKER_AUDIT_SIGNING_KEY": base64.b64encode(signing).decode(),
    }
    return DevFiles(directory, config_path, subject, credentials, admin, auditor, env)


def instructions(files: DevFiles, bind: str) -> str:
    """What dev mode prints: a curl that works as printed, and the client-library line."""
    token = shlex.quote(str(files.subject_token))
    return "\n".join(
        [
            f"token-broker dev: listening on http://{bind} (embedded store, IAM emulator)",
            f"files in {files.directory}",
            "",
            "Exchange the dev subject token with curl:",
            f"  curl -s http://{bind}/v1/token \\",
            f"    -d grant_type={GRANT} \\",
            f"    -d subject_token_type={JWT_TYPE} \\",
            f"    -d audience={DEV_ROLE} \\",
            f'    --data-urlencode "subject_token@{token}"',
            "",
            "Or point any Google client library at the broker:",
            f"  export GOOGLE_APPLICATION_CREDENTIALS={shlex.quote(str(files.credentials))}",
            "",
            f"Admin token: {files.admin_token}   Auditor token: {files.auditor_token}",
            "",
        ]
    )


def run(bind: str) -> None:
    """Prepare ``.token-broker-dev/`` and serve until interrupted."""
    from werkzeug.serving import make_server

    from broker.app import create_app
    from broker.emulator import start_emulator
    from broker.settings import load_settings

    emulator = start_emulator("127.0.0.1", 0)
    files = prepare(Path(DEV_DIR), bind, emulator.url)
    os.environ.update(files.env)
    settings = load_settings(files.config)
    app = create_app(settings)
    host, _, port = bind.rpartition(":")
    server = make_server(host, int(port), app, threaded=True)
    print(instructions(files, bind), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        emulator.shutdown()
