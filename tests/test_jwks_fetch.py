"""broker.jwks_fetch without a network: URL rules, discovery URLs, trust settings.

Fetching over real HTTPS (redirects, size cap, timeouts, credentials) is exercised against a
local TLS server in tests/integration/test_discovery.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import requests

from broker.jwks_fetch import FetchError, KeyFetcher, discovery_url, origin


@pytest.mark.parametrize(
    ("issuer", "url"),
    [
        ("https://a.example", "https://a.example/.well-known/openid-configuration"),
        ("https://a.example/", "https://a.example/.well-known/openid-configuration"),
        (
            "https://container.googleapis.com/v1/projects/p/locations/l/clusters/c",
            "https://container.googleapis.com/v1/projects/p/locations/l/clusters/c"
            "/.well-known/openid-configuration",
        ),
        (
            "https://127.0.0.1:8443/id/X/",
            "https://127.0.0.1:8443/id/X/.well-known/openid-configuration",
        ),
    ],
)
def test_discovery_url(issuer: str, url: str) -> None:
    assert discovery_url(issuer) == url


@pytest.mark.parametrize("issuer", ["https://a.example/?tenant=1", "https://a.example/#x"])
def test_discovery_url_refuses_query_and_fragment(issuer: str) -> None:
    with pytest.raises(FetchError, match="query or fragment"):
        discovery_url(issuer)


def test_origin_makes_the_port_explicit_and_ignores_case() -> None:
    assert origin("https://A.example/x") == ("https", "a.example", 443)
    assert origin("https://a.example:443/y") == origin("https://a.example/z")
    assert origin("http://127.0.0.1/") == ("http", "127.0.0.1", 80)
    assert origin("https://a.example:8443/") != origin("https://a.example/")
    assert origin("http://a.example/") != origin("https://a.example/")


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("http://keys.example.com/jwks", "plain http"),
        ("http://169.254.169.254/computeMetadata/v1/", "plain http"),
        ("file:///etc/passwd", "not an http(s) URL"),
        ("https://u:pw@keys.example.com/jwks", "credentials"),
    ],
)
def test_refused_urls_are_never_requested(
    url: str, fragment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_network(*_a: Any, **_kw: Any) -> Any:
        raise AssertionError("a refused URL reached the network")

    monkeypatch.setattr(requests.Session, "request", no_network)
    with pytest.raises(FetchError, match="refused to fetch") as info:
        KeyFetcher(env={}).get(url)
    assert fragment in str(info.value) and "pw@" not in str(info.value)


def test_trust_comes_from_the_argument_then_the_environment() -> None:
    assert KeyFetcher(env={})._verify is True  # certifi
    assert KeyFetcher(env={"SSL_CERT_FILE": "/b"})._verify == "/b"
    assert KeyFetcher(env={"REQUESTS_CA_BUNDLE": "/a", "SSL_CERT_FILE": "/b"})._verify == "/a"
    assert KeyFetcher(ca_bundle="/c", env={"REQUESTS_CA_BUNDLE": "/a"})._verify == "/c"
