"""Keys over HTTPS: jwks_uri and discovery against a local TLS server with its own test CA.

The CA and the server certificate (127.0.0.1 and localhost) are generated here; the server is
http.server + ssl in a thread, with mutable documents and a count of every request. The
verifier's clock is injected, so refresh, cooldown and staleness are driven without sleeping.
"""

from __future__ import annotations

import collections
import json
import os
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker import identity
from broker.errors import ConfigError, InvalidSubjectToken
from broker.identity import Verifier
from broker.jwks_fetch import MAX_BYTES, FetchError, KeyFetcher
from broker.settings import IssuerSettings, settings_from_mapping
from tests.integration.conftest import run_broker
from tests.support import AUDIENCE, REPO, FakeClock, LocalIssuer, broker_config, exchange_form

pytestmark = pytest.mark.integration

WELL_KNOWN = "/.well-known/openid-configuration"
JWKS_PATH = "/openid/v1/jwks"


# --------------------------------------------------------------------------- a test CA


@dataclass(frozen=True)
class PKI:
    ca_file: Path
    cert_file: Path
    key_file: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """A CA trusted by nobody but these tests, and a server certificate it signed."""
    d = tmp_path_factory.mktemp("pki")
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("token-broker test CA"))
        .issuer_name(_name("token-broker test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(IPv4Address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pki = PKI(d / "ca.pem", d / "server.pem", d / "server.key")
    pki.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(pki.key_file, key)
    return pki


# --------------------------------------------------------------------------- a key server


@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_length: bool = True  # False: the body ends when the connection closes
    drip_s: float = 0.0  # > 0: send the body one byte at a time, this far apart


class KeyServer:
    """HTTP(S) on 127.0.0.1 with mutable routes; counts requests and keeps their headers."""

    def __init__(self, pki: PKI | None) -> None:
        self.routes: dict[str, Route] = {}
        self.hits: collections.Counter[str] = collections.Counter()
        self.request_headers: list[dict[str, str]] = []
        self.down = False  # True: every request gets 503
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.scheme = "http"
        if pki is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(pki.cert_file, pki.key_file)
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
            self.scheme = "https"
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def url(self, path: str = "", host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    def json(self, path: str, doc: Any, **kw: Any) -> None:
        self.routes[path] = Route(body=json.dumps(doc).encode(), **kw)

    def publish(self, issuer: str, *signers: LocalIssuer) -> None:
        """Serve a discovery document for ``issuer`` and a JWKS with the signers' keys."""
        self.json(WELL_KNOWN, {"issuer": issuer, "jwks_uri": self.url(JWKS_PATH)})
        self.json(JWKS_PATH, {"keys": [k for s in signers for k in s.jwks()["keys"]]})

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # lets a route end its body by closing

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                with server._lock:
                    server.hits[path] += 1
                    server.request_headers.append(dict(self.headers))
                route = server.routes.get(path, Route(404, b"not found"))
                if server.down:
                    route = Route(503, b"down for maintenance")
                self.send_response(route.status)
                for name, value in route.headers.items():
                    self.send_header(name, value)
                if route.content_length:
                    self.send_header("Content-Length", str(len(route.body)))
                self.end_headers()
                try:
                    if route.drip_s:
                        for i in range(len(route.body)):
                            self.wfile.write(route.body[i : i + 1])
                            self.wfile.flush()
                            time.sleep(route.drip_s)
                    else:
                        self.wfile.write(route.body)
                except OSError:
                    pass  # the client gave up, as it should on a slow or oversized answer

            def log_message(self, *_args: Any) -> None:
                pass

        return Handler


@pytest.fixture
def server(pki: PKI) -> Iterator[KeyServer]:
    s = KeyServer(pki)
    yield s
    s.stop()


@pytest.fixture
def fetcher(pki: PKI) -> KeyFetcher:
    return KeyFetcher(ca_bundle=str(pki.ca_file), env={})


Clock = FakeClock


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_verifier(fetcher: KeyFetcher, clock: Clock, issuer: str, **kw: Any) -> Verifier:
    settings = IssuerSettings(name="test", issuer=issuer, audiences=(AUDIENCE,), **kw)
    return Verifier([settings], clock=clock, fetcher=fetcher)


def refused(verifier: Verifier, token: str, *fragments: str) -> str:
    with pytest.raises(InvalidSubjectToken) as info:
        verifier.verify(token)
    assert info.value.reason == "unknown_key", info.value.description
    for fragment in fragments:
        assert fragment in info.value.description
    return info.value.description


def signer(server: KeyServer) -> LocalIssuer:
    return LocalIssuer(issuer=server.url())


def unknown_kid_token(issuer: LocalIssuer) -> str:
    return issuer.token(lifetime=3600, headers={"kid": os.urandom(12).hex()})


# --------------------------------------------------------------------------- behaviour


def test_discovery_then_rotation(server: KeyServer, fetcher: KeyFetcher, clock: Clock) -> None:
    a, b = signer(server), signer(server)
    server.publish(a.issuer, a)
    verifier = make_verifier(fetcher, clock, a.issuer, discovery=True, jwks_refresh="5m")
    assert server.hits == {}  # nothing fetched until keys are needed
    assert verifier.verify(a.token(lifetime=3600)).service_account == "source-controller"
    assert (server.hits[WELL_KNOWN], server.hits[JWKS_PATH]) == (1, 1)

    server.publish(a.issuer, a, b)  # the issuer adds a key and starts signing with it
    refused(verifier, b.token(lifetime=3600), repr(b.kid))  # within 30 s of the last fetch
    clock.now += identity.UNKNOWN_KID_COOLDOWN_S
    assert verifier.verify(b.token(lifetime=3600))  # the unknown kid caused one refetch
    assert server.hits[JWKS_PATH] == 2

    server.publish(a.issuer, b)  # ... and retires the old one
    assert verifier.verify(a.token(lifetime=3600))  # still trusted until the next refresh
    clock.now += 300
    refused(verifier, a.token(lifetime=3600), repr(a.kid))
    assert verifier.verify(b.token(lifetime=3600))
    assert (server.hits[WELL_KNOWN], server.hits[JWKS_PATH]) == (3, 3)


def test_unknown_kid_flood_fetches_once_per_cooldown(
    server: KeyServer, fetcher: KeyFetcher, clock: Clock
) -> None:
    a = signer(server)
    server.publish(a.issuer, a)
    verifier = make_verifier(fetcher, clock, a.issuer, jwks_uri=server.url(JWKS_PATH))
    assert verifier.verify(a.token())
    assert server.hits[JWKS_PATH] == 1

    flood = [unknown_kid_token(a) for _ in range(50)]
    for token in flood:  # within the cooldown of the first fetch
        refused(verifier, token, "has no key with kid")
    assert server.hits[JWKS_PATH] == 1

    clock.now += identity.UNKNOWN_KID_COOLDOWN_S
    errors: list[str] = []

    def attempt(token: str) -> None:
        try:
            verifier.verify(token)
        except InvalidSubjectToken as exc:
            errors.append(exc.reason)

    threads = [threading.Thread(target=attempt, args=(t,)) for t in flood]  # all at once
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == ["unknown_key"] * 50
    assert server.hits[JWKS_PATH] == 2  # one fetch for fifty unknown kids
    assert server.hits[WELL_KNOWN] == 0  # jwks_uri configured: no discovery


def test_endpoint_down_keys_trusted_until_max_stale(
    server: KeyServer, fetcher: KeyFetcher, clock: Clock
) -> None:
    a = signer(server)
    server.publish(a.issuer, a)
    verifier = make_verifier(
        fetcher, clock, a.issuer, discovery=True, jwks_refresh="1m", jwks_max_stale="10m"
    )
    assert verifier.verify(a.token(lifetime=3600))
    server.down = True
    clock.now += 60
    assert verifier.verify(a.token(lifetime=3600))  # refresh failed (503): current keys
    assert server.hits[WELL_KNOWN] == 2
    clock.now += 540  # 10 min since the last good fetch
    assert verifier.verify(a.token(lifetime=3600))
    clock.now += 1
    description = refused(verifier, a.token(lifetime=3600), "stale", "HTTP 503")
    assert "'test'" in description
    assert not verifier.ready()

    server.down = False
    clock.now += identity.MAX_RETRY_S
    assert verifier.ready()
    assert verifier.verify(a.token(lifetime=3600))


def test_unreachable_endpoint_at_start_is_not_ready_until_keys_arrive(
    fetcher: KeyFetcher, clock: Clock, pki: PKI
) -> None:
    late = KeyServer(pki)
    port = late.port
    late.stop()  # nothing listens there yet
    issuer = f"https://127.0.0.1:{port}"
    verifier = make_verifier(fetcher, clock, issuer, discovery=True)  # does not raise
    assert not verifier.ready()
    a = LocalIssuer(issuer=issuer)
    refused(verifier, a.token(), "unavailable", "ConnectionError")


@pytest.mark.parametrize("where", ["other-host-name", "other-port", "other-scheme"])
def test_discovered_jwks_uri_on_another_host_is_refused(
    server: KeyServer, fetcher: KeyFetcher, clock: Clock, where: str
) -> None:
    a = signer(server)
    server.publish(a.issuer, a)
    other = KeyServer(None)
    try:
        other.json(JWKS_PATH, a.jwks())
        jwks_uri = {
            # The same server under another name: reachable, valid, and still refused.
            "other-host-name": server.url(JWKS_PATH, host="localhost"),
            "other-port": other.url(JWKS_PATH).replace("http://", "https://"),
            "other-scheme": other.url(JWKS_PATH),
        }[where]
        server.json(WELL_KNOWN, {"issuer": a.issuer, "jwks_uri": jwks_uri})
        verifier = make_verifier(fetcher, clock, a.issuer, discovery=True)
        refused(verifier, a.token(), "unavailable", "not on the issuer's host", jwks_uri)
        assert server.hits[JWKS_PATH] == 0 and other.hits[JWKS_PATH] == 0
    finally:
        other.stop()


def test_discovery_document_for_another_issuer_is_refused(
    server: KeyServer, fetcher: KeyFetcher, clock: Clock
) -> None:
    a = signer(server)
    server.publish(server.url(host="localhost"), a)  # names the issuer differently
    verifier = make_verifier(fetcher, clock, a.issuer, discovery=True)
    refused(verifier, a.token(), "is not the configured issuer")
    assert server.hits[JWKS_PATH] == 0


@pytest.mark.parametrize("redirected", [JWKS_PATH, WELL_KNOWN])
def test_redirects_are_not_followed(
    server: KeyServer, fetcher: KeyFetcher, clock: Clock, redirected: str
) -> None:
    a = signer(server)
    server.publish(a.issuer, a)
    server.routes["/moved" + redirected] = server.routes[redirected]
    server.routes[redirected] = Route(302, headers={"Location": server.url("/moved" + redirected)})
    verifier = make_verifier(fetcher, clock, a.issuer, discovery=True)
    refused(verifier, a.token(), "HTTP 302 redirect", "not followed")
    assert server.hits[redirected] == 1 and server.hits["/moved" + redirected] == 0


@pytest.mark.parametrize("content_length", [True, False])
def test_oversized_response_is_refused(
    server: KeyServer, fetcher: KeyFetcher, clock: Clock, content_length: bool
) -> None:
    a = signer(server)
    doc = {"keys": a.jwks()["keys"], "padding": "x" * MAX_BYTES}  # a valid JWKS, too big
    server.json(JWKS_PATH, doc, content_length=content_length)
    verifier = make_verifier(fetcher, clock, a.issuer, jwks_uri=server.url(JWKS_PATH))
    refused(verifier, a.token(), f"larger than {MAX_BYTES} bytes")

    doc["padding"] = "x" * (MAX_BYTES - 4096)  # just under the cap: accepted
    server.json(JWKS_PATH, doc, content_length=content_length)
    clock.now += 1  # past the back-off of the failed fetch
    assert verifier.verify(a.token())


def test_a_content_length_of_non_ascii_digits_is_ignored(
    server: KeyServer, fetcher: KeyFetcher, clock: Clock
) -> None:
    """"²".isdigit() is true but int() refuses it: the body is read to its end instead."""
    a = signer(server)
    server.json(JWKS_PATH, a.jwks(), content_length=False, headers={"Content-Length": "\u00b2"})
    verifier = make_verifier(fetcher, clock, a.issuer, jwks_uri=server.url(JWKS_PATH))
    assert verifier.verify(a.token())


def test_slow_sender_is_cut_at_the_total_deadline(
    server: KeyServer, pki: PKI, clock: Clock
) -> None:
    a = signer(server)
    body = json.dumps(a.jwks()).encode()
    server.routes[JWKS_PATH] = Route(body=body, drip_s=0.05)  # minutes for the whole body
    quick = KeyFetcher(ca_bundle=str(pki.ca_file), env={}, total_timeout_s=0.5)
    with pytest.raises(FetchError, match="no complete answer within"):
        quick.get(server.url(JWKS_PATH))


def test_content_type_is_not_checked_but_json_is(
    server: KeyServer, fetcher: KeyFetcher, clock: Clock
) -> None:
    a = signer(server)
    server.json(JWKS_PATH, a.jwks(), headers={"Content-Type": "text/plain"})
    verifier = make_verifier(fetcher, clock, a.issuer, jwks_uri=server.url(JWKS_PATH))
    assert verifier.verify(a.token())

    server.routes[JWKS_PATH] = Route(
        body=b"<html>oops</html>", headers={"Content-Type": "text/html"}
    )
    clock.now += 300
    assert verifier.verify(a.token())  # a bad answer keeps the keys in hand
    other = make_verifier(fetcher, clock, a.issuer, jwks_uri=server.url(JWKS_PATH))
    refused(other, a.token(), "not valid JSON")


def test_certificate_from_an_untrusted_ca_is_refused(server: KeyServer, clock: Clock) -> None:
    a = signer(server)
    server.publish(a.issuer, a)
    verifier = make_verifier(KeyFetcher(env={}), clock, a.issuer, discovery=True)  # certifi only
    refused(verifier, a.token(), "unavailable", "SSLError")
    assert server.hits[WELL_KNOWN] == 0  # the handshake failed before any request


def test_no_credentials_are_sent(
    server: KeyServer, fetcher: KeyFetcher, clock: Clock, tmp_path: Path, monkeypatch: Any
) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login broker password s3cret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))  # requests would use it with trust_env on
    a = signer(server)
    server.publish(a.issuer, a)
    server.routes[WELL_KNOWN].headers["Set-Cookie"] = "session=abc; Path=/"
    verifier = make_verifier(fetcher, clock, a.issuer, discovery=True, jwks_refresh="1m")
    assert verifier.verify(a.token())
    clock.now += 60
    assert verifier.verify(a.token())
    assert len(server.request_headers) == 4
    for headers in server.request_headers:
        names = {h.lower() for h in headers}
        assert not names & {"authorization", "cookie", "proxy-authorization"}, headers


def test_plain_http_key_urls(pki: PKI, clock: Clock, tmp_path: Path) -> None:
    issuer = {"name": "test", "issuer": "https://i.example", "audiences": [AUDIENCE]}
    gcp = {"allowed_service_accounts": ["*@p.iam.gserviceaccount.com"]}
    for bad in (
        {"jwks_uri": "http://keys.example.com/jwks"},
        {"jwks_uri": "http://192.0.2.10:8080/jwks"},
        {"discovery": True, "issuer": "http://k8s.example.com"},
    ):
        with pytest.raises(ConfigError) as info:
            settings_from_mapping({"issuers": [{**issuer, **bad}], "gcp": gcp}, env={})
        assert "plain http, allowed only to a loopback address" in str(info.value)

    # The CLI's check refuses it before serving, with the key's path.
    cfg = tmp_path / "b.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {"issuers": [{**issuer, "jwks_uri": "http://keys.example.com/jwks"}], "gcp": gcp}
        )
    )
    out = subprocess.run(
        [sys.executable, "-m", "broker.cli", "serve", "--config", str(cfg), "--check"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert out.returncode == 2 and "issuers.0.jwks_uri" in out.stderr, out.stderr

    # To a loopback address, plain http is allowed (a local proxy or test issuer).
    plain = KeyServer(None)
    try:
        a = LocalIssuer(issuer=plain.url())
        plain.publish(a.issuer, a)
        verifier = Verifier(
            [IssuerSettings(name="t", issuer=a.issuer, audiences=(AUDIENCE,), discovery=True)],
            clock=clock,
            fetcher=KeyFetcher(env={}),
        )
        assert verifier.verify(a.token()).issuer_name == "t"
    finally:
        plain.stop()


# --------------------------------------------------------------------------- end to end


def test_serve_with_discovery_issues_a_token(
    tmp_path: Path, pki: PKI, server: KeyServer, redis_url: str, emulator: Any
) -> None:
    a = signer(server)
    server.publish(a.issuer, a)
    config = broker_config(tmp_path, a, redis_url=redis_url, iam_endpoint=emulator.url)
    cfg = yaml.safe_load(config.read_text())
    entry = cfg["issuers"][0]
    del entry["jwks_file"]
    entry["discovery"] = True
    config.write_text(yaml.safe_dump(cfg))

    with run_broker(config, env={"REQUESTS_CA_BUNDLE": str(pki.ca_file)}) as broker:
        resp = broker.token(exchange_form(a.token()))
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert emulator.token_info(body["access_token"])["service_account"].startswith(
            "flux-source@"
        )
        ready = requests.get(f"{broker.url}/readyz", timeout=10)
        assert ready.json()["checks"]["keys"] == "ok"
        stranger = LocalIssuer(issuer=a.issuer)  # right issuer, key not published
        refused_resp = broker.token(exchange_form(stranger.token()))
        assert refused_resp.status_code == 400
        assert "has no key with kid" in refused_resp.json()["error_description"]
    assert server.hits[WELL_KNOWN] >= 1 and server.hits[JWKS_PATH] >= 1
    for headers in server.request_headers:
        assert "authorization" not in {h.lower() for h in headers}
