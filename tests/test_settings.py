from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from broker.errors import ConfigError
from broker.settings import load_settings, parse_duration, settings_from_mapping
from tests.support import REPO


def base(**over):
    cfg = {
        "issuers": [{"name": "a", "issuer": "https://i", "audiences": ["x"], "jwks_file": "k.json"}],
        "gcp": {"allowed_service_accounts": ["*@p.iam.gserviceaccount.com"]},
    }
    for k, v in over.items():
        cfg[k] = v
    return cfg


def problems(cfg, env=None):
    with pytest.raises(ConfigError) as info:
        settings_from_mapping(cfg, source="b.yaml", env=env or {})
    return "\n".join(info.value.problems)


def test_defaults():
    s = settings_from_mapping(base(), env={})
    assert s.server.workers == 2 and s.server.threads == 8
    assert s.cache.min_remaining == 300 and s.audit.retention == 30 * 86400
    assert s.issuers[0].max_token_lifetime == 7200


@pytest.mark.parametrize(
    ("value", "seconds"), [("90s", 90), ("15m", 900), ("1h", 3600), ("7d", 604800), (5, 5)]
)
def test_durations(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    ("cfg", "needle"),
    [
        (base(bogus=1), "bogus: unknown key"),
        (base(server={"wokers": 2}), "server.wokers: unknown key"),
        (base(server={"tls": {"cert_file": "c"}}), "server.tls: TLS termination"),
        (base(roles={"source": "redis", "file": "r.yaml"}), "roles.file is read only"),
        (base(cache={"min_remaining": "soon"}), "cache.min_remaining"),
        (base(issuers=[]), "issuers"),
        (base(server={"bind": "127.0.0.1:\u00b280"}), "is not HOST:PORT"),  # "²" isdigit()
        # 0 would trim every audit record at the next retention pass
        (base(audit={"retention": "0s"}), "audit.retention"),
        (base(access={"admins": ["https://i/ops/admin"]}), "access.admins[0]: 'https://i/ops/admin' must start with an issuer's configured name (a)"),
        (base(access={"auditors": ["a/ops/x", "a/ops"]}), "access.auditors[1]: 'a/ops' must be a/NAMESPACE/SERVICE_ACCOUNT"),
        (base(access={"admins": ["nosuch/a/b"]}), "access.admins[0]"),
        (base(issuers=[{"name": "a", "issuer": "https://i", "audiences": ["x"], "jwks_file": "k",
                        "token_review": {"api_server": "https://k"}}]), "TokenReview is not built"),
        (base(audit={"retention": "59m"}), "audit.retention"),
        (base(cache={"min_remaining": -1}), "cache.min_remaining: -1 is not a duration: it must be"),
        (base(cache={"min_remaining": float("inf")}), "cache.min_remaining"),
        # beyond 100 years, expiry times overflow Redis's (every request would answer 503)
        (base(audit={"retention": "1000000000000d"}), "between 0s and 36500d"),
        (base(issuers=[{"name": "a", "issuer": "https://i", "audiences": ["x"],
                        "jwks_file": "k", "jwks_max_stale": "0s"}]), "jwks_max_stale"),
    ],
)
def test_refusals_name_the_key(cfg, needle):
    assert needle in problems(cfg)


def test_issuer_rules():
    i = {"name": "a", "issuer": "https://i", "audiences": ["x"], "jwks_file": "k"}
    assert "duplicate issuer" in problems(base(issuers=[i, dict(i, name="b")]))
    assert "duplicate name" in problems(base(issuers=[i, dict(i, issuer="https://j")]))
    assert "exactly one of" in problems(base(issuers=[dict(i, jwks_uri="https://x")]))
    assert "exactly one of" in problems(base(issuers=[dict(i, discovery=True)]))
    assert "TokenReview" in problems(base(issuers=[dict(i, token_review={"enabled": True})]))
    assert "exactly one of" in problems(base(issuers=[dict(i, jwks_file=None)]))
    assert "audiences" in problems(base(issuers=[dict(i, audiences=[])]))


@pytest.mark.parametrize(
    "uri",
    [
        "https://keys.example.com/jwks",
        "https://keys.example.com:8443/openid/v1/jwks",
        "http://127.0.0.1:8080/jwks",
        "http://localhost/jwks",
        "http://[::1]:9000/jwks",
    ],
)
def test_jwks_uri_accepted(uri):
    i = {"name": "a", "issuer": "https://i", "audiences": ["x"], "jwks_uri": uri}
    s = settings_from_mapping(base(issuers=[i]), env={})
    assert s.issuers[0].jwks_uri == uri and s.issuers[0].jwks_file is None


@pytest.mark.parametrize(
    ("uri", "needle"),
    [
        ("http://keys.example.com/jwks", "plain http, allowed only to a loopback address"),
        ("http://10.0.0.1/jwks", "plain http, allowed only to a loopback address"),
        ("http://127.0.0.1.nip.io/jwks", "plain http, allowed only to a loopback address"),
        ("ftp://keys.example.com/jwks", "not an http(s) URL"),
        ("keys.example.com/jwks", "not an http(s) URL"),
        ("https://keys.example.com:99999/jwks", "invalid port"),
        ("https://user:s3cret@keys.example.com/jwks", "must not carry credentials"),
    ],
)
def test_jwks_uri_refused(uri, needle):
    i = {"name": "a", "issuer": "https://i", "audiences": ["x"], "jwks_uri": uri}
    text = problems(base(issuers=[i]))
    assert "issuers.0.jwks_uri" in text and needle in text
    assert "s3cret" not in text


def test_discovery_needs_a_fetchable_issuer():
    i = {"name": "a", "issuer": "https://i.example", "audiences": ["x"], "discovery": True}
    assert settings_from_mapping(base(issuers=[i]), env={}).issuers[0].discovery is True
    local = dict(i, issuer="http://127.0.0.1:8443/clusters/c")
    assert settings_from_mapping(base(issuers=[local]), env={}).issuers[0].discovery is True
    text = problems(base(issuers=[dict(i, issuer="http://k8s.example/cluster")]))
    assert "discovery: true" in text and "plain http" in text
    # Kubernetes' default issuer is not a URL: it can only use jwks_file or jwks_uri.
    assert "not an http(s) URL" in problems(
        base(issuers=[dict(i, issuer="kubernetes/serviceaccount")])
    )


def test_access_audience_must_differ_from_exchange():
    assert "access.audience" in problems(base(access={"audience": "x"}))


def test_iam_endpoint_rule():
    gcp = {"allowed_service_accounts": ["*@p.iam.gserviceaccount.com"]}
    assert "anonymous" in problems(base(gcp=dict(gcp, iam_endpoint="http://127.0.0.1:8085")))
    assert "loopback" in problems(
        base(gcp=dict(gcp, iam_endpoint="http://10.1.2.3:8085", credentials="anonymous"))
    )
    assert "emulator only" in problems(base(gcp=dict(gcp, credentials="anonymous")))
    ok = settings_from_mapping(
        base(gcp=dict(gcp, iam_endpoint="http://127.0.0.1:8085", credentials="anonymous")), env={}
    )
    assert ok.gcp.iam_endpoint.startswith("http://127.0.0.1")


def test_env_overrides():
    s = settings_from_mapping(
        base(), env={"BROKER_BIND": "0.0.0.0:9000", "BROKER_REDIS_URL": "redis://r:1/2"}
    )
    assert s.server.bind == "0.0.0.0:9000" and s.redis.url == "redis://r:1/2"


def test_memory_store_needs_one_worker():
    assert "one process" in problems(base(redis={"url": "memory://"}))


def test_example_config_is_valid(tmp_path):
    s = load_settings(REPO / "config" / "broker.yaml", env={})
    assert s.issuers[0].name == "prod-eu"


def test_bad_yaml_and_missing_file(tmp_path):
    p = tmp_path / "b.yaml"
    p.write_text("server: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(p)
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml")


def test_serve_refuses_bad_config_without_traceback(tmp_path):
    p = tmp_path / "b.yaml"
    p.write_text(yaml.safe_dump(base(server={"wokers": 3})))
    out = subprocess.run(
        [sys.executable, "-m", "broker.cli", "serve", "--config", str(p)],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )
    assert out.returncode == 2
    assert str(p) in out.stderr and "server.wokers: unknown key" in out.stderr
    assert "Traceback" not in out.stderr
