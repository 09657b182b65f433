"""broker.identity: real Kubernetes / EKS fixtures, plus generated keys for every bad input."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

import broker.identity as identity_module
from broker.errors import ConfigError, InvalidSubjectToken
from broker.identity import (
    MAX_TOKEN_BYTES,
    REASONS,
    Verifier,
    b64url_decode,
    key_id,
    load_jwks,
    load_keys,
)
from broker.jwks_fetch import FetchError, KeyFetcher
from broker.settings import API_SERVER_AUDIENCES, IssuerSettings
from tests.support import AUDIENCE, FakeClock, LocalIssuer

FIXTURES = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures" / "k8s-tokens"
MINIKUBE = FIXTURES / "01_projected_minikube_rs256"
LEGACY = FIXTURES / "02_legacy_secret_rs256"
LEGACY_ES384 = FIXTURES / "03_legacy_es384_kid"
EKS = FIXTURES / "04_projected_eks_rs256_jti_node"
KID_VECTORS = FIXTURES / "05_k8s_kid_vectors"

EKS_ISSUER = "https://oidc.eks.eu-west-1.amazonaws.com/id/B88E7287E54DB073AC9CDC2FD1BE0969"
EKS_EXP = 1764056278

NOW = 1_800_000_000.0
ISS = "https://k8s.test.example/clusters/test"
AUD = "https://token-broker.test"
DROP = object()  # claims(...) value meaning "leave this claim out"


class Clock(FakeClock):
    def __init__(self, now: float = NOW) -> None:
        super().__init__(now)


def fixture_token(path: Path) -> str:
    return path.read_text()  # unstripped, as google-auth would send it


def refused(verifier: Verifier, token: str, reason: str, *fragments: str, **kw: Any) -> str:
    """Assert the token is refused for ``reason`` with a description naming ``fragments``."""
    with pytest.raises(InvalidSubjectToken) as info:
        verifier.verify(token, **kw)
    exc = info.value
    assert exc.reason == reason, exc.description
    assert reason in REASONS
    assert exc.error == "invalid_request" and exc.status == 400
    for fragment in fragments:
        assert fragment in exc.description
    stripped = token.strip()
    if stripped:
        assert stripped not in exc.description
        signature = stripped.rsplit(".", 1)[-1]
        if len(signature) >= 8:
            assert signature not in exc.description
    return exc.description


# --------------------------------------------------------------------------- real fixtures


def minikube_issuer(key_file: Path, **kw: Any) -> IssuerSettings:
    base: dict[str, Any] = {
        "name": "minikube",
        "issuer": "kubernetes/serviceaccount",
        "audiences": ("kubernetes.default.svc",),
        "allow_api_server_audience": True,
        "max_token_lifetime": "3700d",
        "jwks_file": str(key_file),
    }
    return IssuerSettings(**{**base, **kw})


@pytest.mark.parametrize("key_file", ["sa.pub.pem", "jwks.DERIVED.json"])
def test_minikube_projected_token_accepted(key_file: str) -> None:
    verifier = Verifier([minikube_issuer(MINIKUBE / key_file)])
    who = verifier.verify(fixture_token(MINIKUBE / "token_valid_until_2030.jwt"))
    assert who.issuer_name == "minikube"
    assert who.issuer == "kubernetes/serviceaccount"
    assert who.kind == "kubernetes"
    assert who.subject == "system:serviceaccount:default:default"
    assert (who.namespace, who.service_account) == ("default", "default")
    assert who.service_account_uid == "77c81ad7-1bea-4d94-9ca5-f5d7f3632331"
    assert (who.pod, who.pod_uid) == ("vault", "086c2f61-dea2-47bb-b5ca-63e63c5c9885")
    assert who.node is None and who.jti is None and who.legacy is False
    assert (who.issued_at, who.expires_at) == (1604082797, 1920082797)
    assert who.principal == "minikube/default/default"


def test_minikube_token_is_for_the_api_server_so_refused_without_the_flag() -> None:
    verifier = Verifier([minikube_issuer(MINIKUBE / "sa.pub.pem", allow_api_server_audience=False)])
    refused(
        verifier,
        fixture_token(MINIKUBE / "token_valid_until_2030.jwt"),
        "api_server_audience",
        "kubernetes.default.svc",
        "allow_api_server_audience",
    )


def test_minikube_lifetime_over_cap_is_refused() -> None:
    verifier = Verifier([minikube_issuer(MINIKUBE / "sa.pub.pem", max_token_lifetime="1h")])
    refused(
        verifier,
        fixture_token(MINIKUBE / "token_valid_until_2030.jwt"),
        "lifetime_too_long",
        "316000000 s",
        "3600 s",
    )


def test_minikube_expired_token() -> None:
    verifier = Verifier([minikube_issuer(MINIKUBE / "sa.pub.pem")])
    refused(
        verifier,
        fixture_token(MINIKUBE / "token_expired_2020.jwt"),
        "token_expired",
        "2020-10-30T18:51:26Z",
    )


def test_minikube_kid_is_the_kubernetes_derivation() -> None:
    public = serialization.load_pem_public_key((MINIKUBE / "sa.pub.pem").read_bytes())
    assert isinstance(public, rsa.RSAPublicKey)
    header = jwt.get_unverified_header(
        fixture_token(MINIKUBE / "token_valid_until_2030.jwt").strip()
    )
    derived = json.loads((MINIKUBE / "jwks.DERIVED.json").read_text())["keys"][0]["kid"]
    assert key_id(public) == header["kid"] == derived


@pytest.mark.parametrize(
    ("key_file", "token_file", "service_account"),
    [
        (LEGACY / "minikube_rsa_cert.pem", LEGACY / "token.jwt", "vault-auth"),
        (
            LEGACY / "minikube_rsa_cert.pem",
            LEGACY / "token_bad_serviceaccount.jwt",
            "vault-invalid",
        ),
        (LEGACY_ES384 / "ecdsa_p384.pub.pem", LEGACY_ES384 / "token.jwt", "vault-auth"),
    ],
)
def test_legacy_tokens_refused_unless_allowed(
    key_file: Path, token_file: Path, service_account: str
) -> None:
    token = fixture_token(token_file)
    strict = Verifier([minikube_issuer(key_file)])
    refused(strict, token, "legacy_token", "legacy", "minikube")

    lenient = Verifier([minikube_issuer(key_file, allow_legacy_tokens=True)])
    who = lenient.verify(token)
    assert who.legacy is True
    assert who.namespace == "default"
    assert who.service_account == service_account
    assert who.subject == f"system:serviceaccount:default:{service_account}"
    assert who.expires_at is None and who.pod is None
    # A legacy token has no audience: never good enough for an explicit (admin) audience.
    refused(
        lenient,
        token,
        "wrong_audience",
        "legacy",
        "token-broker-admin",
        audiences=("token-broker-admin",),
    )


@pytest.mark.parametrize("allow_legacy", [False, True])
def test_legacy_token_from_a_foreign_key_has_a_bad_signature(allow_legacy: bool) -> None:
    verifier = Verifier(
        [minikube_issuer(LEGACY / "minikube_rsa_cert.pem", allow_legacy_tokens=allow_legacy)]
    )
    refused(
        verifier,
        fixture_token(LEGACY / "token_bad_signing_key.jwt"),
        "bad_signature",
        "RS256",
        "minikube",
    )


def eks_issuer(**kw: Any) -> IssuerSettings:
    base: dict[str, Any] = {
        "name": "eks",
        "issuer": EKS_ISSUER,
        "audiences": ("sts.amazonaws.com",),
        "max_token_lifetime": "1d",
        "jwks_file": str(EKS / "jwks.json"),
    }
    return IssuerSettings(**{**base, **kw})


def test_eks_token_verifies_before_its_expiry() -> None:
    verifier = Verifier([eks_issuer()], clock=Clock(EKS_EXP - 3600))
    who = verifier.verify(fixture_token(EKS / "token.jwt"))
    assert who.issuer == EKS_ISSUER
    assert who.subject == "system:serviceaccount:hakawai:hakawai-litellm-proxy"
    assert who.jti == "1b20f55e-e39a-4010-96e3-5bba8e300ae7"
    assert who.node == "ip-10-15-179-190.eu-west-1.compute.internal"
    assert who.pod == "hakawai-litellm-proxy-57456bb9cb-bwzxh"
    assert who.expires_at == EKS_EXP
    assert who.principal == "eks/hakawai/hakawai-litellm-proxy"


def test_eks_token_is_expired_now() -> None:
    verifier = Verifier([eks_issuer()], clock=Clock(EKS_EXP + 61))
    refused(verifier, fixture_token(EKS / "token.jwt"), "token_expired", "2025-11-25T07:37:58Z")
    verifier = Verifier([eks_issuer()])  # the real clock: it is past 2025-11-25
    refused(verifier, fixture_token(EKS / "token.jwt"), "token_expired")


def test_eks_default_24h_tokens_exceed_a_2h_cap() -> None:
    verifier = Verifier([eks_issuer(max_token_lifetime="2h")], clock=Clock(EKS_EXP - 3600))
    refused(verifier, fixture_token(EKS / "token.jwt"), "lifetime_too_long", "86400 s", "7200 s")


def test_eks_token_for_another_audience() -> None:
    verifier = Verifier([eks_issuer(audiences=(AUD,))], clock=Clock(EKS_EXP - 3600))
    refused(verifier, fixture_token(EKS / "token.jwt"), "wrong_audience", "sts.amazonaws.com", AUD)


def test_kubernetes_kid_vectors() -> None:
    lines = (KID_VECTORS / "expected_kids.txt").read_text().split("\n")
    vectors = dict(line.split() for line in lines if line.strip())
    assert set(vectors) == {"rsa.pub.pem", "ecdsa_p256.pub.pem"}
    for name, expected in vectors.items():
        data = (KID_VECTORS / name).read_bytes()
        public = serialization.load_pem_public_key(data)
        assert isinstance(public, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
        assert key_id(public) == expected
        keys, problems = load_keys(data)  # a PEM key without kid gets the derived one
        assert [k.kid for k in keys.keys] == [expected] and problems == []


# --------------------------------------------------------------------------- generated keys


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_key2() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def ec384_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def jwk(private: Any, kid: str | None, **extra: Any) -> dict[str, Any]:
    public = private.public_key()
    algo = RSAAlgorithm if isinstance(public, rsa.RSAPublicKey) else ECAlgorithm
    out: dict[str, Any] = algo.to_jwk(public, as_dict=True)
    if kid is not None:
        out["kid"] = kid
    return {**out, "use": "sig", **extra}


def write_keys(path: Path, content: dict[str, Any] | bytes | str) -> None:
    """Replace the key file atomically, as kubelet's ConfigMap/Secret volumes do."""
    tmp = path.with_suffix(".tmp")
    if isinstance(content, dict):
        tmp.write_text(json.dumps(content))
    elif isinstance(content, bytes):
        tmp.write_bytes(content)
    else:
        tmp.write_text(content)
    os.replace(tmp, path)


def pem(private: Any) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": ISS,
        "aud": [AUD],
        "sub": "system:serviceaccount:flux-system:source-controller",
        "iat": int(NOW) - 60,
        "nbf": int(NOW) - 60,
        "exp": int(NOW) + 3000,
        "jti": "0b7c6c3e-1f0e-4c5a-9d7e-6a1f2b3c4d5e",
        "kubernetes.io": {
            "namespace": "flux-system",
            "serviceaccount": {"name": "source-controller", "uid": "sa-uid-1"},
            "pod": {"name": "source-controller-7d9f", "uid": "pod-uid-1"},
            "node": {"name": "node-a", "uid": "node-uid-1"},
        },
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not DROP}


def k8s(**overrides: Any) -> dict[str, Any]:
    """A kubernetes.io claim with overrides (DROP removes a member)."""
    base = claims()["kubernetes.io"]
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not DROP}


def sign(
    private: Any,
    payload: dict[str, Any],
    *,
    alg: str = "RS256",
    kid: str | None = "k1",
    headers: dict[str, Any] | None = None,
) -> str:
    hdr = {"kid": kid} if kid is not None else {}
    return jwt.encode(payload, private, algorithm=alg, headers={**hdr, **(headers or {})})


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"sig") -> str:
    return (
        f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}.{b64(signature)}"
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def jwks_path(tmp_path: Path, rsa_key: Any, ec_key: Any) -> Path:
    path = tmp_path / "jwks.json"
    write_keys(path, {"keys": [jwk(rsa_key, "k1"), jwk(ec_key, "e1")]})
    return path


@pytest.fixture
def make(jwks_path: Path, clock: Clock):
    def make(**kw: Any) -> Verifier:
        base: dict[str, Any] = {
            "name": "test",
            "issuer": ISS,
            "audiences": (AUD,),
            "jwks_file": str(jwks_path),
        }
        return Verifier([IssuerSettings(**{**base, **kw})], clock=clock)

    return make


@pytest.fixture
def verifier(make) -> Verifier:
    return make()


def test_generated_token_accepted(verifier: Verifier, rsa_key: Any) -> None:
    who = verifier.verify(sign(rsa_key, claims()) + "\n")
    assert who.issuer_name == "test" and who.issuer == ISS and who.kind == "kubernetes"
    assert who.subject == "system:serviceaccount:flux-system:source-controller"
    assert (who.namespace, who.service_account, who.service_account_uid) == (
        "flux-system",
        "source-controller",
        "sa-uid-1",
    )
    assert (who.pod, who.pod_uid, who.node) == ("source-controller-7d9f", "pod-uid-1", "node-a")
    assert who.jti == "0b7c6c3e-1f0e-4c5a-9d7e-6a1f2b3c4d5e"
    assert who.expires_at == NOW + 3000 and who.issued_at == NOW - 60
    assert who.principal == "test/flux-system/source-controller"


def test_flux_style_token_without_pod_or_node(verifier: Verifier, rsa_key: Any) -> None:
    token = sign(rsa_key, claims(jti=DROP, **{"kubernetes.io": k8s(pod=DROP, node=DROP)}))
    who = verifier.verify(token)
    assert who.service_account == "source-controller"
    assert who.pod is None and who.pod_uid is None and who.node is None and who.jti is None


def test_single_string_audience_accepted(verifier: Verifier, rsa_key: Any) -> None:
    assert verifier.verify(sign(rsa_key, claims(aud=AUD))).subject.endswith("source-controller")


@pytest.mark.parametrize(
    ("alg", "key_name", "kid"),
    [
        ("RS256", "rsa_key", "k1"),
        ("RS384", "rsa_key", "k1"),
        ("RS512", "rsa_key", "k1"),
        ("PS256", "rsa_key", "k1"),
        ("ES256", "ec_key", "e1"),
    ],
)
def test_allowed_algorithms(
    verifier: Verifier, request: pytest.FixtureRequest, alg: str, key_name: str, kid: str
) -> None:
    key = request.getfixturevalue(key_name)
    assert verifier.verify(sign(key, claims(), alg=alg, kid=kid)).namespace == "flux-system"


def test_es384_from_pem(tmp_path: Path, clock: Clock, ec384_key: Any) -> None:
    path = tmp_path / "keys.pem"
    path.write_bytes(pem(ec384_key))
    verifier = Verifier(
        [IssuerSettings(name="t", issuer=ISS, audiences=(AUD,), jwks_file=str(path))], clock=clock
    )
    kid = key_id(ec384_key.public_key())
    assert verifier.verify(sign(ec384_key, claims(), alg="ES384", kid=kid)).namespace


def test_alg_none_refused(verifier: Verifier) -> None:
    token = raw_token({"alg": "none", "kid": "k1"}, claims(), b"")
    assert token.endswith(".")
    refused(verifier, token, "unsupported_algorithm", "'none'")
    refused(verifier, raw_token({"alg": "none", "kid": "k1"}, claims()), "unsupported_algorithm")


def test_hs256_signed_with_the_public_key_is_refused(
    jwks_path: Path, verifier: Verifier, rsa_key: Any
) -> None:
    # The classic confusion attack: HMAC keyed with the RSA public key the verifier holds.
    header = {"alg": "HS256", "kid": "k1", "typ": "JWT"}
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims()).encode())}"
    for secret in (pem(rsa_key), jwks_path.read_bytes()):
        mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        refused(verifier, f"{signing_input}.{b64(mac)}", "unsupported_algorithm", "'HS256'")


@pytest.mark.parametrize("alg", ["HS384", "HS512", "ES512", "EdDSA", "RS1", "", None, 256])
def test_other_algorithms_refused(verifier: Verifier, alg: Any) -> None:
    refused(verifier, raw_token({"alg": alg, "kid": "k1"}, claims()), "unsupported_algorithm")


def test_alg_must_fit_the_key_type(verifier: Verifier, rsa_key: Any, ec_key: Any) -> None:
    # An EC-signed token naming the RSA key, and the other way round.
    refused(
        verifier,
        sign(ec_key, claims(), alg="ES256", kid="k1"),
        "unsupported_algorithm",
        "ES256",
        "RSA",
    )
    refused(
        verifier,
        sign(rsa_key, claims(), alg="RS256", kid="e1"),
        "unsupported_algorithm",
        "RS256",
        "EC P-256",
    )


def test_jwk_alg_narrows_the_key(tmp_path: Path, make, jwks_path: Path, rsa_key: Any) -> None:
    write_keys(jwks_path, {"keys": [jwk(rsa_key, "k1", alg="RS256")]})
    verifier = make()
    assert verifier.verify(sign(rsa_key, claims(), alg="RS256")).namespace
    refused(verifier, sign(rsa_key, claims(), alg="PS256"), "unsupported_algorithm", "PS256")


def test_unknown_kid(verifier: Verifier, rsa_key2: Any, rsa_key: Any) -> None:
    refused(verifier, sign(rsa_key2, claims(), kid="k9"), "unknown_key", "'k9'", "'test'")
    # Published kids are authoritative: the right key under a wrong kid is still unknown.
    refused(verifier, sign(rsa_key, claims(), kid="k9"), "unknown_key", "'k9'")


def test_signature_by_another_key_under_a_known_kid(verifier: Verifier, rsa_key2: Any) -> None:
    refused(verifier, sign(rsa_key2, claims(), kid="k1"), "bad_signature", "'k1'", "RS256")


def test_tampered_payload(verifier: Verifier, rsa_key: Any) -> None:
    header, _, signature = sign(rsa_key, claims()).split(".")
    forged = b64(json.dumps(claims(sub="system:serviceaccount:kube-system:admin")).encode())
    refused(verifier, f"{header}.{forged}.{signature}", "bad_signature")


def test_token_without_kid_tries_fitting_keys(
    make, jwks_path: Path, rsa_key: Any, rsa_key2: Any, ec_key: Any
) -> None:
    write_keys(jwks_path, {"keys": [jwk(rsa_key, "k1"), jwk(rsa_key2, "k2"), jwk(ec_key, "e1")]})
    verifier = make()
    assert verifier.verify(sign(rsa_key2, claims(), kid=None)).namespace
    assert verifier.verify(sign(ec_key, claims(), alg="ES256", kid=None)).namespace
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    refused(verifier, sign(other, claims(), kid=None), "bad_signature", "any of 2 key(s)")


def test_pem_keys_get_derived_kids_and_are_tried_for_any_kid(
    tmp_path: Path, clock: Clock, rsa_key: Any, rsa_key2: Any
) -> None:
    path = tmp_path / "sa.pub"
    path.write_bytes(pem(rsa_key))
    verifier = Verifier(
        [IssuerSettings(name="t", issuer=ISS, audiences=(AUD,), jwks_file=str(path))], clock=clock
    )
    derived = key_id(rsa_key.public_key())
    assert verifier.verify(sign(rsa_key, claims(), kid=derived)).namespace
    assert verifier.verify(sign(rsa_key, claims(), kid=None)).namespace
    # Like kube-apiserver with --service-account-key-file: the kid is only a hint.
    assert verifier.verify(sign(rsa_key, claims(), kid="hand-made")).namespace
    refused(verifier, sign(rsa_key2, claims(), kid="hand-made"), "unknown_key", "'hand-made'")
    refused(verifier, sign(rsa_key2, claims(), kid=derived), "bad_signature")


def test_unknown_issuer(verifier: Verifier, rsa_key: Any) -> None:
    refused(
        verifier,
        sign(rsa_key, claims(iss="https://evil.example")),
        "unknown_issuer",
        "'https://evil.example'",
    )
    refused(verifier, sign(rsa_key, claims(iss=DROP)), "claims_missing", "iss")
    refused(verifier, raw_token({"alg": "RS256"}, claims(iss=["x"])), "token_malformed", "iss")


def test_wrong_and_missing_audience(verifier: Verifier, rsa_key: Any) -> None:
    refused(
        verifier,
        sign(rsa_key, claims(aud=["https://other.example"])),
        "wrong_audience",
        "https://other.example",
        AUD,
    )
    refused(verifier, sign(rsa_key, claims(aud=DROP)), "claims_missing", "aud")
    refused(verifier, sign(rsa_key, claims(aud=[1])), "token_malformed", "aud")
    refused(verifier, sign(rsa_key, claims(aud=[])), "wrong_audience", AUD)


@pytest.mark.parametrize("api_aud", [*API_SERVER_AUDIENCES, ISS])
def test_api_server_audiences_refused_unless_allowed(make, rsa_key: Any, api_aud: str) -> None:
    strict = make()
    refused(strict, sign(rsa_key, claims(aud=[api_aud])), "api_server_audience", api_aud)
    # Also when the token names our audience too: it is an API-server credential as well.
    refused(strict, sign(rsa_key, claims(aud=[AUD, api_aud])), "api_server_audience", api_aud)

    lenient = make(allow_api_server_audience=True)
    assert lenient.verify(sign(rsa_key, claims(aud=[api_aud]))).namespace == "flux-system"
    assert lenient.verify(sign(rsa_key, claims(aud=[AUD, api_aud]))).namespace == "flux-system"
    # ...but never for an explicit (admin) audience.
    refused(
        lenient,
        sign(rsa_key, claims(aud=[api_aud])),
        "wrong_audience",
        "token-broker-admin",
        audiences=("token-broker-admin",),
    )


def test_explicit_audiences_replace_the_configured_ones(verifier: Verifier, rsa_key: Any) -> None:
    admin = sign(rsa_key, claims(aud=["token-broker-admin"]))
    who = verifier.verify(admin, audiences=("token-broker-admin",))
    assert who.principal == "test/flux-system/source-controller"
    refused(verifier, admin, "wrong_audience", "token-broker-admin", AUD)
    refused(
        verifier,
        sign(rsa_key, claims()),
        "wrong_audience",
        "token-broker-admin",
        audiences=("token-broker-admin",),
    )


def test_expired(verifier: Verifier, rsa_key: Any, clock: Clock) -> None:
    token = sign(rsa_key, claims(iat=int(NOW) - 600, nbf=int(NOW) - 600, exp=int(NOW) - 61))
    refused(verifier, token, "token_expired", "expired at", "61 s ago")
    clock.now = NOW - 100  # within the 60 s leeway it is still good
    assert verifier.verify(token).namespace


def test_not_yet_valid(verifier: Verifier, rsa_key: Any) -> None:
    refused(
        verifier,
        sign(rsa_key, claims(nbf=int(NOW) + 120)),
        "token_not_yet_valid",
        "not valid before",
    )
    refused(
        verifier,
        sign(rsa_key, claims(iat=int(NOW) + 120, nbf=int(NOW))),
        "token_not_yet_valid",
        "issued in the future",
    )
    # Clock skew inside the leeway is tolerated.
    assert verifier.verify(sign(rsa_key, claims(iat=int(NOW) + 30, nbf=int(NOW) + 30))).namespace


@pytest.mark.parametrize("name", ["exp", "iat", "nbf"])
def test_time_claims_required(verifier: Verifier, rsa_key: Any, name: str) -> None:
    refused(verifier, sign(rsa_key, claims(**{name: DROP})), "claims_missing", f"no {name} claim")


@pytest.mark.parametrize("value", ["1900000000", True, None, [1900000000], {"t": 1}])
def test_time_claims_must_be_numbers(verifier: Verifier, rsa_key: Any, value: Any) -> None:
    if value is None:  # JSON null counts as missing
        refused(verifier, sign(rsa_key, claims(exp=None)), "claims_missing", "exp")
    else:
        refused(verifier, sign(rsa_key, claims(exp=value)), "token_malformed", "exp", "number")


def test_infinite_exp_refused(verifier: Verifier, rsa_key: Any) -> None:
    # json.dumps writes Infinity; a permissive parser would make a token that never expires.
    refused(verifier, sign(rsa_key, claims(exp=float("inf"))), "token_malformed", "JSON")


def test_lifetime_cap(make, rsa_key: Any) -> None:
    verifier = make(max_token_lifetime="2h")
    iat = int(NOW) - 60
    refused(
        verifier,
        sign(rsa_key, claims(iat=iat, exp=iat + 7201)),
        "lifetime_too_long",
        "7201 s",
        "7200 s",
        "'test'",
    )
    assert verifier.verify(sign(rsa_key, claims(iat=iat, exp=iat + 7200))).namespace
    refused(
        verifier,
        sign(rsa_key, claims(iat=int(NOW), exp=int(NOW) - 1)),
        "claims_inconsistent",
        "before its iat",
    )


def test_sub_must_match_the_service_account(verifier: Verifier, rsa_key: Any) -> None:
    token = sign(rsa_key, claims(sub="system:serviceaccount:kube-system:admin"))
    refused(
        verifier,
        token,
        "claims_inconsistent",
        "kube-system:admin",
        "system:serviceaccount:flux-system:source-controller",
    )
    refused(verifier, sign(rsa_key, claims(sub=DROP)), "claims_missing", "sub")


@pytest.mark.parametrize(
    ("kubernetes_io", "reason", "fragment"),
    [
        (DROP, "claims_missing", "kubernetes.io claim"),
        ("flux-system", "token_malformed", "kubernetes.io claim is not an object"),
        ({"namespace": "flux-system"}, "claims_missing", "kubernetes.io.serviceaccount"),
        ("no-namespace", "claims_missing", "kubernetes.io.namespace"),
        ("no-sa-name", "claims_missing", "kubernetes.io.serviceaccount.name"),
        ("no-sa-uid", "claims_missing", "kubernetes.io.serviceaccount.uid"),
        ("pod-without-name", "token_malformed", "kubernetes.io.pod"),
    ],
)
def test_kubernetes_claims_required(
    verifier: Verifier, rsa_key: Any, kubernetes_io: Any, reason: str, fragment: str
) -> None:
    cases = {
        "no-namespace": k8s(namespace=DROP),
        "no-sa-name": k8s(serviceaccount={"uid": "sa-uid-1"}),
        "no-sa-uid": k8s(serviceaccount={"name": "source-controller"}),
        "pod-without-name": k8s(pod={"uid": "x"}),
    }
    value = (
        cases.get(kubernetes_io, kubernetes_io)
        if isinstance(kubernetes_io, str)
        else (kubernetes_io)
    )
    refused(verifier, sign(rsa_key, claims(**{"kubernetes.io": value})), reason, fragment)


def test_oidc_issuer_needs_only_sub(make, rsa_key: Any) -> None:
    verifier = make(kind="oidc")
    token = sign(rsa_key, claims(sub="ci-runner@corp.example", nbf=DROP, **{"kubernetes.io": DROP}))
    who = verifier.verify(token)
    assert who.kind == "oidc" and who.subject == "ci-runner@corp.example"
    assert who.namespace is None and who.principal == "test/ci-runner@corp.example"
    refused(
        verifier,
        sign(rsa_key, claims(sub=DROP, **{"kubernetes.io": DROP})),
        "claims_missing",
        "sub",
    )
    refused(verifier, sign(rsa_key, claims(exp=DROP)), "claims_missing", "exp")


def legacy_claims(**overrides: Any) -> dict[str, Any]:
    base = {
        "iss": ISS,
        "sub": "system:serviceaccount:ci:builder",
        "kubernetes.io/serviceaccount/namespace": "ci",
        "kubernetes.io/serviceaccount/secret.name": "builder-token-abcde",
        "kubernetes.io/serviceaccount/service-account.name": "builder",
        "kubernetes.io/serviceaccount/service-account.uid": "uid-7",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not DROP}


def test_generated_legacy_tokens(make, rsa_key: Any) -> None:
    token = sign(rsa_key, legacy_claims(), kid=None)
    refused(make(), token, "legacy_token", "legacy")
    lenient = make(allow_legacy_tokens=True)
    who = lenient.verify(token)
    assert (who.legacy, who.namespace, who.service_account, who.service_account_uid) == (
        True,
        "ci",
        "builder",
        "uid-7",
    )
    mismatched = sign(rsa_key, legacy_claims(sub="system:serviceaccount:ci:root"), kid=None)
    refused(lenient, mismatched, "claims_inconsistent", "ci:root")
    # If a legacy-shaped token does carry exp or aud, they are still enforced.
    refused(lenient, sign(rsa_key, legacy_claims(exp=int(NOW) - 3600)), "token_expired")
    refused(lenient, sign(rsa_key, legacy_claims(aud=["x"])), "wrong_audience")


def test_flat_claims_beside_a_kubernetes_io_object_are_not_legacy(
    verifier: Verifier, rsa_key: Any
) -> None:
    token = sign(rsa_key, claims(**{"kubernetes.io/serviceaccount/namespace": "other"}))
    who = verifier.verify(token)
    assert who.legacy is False and who.namespace == "flux-system"


def test_oversized_token(verifier: Verifier, rsa_key: Any) -> None:
    big = sign(rsa_key, claims(padding="x" * MAX_TOKEN_BYTES))
    refused(verifier, big, "token_too_large", str(MAX_TOKEN_BYTES))
    refused(verifier, "a" * (MAX_TOKEN_BYTES + 1), "token_too_large")


@pytest.mark.parametrize("token", ["", "   ", "\n\t "])
def test_empty_token(verifier: Verifier, token: str) -> None:
    refused(verifier, token, "token_missing", "no subject token")


@pytest.mark.parametrize(
    "token",
    [
        "not-a-jwt",
        "a.b",
        "a.b.c.d",
        "!!!.###.$$$",
        "é.é.é",
        "eyJhbGciOiJSUzI1NiJ9.bm90IGpzb24.c2ln",  # payload "not json"
        "W10.W10.c2ln",  # header and payload are JSON arrays
        "eyJhbGciOiJSUzI1NiJ9.e30.",  # no signature
        "eyJhbGciOiJSUzI1NiJ9.e30x.c2ln",  # bad base64 length
    ],
)
def test_garbage(verifier: Verifier, token: str) -> None:
    refused(verifier, token, "token_malformed")
    assert Verifier.unverified_claims(token) == {}


def test_crit_header_refused(verifier: Verifier, rsa_key: Any) -> None:
    token = sign(rsa_key, claims(), headers={"crit": ["exp"], "exp": 1})
    refused(verifier, token, "token_malformed", "crit")
    refused(verifier, raw_token({"alg": "RS256", "kid": 7}, claims()), "token_malformed", "kid")


# --------------------------------------------------------------------------- key files


def test_key_rotation_by_rewriting_the_jwks_file(
    make, jwks_path: Path, clock: Clock, rsa_key: Any, rsa_key2: Any
) -> None:
    verifier = make(jwks_refresh="5m")  # stat at most every min(5m, 5 s) = 5 s
    old = sign(rsa_key, claims(), kid="k1")
    new = sign(rsa_key2, claims(), kid="k2")
    refused(verifier, new, "unknown_key", "'k2'")

    write_keys(jwks_path, {"keys": [jwk(rsa_key, "k1"), jwk(rsa_key2, "k2")]})
    clock.now += 4  # not yet re-checked
    refused(verifier, new, "unknown_key")
    clock.now += 1
    assert verifier.verify(new).namespace == "flux-system"
    assert verifier.verify(old).namespace == "flux-system"

    write_keys(jwks_path, {"keys": [jwk(rsa_key2, "k2")]})
    clock.now += 5
    refused(verifier, old, "unknown_key", "'k1'")
    assert verifier.verify(new).namespace == "flux-system"


def test_in_place_rewrite_is_noticed(
    make, jwks_path: Path, clock: Clock, rsa_key: Any, rsa_key2: Any
) -> None:
    verifier = make(jwks_refresh="2s")
    before = jwks_path.stat().st_mtime_ns
    jwks_path.write_text(json.dumps({"keys": [jwk(rsa_key2, "k1")]}))  # same kid, new key
    os.utime(jwks_path, ns=(before + 10**9, before + 10**9))
    clock.now += 2
    assert verifier.verify(sign(rsa_key2, claims(), kid="k1")).namespace
    refused(verifier, sign(rsa_key, claims(), kid="k1"), "bad_signature")


def test_keys_parsed_once_per_file_version(
    make, jwks_path: Path, clock: Clock, rsa_key: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    verifier = make()
    loads: list[int] = []
    stats: list[str] = []
    real_load, real_stat = identity_module.load_keys, os.stat

    def counting_load(data: bytes) -> Any:
        loads.append(len(data))
        return real_load(data)

    def counting_stat(path: Any, *a: Any, **kw: Any) -> Any:
        if str(path) == str(jwks_path):
            stats.append(str(path))
        return real_stat(path, *a, **kw)

    monkeypatch.setattr(identity_module, "load_keys", counting_load)
    monkeypatch.setattr(identity_module.os, "stat", counting_stat)
    token = sign(rsa_key, claims())
    for _ in range(20):
        verifier.verify(token)
    assert (loads, stats) == ([], [])
    clock.now += 5
    for _ in range(20):
        verifier.verify(token)
    assert loads == [] and len(stats) == 1  # unchanged file: one stat, no re-read
    write_keys(jwks_path, {"keys": [jwk(rsa_key, "k1")]})
    clock.now += 5
    verifier.verify(token)
    verifier.verify(token)
    assert len(loads) == 1 and len(stats) == 2


def test_bad_file_keeps_last_good_keys_until_max_stale(
    make,
    jwks_path: Path,
    clock: Clock,
    rsa_key: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock.now -= 1000  # the token stays valid through the hour below
    verifier = make(jwks_max_stale="1h")
    token = sign(rsa_key, claims(iat=int(NOW) - 1100, nbf=int(NOW) - 1100))
    good = jwks_path.read_text()

    with caplog.at_level(logging.WARNING, logger="broker.identity"):
        write_keys(jwks_path, "{ not json")
        clock.now += 5
        assert verifier.verify(token).namespace  # last good keys
    assert "keeping the last good keys" in caplog.text and "not valid JSON" in caplog.text

    jwks_path.unlink()
    clock.now += 1800
    assert verifier.verify(token).namespace
    clock.now += 1800
    refused(verifier, token, "unknown_key", "stale", "'test'")

    write_keys(jwks_path, good)
    clock.now += 5
    assert verifier.verify(token).namespace


def test_unusable_entries_are_skipped(rsa_key: Any, ec_key: Any) -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    p521 = ec.generate_private_key(ec.SECP521R1())
    private_jwk = RSAAlgorithm.to_jwk(rsa_key, as_dict=True)
    doc = {
        "keys": [
            {"kty": "oct", "kid": "hmac", "k": b64(b"secret")},
            {**jwk(rsa_key, "enc"), "use": "enc"},
            {**private_jwk, "kid": "priv"},
            jwk(small, "small"),
            jwk(p521, "p521"),
            jwk(rsa_key, "bad-alg", alg="HS256"),
            "not an object",
            jwk(ec_key, "good"),
        ]
    }
    keys, problems = load_keys(json.dumps(doc).encode())
    assert [k.kid for k in keys.keys] == ["good"]
    text = "\n".join(problems)
    for fragment in ("'hmac'", "'enc'", "private", "1024 bits", "secp521r1", "HS256", "keys[6]"):
        assert fragment in text
    assert b64(b"secret") not in text and private_jwk["d"] not in text


def test_hmac_key_in_jwks_never_verifies(make, jwks_path: Path, rsa_key: Any) -> None:
    write_keys(
        jwks_path, {"keys": [jwk(rsa_key, "k1"), {"kty": "oct", "kid": "h", "k": b64(b"s3")}]}
    )
    verifier = make()
    token = jwt.encode(claims(), b"s3" * 16, algorithm="HS256", headers={"kid": "h"})
    refused(verifier, token, "unsupported_algorithm", "HS256")


def test_pem_bundle_with_certificate_and_keys(tmp_path: Path) -> None:
    bundle = (
        (LEGACY / "minikube_rsa_cert.pem").read_bytes()
        + (MINIKUBE / "sa.pub.pem").read_bytes()
        + (KID_VECTORS / "ecdsa_p256.pub.pem").read_bytes()
    )
    keys, problems = load_keys(bundle)
    assert problems == []
    assert [k.kind for k in keys.keys] == ["RSA", "RSA", "EC P-256"]
    assert keys.keys[1].kid == "pJcxkJ4q0O1tOt0Z37VB6-x6Mw8xFZSxM9roPtMQq0A"


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (None, "No such file"),
        (b"", "neither a JWKS"),
        (b'{"keys": []}', "no usable public key"),
        (b'{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}', "no usable public key"),
        (b"[1, 2]", "not a JWKS"),
        (b"-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n", "private key"),
    ],
)
def test_unusable_key_file_stops_startup(
    tmp_path: Path, content: bytes | None, fragment: str
) -> None:
    path = tmp_path / "keys"
    if content is not None:
        path.write_bytes(content)
    settings = IssuerSettings(name="t", issuer=ISS, audiences=(AUD,), jwks_file=str(path))
    with pytest.raises(ConfigError) as info:
        Verifier([settings])
    assert fragment in str(info.value) and "issuers[t].jwks_file" in str(info.value)


def test_relative_paths_go_through_resolve_path(tmp_path: Path) -> None:
    (tmp_path / "sa.pub.pem").write_bytes((MINIKUBE / "sa.pub.pem").read_bytes())
    settings = minikube_issuer(Path("sa.pub.pem"))
    verifier = Verifier([settings], resolve_path=lambda p: tmp_path / p)
    assert verifier.verify(fixture_token(MINIKUBE / "token_valid_until_2030.jwt")).pod == "vault"


# --------------------------------------------------------------------------- unverified claims


def test_unverified_claims_of_a_refused_token(verifier: Verifier, rsa_key2: Any) -> None:
    token = sign(rsa_key2, claims(extra="not for audit", sub="x" * 1000), kid="k1")
    refused(verifier, token, "bad_signature")
    assert Verifier.unverified_claims(token) == {
        "iss": ISS,
        "sub": "x" * 256,
        "namespace": "flux-system",
        "service_account": "source-controller",
        "service_account_uid": "sa-uid-1",
        "pod": "source-controller-7d9f",
        "pod_uid": "pod-uid-1",
        "jti": "0b7c6c3e-1f0e-4c5a-9d7e-6a1f2b3c4d5e",
    }


def test_unverified_claims_of_fixtures() -> None:
    legacy = Verifier.unverified_claims(fixture_token(LEGACY / "token.jwt"))
    assert legacy == {
        "iss": "kubernetes/serviceaccount",
        "sub": "system:serviceaccount:default:vault-auth",
        "namespace": "default",
        "service_account": "vault-auth",
        "service_account_uid": "d77f89bc-9055-11e7-a068-0800276d99bf",
    }
    eks = Verifier.unverified_claims(fixture_token(EKS / "token.jwt"))
    assert eks["jti"] == "1b20f55e-e39a-4010-96e3-5bba8e300ae7" and eks["namespace"] == "hakawai"


@pytest.mark.parametrize(
    "token",
    ["", "x" * (MAX_TOKEN_BYTES + 1), "a.W10.c", "a.e30.c", None, 42, "a.eyJpc3MiOjF9.c"],
)
def test_unverified_claims_never_raises(token: Any) -> None:
    assert Verifier.unverified_claims(token) == {}


# --------------------------------------------------------------------------- keys over HTTP
# The network is faked here (a KeyFetcher whose get() reads a dict); the real HTTPS client,
# its rules and the end-to-end path are in tests/integration/test_discovery.py.

JWKS_URI = "https://k8s.test.example/openid/v1/jwks"
DISCOVERY = f"{ISS}/.well-known/openid-configuration"


class FakeEndpoint(KeyFetcher):
    """URL → JSON document, bytes, or an exception; every GET counted, optionally held."""

    def __init__(self) -> None:
        super().__init__(env={})
        self.docs: dict[str, Any] = {}
        self.gets: list[str] = []
        self.hold: threading.Event | None = None  # set: GETs wait for it
        self.entered = threading.Event()

    def get(self, url: str) -> bytes:
        self.gets.append(url)
        self.entered.set()
        if self.hold is not None:
            assert self.hold.wait(10)
        doc = self.docs.get(url)
        if doc is None:
            raise FetchError(f"GET {url}: ConnectionError: connection refused")
        if isinstance(doc, Exception):
            raise doc
        return doc if isinstance(doc, bytes) else json.dumps(doc).encode()

    def count(self, url: str = JWKS_URI) -> int:
        return self.gets.count(url)


@pytest.fixture
def endpoint(rsa_key: Any) -> FakeEndpoint:
    ep = FakeEndpoint()
    ep.docs[JWKS_URI] = {"keys": [jwk(rsa_key, "k1")]}
    ep.docs[DISCOVERY] = {"issuer": ISS, "jwks_uri": JWKS_URI}
    return ep


@pytest.fixture
def remote(endpoint: FakeEndpoint, clock: Clock):
    def remote(**kw: Any) -> Verifier:
        base: dict[str, Any] = {"name": "test", "issuer": ISS, "audiences": (AUD,)}
        if "discovery" not in kw:
            base["jwks_uri"] = JWKS_URI
        return Verifier([IssuerSettings(**{**base, **kw})], clock=clock, fetcher=endpoint)

    return remote


def fresh(private: Any, clock: Clock, kid: str | None = "k1") -> str:
    """A token valid at the clock's current time (tests below move the clock by hours)."""
    now = int(clock.now)
    return sign(private, claims(iat=now - 60, nbf=now - 60, exp=now + 3000), kid=kid)


def test_remote_keys_are_fetched_on_first_use_then_reused(
    remote, endpoint: FakeEndpoint, clock: Clock, rsa_key: Any
) -> None:
    verifier = remote()
    assert endpoint.gets == []  # building the verifier (create_app) connects to nothing
    for _ in range(20):
        assert verifier.verify(fresh(rsa_key, clock)).namespace == "flux-system"
    assert verifier.ready()
    assert endpoint.gets == [JWKS_URI]


def test_discovery_finds_the_jwks_uri(
    remote, endpoint: FakeEndpoint, clock: Clock, rsa_key: Any
) -> None:
    verifier = remote(discovery=True)
    assert verifier.verify(fresh(rsa_key, clock)).service_account == "source-controller"
    assert endpoint.gets == [DISCOVERY, JWKS_URI]


@pytest.mark.parametrize(
    ("doc", "fragments"),
    [
        ({"issuer": ISS + "/", "jwks_uri": JWKS_URI}, ("is not the configured issuer",)),
        ({"issuer": "https://evil.example", "jwks_uri": JWKS_URI}, ("evil.example",)),
        ({"issuer": ISS}, ("has no jwks_uri",)),
        ({"issuer": ISS, "jwks_uri": "https://evil.example/jwks"}, ("not on the issuer's host",)),
        ({"issuer": ISS, "jwks_uri": "https://k8s.test.example.evil.com/"}, ("issuer's host",)),
        ({"issuer": ISS, "jwks_uri": "https://k8s.test.example:8443/k"}, ("issuer's host",)),
        ({"issuer": ISS, "jwks_uri": "http://k8s.test.example/j"}, ("plain http",)),
        ([ISS], ("not a JSON object",)),
        (b"<html>", ("not JSON",)),
    ],
)
def test_discovery_document_is_checked(
    remote, endpoint: FakeEndpoint, clock: Clock, rsa_key: Any, doc: Any, fragments: tuple[str, ...]
) -> None:
    endpoint.docs[DISCOVERY] = doc
    verifier = remote(discovery=True)
    refused(verifier, fresh(rsa_key, clock), "unknown_key", "unavailable", *fragments)
    assert endpoint.count() == 0  # the keys named by a refused document are never fetched
    assert not verifier.ready()


def test_remote_rotation_new_key_by_unknown_kid_removed_key_at_refresh(
    remote, endpoint: FakeEndpoint, clock: Clock, rsa_key: Any, rsa_key2: Any
) -> None:
    verifier = remote(jwks_refresh="5m")
    assert verifier.verify(fresh(rsa_key, clock, "k1"))
    endpoint.docs[JWKS_URI] = {"keys": [jwk(rsa_key, "k1"), jwk(rsa_key2, "k2")]}
    # k2 is unknown, but the last fetch is less than 30 s old: no refetch yet.
    refused(verifier, fresh(rsa_key2, clock, "k2"), "unknown_key", "'k2'")
    assert endpoint.count() == 1
    clock.now += identity_module.UNKNOWN_KID_COOLDOWN_S
    assert verifier.verify(fresh(rsa_key2, clock, "k2"))  # refetched for the unknown kid
    assert endpoint.count() == 2

    endpoint.docs[JWKS_URI] = {"keys": [jwk(rsa_key2, "k2")]}  # k1 retired at the issuer
    clock.now += 299
    assert verifier.verify(fresh(rsa_key, clock, "k1"))  # until the next refresh
    assert endpoint.count() == 2
    clock.now += 1
    refused(verifier, fresh(rsa_key, clock, "k1"), "unknown_key", "'k1'")
    assert verifier.verify(fresh(rsa_key2, clock, "k2"))
    assert endpoint.count() == 3


def test_same_kid_new_key_after_refresh(
    remote, endpoint: FakeEndpoint, clock: Clock, rsa_key: Any, rsa_key2: Any
) -> None:
    verifier = remote(jwks_refresh="1m")
    assert verifier.verify(fresh(rsa_key, clock))
    endpoint.docs[JWKS_URI] = {"keys": [jwk(rsa_key2, "k1")]}
    clock.now += 60
    refused(verifier, fresh(rsa_key, clock), "bad_signature")
    assert verifier.verify(fresh(rsa_key2, clock))


def test_unknown_kid_flood_fetches_at_most_once_per_cooldown(
    remote, endpoint: FakeEndpoint, clock: Clock, rsa_key: Any
) -> None:
    verifier = remote(jwks_refresh="1h")
    assert verifier.verify(fresh(rsa_key, clock))
    assert endpoint.count() == 1
    for round_ in range(3):
        clock.now += identity_module.UNKNOWN_KID_COOLDOWN_S
        for _ in range(50):
            refused(verifier, fresh(rsa_key, clock, os.urandom(8).hex()), "unknown_key")
            clock.now += 0.5  # the whole flood spans 25 s: still one cooldown
        assert endpoint.count() == 2 + round_
    assert verifier.verify(fresh(rsa_key, clock))  # the known kid never needed a fetch


def test_concurrent_unknown_kid_flood_makes_one_fetch(
    remote, endpoint: FakeEndpoint, clock: Clock, rsa_key: Any
) -> None:
    verifier = remote()
    assert verifier.verify(fresh(rsa_key, clock))
    clock.now += identity_module.UNKNOWN_KID_COOLDOWN_S
    endpoint.hold = threading.Event()
    endpoint.entered.clear()
    tokens = [fresh(rsa_key, clock, os.urandom(8).hex()) for _ in range(50)]
    reasons: list[str] = []

    def attempt(token: str) -> None:
        try:
            verifier.verify(token)
        except InvalidSubjectToken as exc:
            reasons.append(exc.reason)

    threads = [threading.Thread(target=attempt, args=(t,)) for t in tokens]
    for t in threads:
        t.start()
    assert endpoint.entered.wait(10)
    endpoint.hold.set()
    for t in threads:
        t.join(10)
    assert reasons == ["unknown_key"] * 50
    assert endpoint.count() == 2


def test_one_thread_refreshes_while_the_others_use_current_keys(
    remote, endpoint: FakeEndpoint, clock: Clock, rsa_key: Any
) -> None:
    verifier = remote(jwks_refresh="1m")
    assert verifier.verify(fresh(rsa_key, clock))
    clock.now += 60
    endpoint.hold = threading.Event()
    endpoint.entered.clear()
    refresher = threading.Thread(target=verifier.verify, args=(fresh(rsa_key, clock),))
    refresher.start()
    try:
        assert endpoint.entered.wait(10)  # that thread is now inside the (held) fetch
        for _ in range(10):  # these neither wait for it nor start another fetch
            assert verifier.verify(fresh(rsa_key, clock))
        assert verifier.ready()
        assert endpoint.count() == 2
    finally:
        endpoint.hold.set()
        refresher.join(10)
    assert endpoint.count() == 2


def test_first_requests_wait_for_the_first_fetch(
    remote, endpoint: FakeEndpoint, clock: Clock, rsa_key: Any
) -> None:
    verifier = remote()
    endpoint.hold = threading.Event()
    first = threading.Thread(target=verifier.verify, args=(fresh(rsa_key, clock),))
    first.start()
    try:
        assert endpoint.entered.wait(10)  # the first fetch is in progress (held)
        release = threading.Timer(0.2, endpoint.hold.set)
        release.start()
        assert verifier.verify(fresh(rsa_key, clock))  # waited for it, then used its keys
        release.join(10)
    finally:
        endpoint.hold.set()
        first.join(10)
    assert endpoint.count() == 1


def test_after_a_long_idle_callers_wait_for_the_refresh_instead_of_refusing(
    remote, endpoint: FakeEndpoint, clock: Clock, rsa_key: Any
) -> None:
    verifier = remote(jwks_refresh="5m", jwks_max_stale="1h")
    assert verifier.verify(fresh(rsa_key, clock))
    clock.now += 2 * 3600  # no traffic for two hours: the keys in hand are stale
    endpoint.hold = threading.Event()
    endpoint.entered.clear()
    first = threading.Thread(target=verifier.verify, args=(fresh(rsa_key, clock),))
    first.start()
    try:
        assert endpoint.entered.wait(10)  # that thread is refreshing (held)
        release = threading.Timer(0.2, endpoint.hold.set)
        release.start()
        assert verifier.verify(fresh(rsa_key, clock))  # waits for it rather than "stale"
        release.join(10)
    finally:
        endpoint.hold.set()
        first.join(10)
    assert endpoint.count() == 2


def test_endpoint_down_keys_trusted_until_max_stale(
    remote, endpoint: FakeEndpoint, clock: Clock, rsa_key: Any, caplog: pytest.LogCaptureFixture
) -> None:
    verifier = remote(jwks_refresh="5m", jwks_max_stale="1h")
    assert verifier.verify(fresh(rsa_key, clock))
    working = endpoint.docs.pop(JWKS_URI)  # the endpoint goes down
    with caplog.at_level(logging.WARNING, logger="broker.identity"):
        clock.now += 300
        assert verifier.verify(fresh(rsa_key, clock))  # refresh failed, current keys kept
    assert "connection refused" in caplog.text and "keeping the last fetched keys" in caplog.text
    attempts = endpoint.count()
    for _ in range(100):  # traffic does not turn into fetches: retries back off
        assert verifier.verify(fresh(rsa_key, clock))
    assert endpoint.count() == attempts
    clock.now += 3600 - 300  # exactly max_stale since the last good fetch
    assert verifier.verify(fresh(rsa_key, clock))
    assert verifier.ready()
    clock.now += 1
    description = refused(verifier, fresh(rsa_key, clock), "unknown_key", "stale", "'test'")
    assert "connection refused" in description
    assert not verifier.ready()

    endpoint.docs[JWKS_URI] = working  # back up: the next retry (at most 30 s away) recovers
    clock.now += identity_module.MAX_RETRY_S
    assert verifier.verify(fresh(rsa_key, clock))
    assert verifier.ready()


def test_failed_fetches_back_off_then_refresh_resumes(
    remote, endpoint: FakeEndpoint, clock: Clock, rsa_key: Any
) -> None:
    verifier = remote(jwks_refresh="5m")
    assert verifier.verify(fresh(rsa_key, clock))
    working = endpoint.docs.pop(JWKS_URI)
    clock.now += 300
    gaps = []
    last = clock.now
    for _ in range(600):  # ten minutes, a request every second
        before = endpoint.count()
        verifier.verify(fresh(rsa_key, clock))
        if endpoint.count() > before:
            gaps.append(clock.now - last)
            last = clock.now
        clock.now += 1
    assert gaps[:7] == [0, 1, 2, 4, 8, 16, 30]
    assert set(gaps[7:]) == {30}
    endpoint.docs[JWKS_URI] = working
    clock.now += 30
    verifier.verify(fresh(rsa_key, clock))
    n = endpoint.count()
    clock.now += 299
    verifier.verify(fresh(rsa_key, clock))
    assert endpoint.count() == n  # healthy again: back to jwks_refresh


def test_unreachable_at_start_starts_not_ready_then_recovers(
    remote, endpoint: FakeEndpoint, clock: Clock, rsa_key: Any
) -> None:
    working = endpoint.docs.pop(JWKS_URI)
    verifier = remote()  # does not raise: the process starts, not ready
    assert not verifier.ready()
    assert endpoint.count() == 1  # the readiness probe tried
    refused(verifier, fresh(rsa_key, clock), "unknown_key", "unavailable", "connection refused")
    assert endpoint.count() == 1  # in the 1 s back-off: refused without another fetch
    endpoint.docs[JWKS_URI] = working
    clock.now += 1
    assert verifier.ready()
    assert endpoint.count() == 2
    assert verifier.verify(fresh(rsa_key, clock))


def test_readiness_never_waits_for_the_first_fetch(
    remote, endpoint: FakeEndpoint, clock: Clock, rsa_key: Any
) -> None:
    verifier = remote()
    endpoint.hold = threading.Event()
    first = threading.Thread(target=verifier.ready)
    first.start()
    try:
        assert endpoint.entered.wait(10)
        assert not verifier.ready()  # returns at once while the fetch is in progress
    finally:
        endpoint.hold.set()
        first.join(10)
    assert verifier.ready() and endpoint.count() == 1


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"-----BEGIN PUBLIC KEY-----\nMIIB\n-----END PUBLIC KEY-----\n", "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        ({"keys": []}, "no usable public key"),
        ({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}, "no usable public key"),
        ({"issuer": ISS}, "not a JWKS"),
    ],
)
def test_unusable_jwks_from_the_endpoint(
    remote, endpoint: FakeEndpoint, clock: Clock, rsa_key: Any, body: Any, fragment: str
) -> None:
    endpoint.docs[JWKS_URI] = body
    verifier = remote()
    refused(verifier, fresh(rsa_key, clock), "unknown_key", "unavailable", JWKS_URI, fragment)


def test_bad_jwks_at_refresh_keeps_the_current_keys(
    remote, endpoint: FakeEndpoint, clock: Clock, rsa_key: Any
) -> None:
    verifier = remote(jwks_refresh="1m")
    assert verifier.verify(fresh(rsa_key, clock))
    endpoint.docs[JWKS_URI] = {"keys": []}  # a broken publish must not wipe the keys
    clock.now += 60
    assert verifier.verify(fresh(rsa_key, clock))
    assert endpoint.count() == 2


def test_load_jwks_accepts_json_only(rsa_key: Any) -> None:
    keys, problems = load_jwks(json.dumps({"keys": [jwk(rsa_key, "k1")]}).encode())
    assert [k.kid for k in keys.keys] == ["k1"] and problems == []
    with pytest.raises(ValueError, match="not valid JSON"):
        load_jwks(pem(rsa_key))
    assert load_keys(pem(rsa_key))[0].keys  # a jwks_file may hold PEM; a jwks_uri may not


def test_one_issuer_down_does_not_affect_another(
    endpoint: FakeEndpoint, clock: Clock, jwks_path: Path, rsa_key: Any
) -> None:
    verifier = Verifier(
        [
            IssuerSettings(name="file", issuer=ISS, audiences=(AUD,), jwks_file=str(jwks_path)),
            IssuerSettings(
                name="remote", issuer="https://other.example", audiences=(AUD,), jwks_uri=JWKS_URI
            ),
        ],
        clock=clock,
        fetcher=endpoint,
    )
    endpoint.docs.pop(JWKS_URI)
    assert verifier.verify(fresh(rsa_key, clock)).issuer_name == "file"
    assert endpoint.gets == []  # the file issuer's tokens never fetch the other's keys
    now = int(clock.now)
    other = sign(rsa_key, claims(iss="https://other.example", iat=now, nbf=now, exp=now + 60))
    refused(verifier, other, "unknown_key", "'remote'", "unavailable")
    assert not verifier.ready()


def _local_verifier(tmp_path: Path) -> tuple[LocalIssuer, Verifier]:
    """A local issuer and a verifier that trusts it (its JWKS in a file)."""
    iss = LocalIssuer()
    v = Verifier([IssuerSettings(name="t", issuer=iss.issuer, audiences=(AUDIENCE,),
                                 jwks_file=str(iss.write_jwks(tmp_path / "k.json")))])
    return iss, v


def test_signature_segment_must_be_strict_base64url(tmp_path):
    """A valid signature with extra characters (ignored by lenient decoders) is refused."""
    iss, v = _local_verifier(tmp_path)
    token = iss.token()
    assert v.verify(token).namespace == "flux-system"
    with pytest.raises(InvalidSubjectToken) as info:
        v.verify(token + "!!")
    assert info.value.reason == "token_malformed"


@pytest.mark.parametrize(
    ("segment", "decoded"),
    [("", b""), ("AQ", b"\x01"), ("AQI", b"\x01\x02"), ("AQID", b"\x01\x02\x03"), ("-_8", b"\xfb\xff")],
)
def test_b64url_decode_accepts_canonical_unpadded(segment: str, decoded: bytes) -> None:
    assert b64url_decode(segment) == decoded


@pytest.mark.parametrize(
    "segment",
    [
        "AR",  # unused bits set: decodes to b"\x01" like "AQ" under a lenient decoder
        "AQJ",  # likewise, for b"\x01\x02"
        "AQ==",  # padding
        "+/8",  # the standard alphabet, not base64url
        "AQ D",  # whitespace
        "AQID\n",
        "AQ\r\nID\r\n",  # valid once the stray characters are dropped, as lenient decoders do
        "!!!!AQID",
        "AQ+/",  # '+' and '/' in place of '-' and '_'
        "A",  # a length no encoding has
        "AQIDB",
        "AQé",
    ],
)
def test_b64url_decode_refuses_anything_else(segment: str) -> None:
    with pytest.raises(ValueError):
        b64url_decode(segment)


def _respell_last(segment: str) -> str:
    """The same bytes under a lenient decoder: the last character with its unused bits set."""
    import string

    alphabet = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"
    assert len(segment) % 4 in (2, 3)
    return segment[:-1] + alphabet[alphabet.index(segment[-1]) + 1]


@pytest.mark.parametrize("part", [0, 1, 2])
def test_one_token_has_one_spelling(tmp_path: Path, part: int) -> None:
    """A token re-spelt with nonzero unused bits (the same bytes to a lenient decoder) is
    refused, so whoever replays a token cannot vary its audit fingerprint."""
    iss, v = _local_verifier(tmp_path)
    # A filler of 0-2 characters in the header or the claims gives the segment a length of 2 or
    # 3 (mod 4), which leaves unused bits in its last character (an RSA-2048 signature has 2).
    for filler in ("", "x", "xx"):
        parts = iss.token(headers={"f": filler}, f=filler).split(".")
        if len(parts[part]) % 4 in (2, 3):
            break
    assert len(parts[part]) % 4 in (2, 3)
    assert v.verify(".".join(parts)).namespace == "flux-system"
    respelt = list(parts)
    respelt[part] = _respell_last(parts[part])
    pad = "=" * (-len(parts[part]) % 4)
    same = base64.urlsafe_b64decode(respelt[part] + pad)
    assert same == base64.urlsafe_b64decode(parts[part] + pad)
    with pytest.raises(InvalidSubjectToken) as info:
        v.verify(".".join(respelt))
    assert info.value.reason == "token_malformed"
