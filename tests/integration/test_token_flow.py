"""End to end: real gunicorn (2 workers), real Redis, real google-cloud-iam → emulator, and the
real google-auth external_account client talking to the broker."""

from __future__ import annotations

import json
import time
from pathlib import Path
from urllib.parse import parse_qsl

import google.auth
import google.auth.transport.requests
import pytest
import redis
import requests
import yaml

from broker.cache import CacheKeys, TokenCache, cache_key
from broker.model import AccessToken, MintRequest
from tests.integration.conftest import run_broker
from tests.support import (
    CACHE_KEY,
    CLIENT_REQUESTS,
    SA_DOMAIN,
    broker_config,
    exchange_form,
    free_port,
)

pytestmark = pytest.mark.integration

FLUX_SCOPES = "https://www.googleapis.com/auth/cloud-platform https://www.googleapis.com/auth/userinfo.email"
ROLE_SCOPE = "https://www.googleapis.com/auth/devstorage.read_only"


@pytest.fixture
def config(tmp_path, issuer, redis_url, emulator):
    return broker_config(tmp_path, issuer, redis_url=redis_url, iam_endpoint=emulator.url)


# Application Default Credentials load a GOOGLE_APPLICATION_CREDENTIALS file through this generic
# loader, which google-auth now flags; the test loads the file as client libraries do.
@pytest.mark.filterwarnings("ignore:The load_credentials_from_file method is deprecated")
def test_google_auth_external_account_client_gets_token(tmp_path, config, issuer, emulator):
    token_file = tmp_path / "token.jwt"
    token_file.write_text(issuer.token() + "\n")  # google-auth sends the file unstripped
    with run_broker(config) as broker:
        cred = {
            "type": "external_account",
            "audience": "flux-source-reader",
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
            "token_url": f"{broker.url}/v1/token",
            "credential_source": {"file": str(token_file)},
        }
        cred_path = tmp_path / "credentials.json"
        cred_path.write_text(json.dumps(cred))
        creds, _ = google.auth.load_credentials_from_file(
            str(cred_path), scopes=["https://www.googleapis.com/auth/cloud-platform"]
        )
        creds.refresh(google.auth.transport.requests.Request())
        assert creds.token and creds.valid
        info = emulator.token_info(creds.token)
        assert info["service_account"] == f"flux-source@{SA_DOMAIN}"
        assert info["scopes"] == [ROLE_SCOPE]
        assert creds.expiry is not None
        assert broker.logs().count('"decision":"issued"') == 1


@pytest.mark.parametrize(
    "fixture",
    ["go-oauth2-v0.35-external-account.form", "python-google-auth-2.63-external-account.form"],
)
def test_captured_client_requests_replay(config, issuer, emulator, fixture):
    pairs = parse_qsl((CLIENT_REQUESTS / fixture).read_text().strip(), keep_blank_values=True)
    assert any(k == "subject_token" for k, _ in pairs)
    swapped = [(k, issuer.token() if k == "subject_token" else v) for k, v in pairs]
    with run_broker(config) as broker:
        resp = broker.token(dict(swapped))
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert type(body["expires_in"]) is int and body["expires_in"] > 0
        assert body["scope"] == ROLE_SCOPE  # the narrow role's scope, not the requested pair
        assert emulator.token_info(body["access_token"])["scopes"] == [ROLE_SCOPE]
        if "go-oauth2" in fixture:
            assert dict(pairs)["scope"] == FLUX_SCOPES


def test_cache_hit_min_remaining_and_nothing_in_clear(
    tmp_path, issuer, redis_url, emulator, redis_client
):
    # Without the per-worker memo, so that every request reads the entry planted below.
    config = broker_config(
        tmp_path, issuer, redis_url=redis_url, iam_endpoint=emulator.url, cache={"memo": "0s"}
    )
    with run_broker(config) as broker:
        tokens = {broker.token(exchange_form(issuer.token())).json()["access_token"] for _ in range(6)}
        assert len(tokens) == 1
        assert emulator.calls() == 1
        (access,) = tokens
        # Nothing in Redis holds the access token (or any subject token) in clear.
        for key in redis_client.scan_iter(count=1000):
            kind = redis_client.type(key)
            if kind == b"string":
                values = [redis_client.get(key) or b""]
            elif kind == b"stream":
                values = [json.dumps([[k.decode(), v.decode()] for k, v in f.items()]).encode()
                          for _, f in redis_client.xrange(key)]
            else:
                values = [key]
            for v in values:
                assert access.encode() not in v

        # A cached token with less than min_remaining (5m) left must not be served.
        cfg = yaml.safe_load(Path(config).read_text())
        cache = TokenCache(
            redis.Redis.from_url(cfg["redis"]["url"]),
            CacheKeys.parse(CACHE_KEY),
            prefix=cfg["redis"]["key_prefix"],
            min_remaining_s=0,
        )
        req = MintRequest(f"flux-source@{SA_DOMAIN}", (ROLE_SCOPE,), 3600)
        cache.put(cache_key("flux-source-reader", req), AccessToken("ya29.short", time.time() + 120))
        body = broker.token(exchange_form(issuer.token())).json()
        assert body["access_token"] != "ya29.short"
        assert body["expires_in"] > 300
        assert emulator.calls() == 2


def test_redis_down_readyz_fails_and_nothing_issued(tmp_path, issuer, emulator):
    config = broker_config(
        tmp_path, issuer, redis_url=f"redis://127.0.0.1:{free_port()}/0", iam_endpoint=emulator.url
    )
    with run_broker(config) as broker:
        assert requests.get(f"{broker.url}/healthz", timeout=5).status_code == 200
        assert requests.get(f"{broker.url}/readyz", timeout=5).status_code == 503
        resp = broker.token(exchange_form(issuer.token()))
        assert resp.status_code == 503
        assert resp.json()["error"] == "temporarily_unavailable"
        assert "access_token" not in resp.json()
        assert emulator.calls() == 0
        assert '"stored":false' in broker.logs()
