"""Real Kubernetes tokens from ../shared/fixtures/k8s-tokens through the whole exchange."""

from __future__ import annotations

import pytest

from tests.support import K8S_TOKENS, SA_DOMAIN, exchange_form

MINIKUBE = K8S_TOKENS / "01_projected_minikube_rs256"
LEGACY = K8S_TOKENS / "02_legacy_secret_rs256"
LEGACY_ES = K8S_TOKENS / "03_legacy_es384_kid"


@pytest.fixture
def minikube_broker(make_broker, tmp_path):
    keys = tmp_path / "minikube-keys.pem"
    keys.write_text(
        (MINIKUBE / "sa.pub.pem").read_text()
        + (LEGACY / "minikube_rsa_cert.pem").read_text()
        + (LEGACY_ES / "ecdsa_p384.pub.pem").read_text()
    )
    roles = {
        "roles": [
            {
                "name": "minikube-default",
                "subjects": [{"issuer": "minikube", "namespace": "default", "service_account": "default"}],
                "service_account": f"minikube@{SA_DOMAIN}",
                "scopes": ["https://www.googleapis.com/auth/cloud-platform"],
                "lifetime": "1h",
            }
        ]
    }
    extra = [
        {
            "name": "minikube",
            "issuer": "kubernetes/serviceaccount",
            "audiences": ["kubernetes.default.svc"],
            "allow_api_server_audience": True,
            "jwks_file": str(keys),
            "max_token_lifetime": "4000d",  # the fixture's own lifetime is ~3657 days
        }
    ]
    return make_broker(roles=roles, extra_issuers=extra)


def _post(b, token):
    return b.client.post("/v1/token", data=exchange_form(token))


def test_minikube_projected_token_is_accepted(minikube_broker):
    token = (MINIKUBE / "token_valid_until_2030.jwt").read_text()
    resp = _post(minikube_broker, token)
    assert resp.status_code == 200, resp.json
    [rec] = minikube_broker.audit()
    assert rec["subject_verified"] is True
    assert rec["pod"] == "vault"
    assert rec["kubernetes_service_account_uid"] == "77c81ad7-1bea-4d94-9ca5-f5d7f3632331"
    assert rec["role"] == "minikube-default"


def test_minikube_expired_token_refused_as_expired(minikube_broker):
    resp = _post(minikube_broker, (MINIKUBE / "token_expired_2020.jwt").read_text())
    assert resp.status_code == 400
    assert "expired" in resp.json["error_description"]
    assert minikube_broker.audit()[0]["reason"] == "token_expired"


@pytest.mark.parametrize("path", [LEGACY / "token.jwt", LEGACY_ES / "token.jwt"])
def test_legacy_tokens_refused_as_legacy(minikube_broker, path):
    resp = _post(minikube_broker, path.read_text())
    assert resp.status_code == 400
    assert "legacy" in resp.json["error_description"].lower()
    assert minikube_broker.audit()[0]["reason"] == "legacy_token"


def test_minikube_token_needs_api_server_audience_flag(make_broker, tmp_path):
    extra = [
        {
            "name": "minikube",
            "issuer": "kubernetes/serviceaccount",
            "audiences": ["kubernetes.default.svc"],
            "jwks_file": str(MINIKUBE / "sa.pub.pem"),
            "max_token_lifetime": "4000d",
        }
    ]
    b = make_broker(extra_issuers=extra)
    resp = _post(b, (MINIKUBE / "token_valid_until_2030.jwt").read_text())
    assert resp.status_code == 400
    assert b.audit()[0]["reason"] == "api_server_audience"
