"""Fetch an issuer's key documents over HTTP: its JWKS and its OpenID discovery document.

The rules of DESIGN.md §3, enforced on every request, including URLs learned from discovery:
https only (plain http only to a loopback address); redirects are never followed; nothing that
could authenticate the broker is sent (no Authorization header, no netrc, no cookies: in a
cluster the broker's own service-account token goes to the configured API server only); the
body is capped at :data:`MAX_BYTES`; connect and read timeouts plus a total deadline, checked
between reads, bound a fetch to about ``TOTAL_TIMEOUT_S`` + ``READ_TIMEOUT_S``. The content
type is not checked (issuers serve JWKS as ``application/json``, ``application/jwk-set+json``
or even ``text/plain``); the caller parses.

TLS trust: the ``ca_bundle`` given, else ``REQUESTS_CA_BUNDLE`` or ``SSL_CERT_FILE`` from the
environment, else the certifi bundle that ships with requests.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
import urllib3

from broker.settings import key_url_problem

MAX_BYTES = 256 * 1024
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 10.0
TOTAL_TIMEOUT_S = 15.0
DISCOVERY_PATH = "/.well-known/openid-configuration"

_CHUNK = 16 * 1024
_HEADERS = {
    "Accept": "application/jwk-set+json, application/json;q=0.9, */*;q=0.5",
    # Compressed bodies could expand past the size cap between two checks; ask for none.
    "Accept-Encoding": "identity",
    "User-Agent": "token-broker (key fetch)",
}
_DEFAULT_PORTS = {"http": 80, "https": 443}


class FetchError(Exception):
    """A key document could not be fetched or was refused; the message says why (no secrets)."""


def _short(text: object, limit: int = 160) -> str:
    value = str(text)
    return value if len(value) <= limit else value[: limit - 3] + "..."


def origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of ``url``, the port made explicit: what 'same host' compares."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, parts.hostname or "", parts.port or _DEFAULT_PORTS.get(scheme, 0)


def discovery_url(issuer: str) -> str:
    """Where OpenID Connect Discovery 1.0 §4 puts ``issuer``'s configuration document."""
    parts = urlsplit(issuer)
    if parts.query or parts.fragment:
        raise FetchError(f"issuer {issuer!r} has a query or fragment; it cannot be discovered")
    path = parts.path.rstrip("/") + DISCOVERY_PATH
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


class KeyFetcher:
    """GETs key documents under the rules above. Holds no connection between calls; thread-safe."""

    def __init__(
        self,
        *,
        ca_bundle: str | None = None,
        env: Mapping[str, str] | None = None,
        max_bytes: int = MAX_BYTES,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        read_timeout_s: float = READ_TIMEOUT_S,
        total_timeout_s: float = TOTAL_TIMEOUT_S,
    ) -> None:
        """``ca_bundle`` None: trust ``REQUESTS_CA_BUNDLE`` / ``SSL_CERT_FILE`` / certifi."""
        env = os.environ if env is None else env
        bundle = ca_bundle or env.get("REQUESTS_CA_BUNDLE") or env.get("SSL_CERT_FILE")
        self._verify: str | bool = bundle or True
        self._max_bytes = max_bytes
        self._timeouts = (min(connect_timeout_s, total_timeout_s), read_timeout_s)
        self._total_s = total_timeout_s

    def get(self, url: str) -> bytes:
        """The body of a ``200`` answer to GET ``url``; raise :class:`FetchError` otherwise."""
        problem = key_url_problem(url)
        if problem:
            raise FetchError(f"refused to fetch: {problem}")
        deadline = time.monotonic() + self._total_s
        try:
            # A fresh session per fetch: no cookies carried over, no pooled connection to reuse
            # across forks. trust_env off: no netrc credentials; proxies are taken explicitly.
            with requests.Session() as session:
                session.trust_env = False
                with session.get(
                    url,
                    headers=_HEADERS,
                    timeout=self._timeouts,
                    allow_redirects=False,
                    stream=True,
                    verify=self._verify,
                    proxies=requests.utils.get_environ_proxies(url),
                ) as resp:
                    return self._body(url, resp, deadline)
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            # Reading resp.raw directly, urllib3's own errors are not wrapped by requests.
            raise FetchError(f"GET {url}: {type(exc).__name__}: {_short(exc)}") from exc

    def get_json(self, url: str) -> Any:
        """:meth:`get`, parsed as JSON (whatever the content type said)."""
        body = self.get(url)
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise FetchError(f"GET {url}: the answer is not JSON ({_short(exc, 80)})") from exc

    def discover_jwks_uri(self, issuer: str) -> str:
        """The ``jwks_uri`` that ``issuer``'s discovery document names, after checking it.

        The document's ``issuer`` must equal ``issuer`` exactly (OpenID Connect Discovery §4.3),
        and its ``jwks_uri`` must be on the issuer's own scheme, host and port: whoever can
        answer at the discovery URL must not be able to send us to keys held elsewhere.
        """
        url = discovery_url(issuer)
        doc = self.get_json(url)
        if not isinstance(doc, dict):
            raise FetchError(f"GET {url}: the discovery document is not a JSON object")
        found = doc.get("issuer")
        if found != issuer:
            raise FetchError(
                f"GET {url}: the discovery document's issuer {_short(repr(found), 120)} "
                f"is not the configured issuer {issuer!r}"
            )
        jwks_uri = doc.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri:
            raise FetchError(f"GET {url}: the discovery document has no jwks_uri")
        problem = key_url_problem(jwks_uri)
        if problem:
            raise FetchError(f"GET {url}: the discovered jwks_uri {problem}")
        if origin(jwks_uri) != origin(issuer):
            scheme, host, port = origin(issuer)
            raise FetchError(
                f"GET {url}: the discovered jwks_uri {_short(repr(jwks_uri), 120)} is not on the "
                f"issuer's host ({scheme}://{host}:{port}); refused"
            )
        return jwks_uri

    def _body(self, url: str, resp: requests.Response, deadline: float) -> bytes:
        status = resp.status_code
        if 300 <= status < 400:
            location = _short(repr(resp.headers.get("Location")), 120)
            raise FetchError(
                f"GET {url}: HTTP {status} redirect to {location} refused "
                "(redirects are not followed; configure the final URL)"
            )
        if status != 200:
            raise FetchError(f"GET {url}: HTTP {status}")
        too_large = f"GET {url}: the answer is larger than {self._max_bytes} bytes; refused"
        length = resp.headers.get("Content-Length", "")
        if length.isascii() and length.isdigit() and int(length) > self._max_bytes:
            raise FetchError(too_large)
        body = bytearray()
        while True:
            if time.monotonic() > deadline:
                raise FetchError(f"GET {url}: no complete answer within {self._total_s:.0f} s")
            # read1: whatever has arrived (a slow sender cannot hold one read past the deadline
            # by dribbling bytes), at most one chunk.
            chunk = resp.raw.read1(_CHUNK, decode_content=True)
            if not chunk:
                return bytes(body)
            body += chunk
            if len(body) > self._max_bytes:
                raise FetchError(too_large)
