"""Kubernetes / OIDC service-account JWT → :class:`~broker.model.WorkloadIdentity` (DESIGN.md §3).

PyJWT checks signatures; the claims are checked here, so that every refusal carries a stable
``reason`` code (:data:`REASONS`) and a sentence that says exactly what was wrong. Keys come
from each issuer's ``jwks_file`` (a JWKS document, or PEM public keys / X.509 certificates as
kube-apiserver's ``--service-account-key-file`` takes them). The file is stat-ed at most every
``min(jwks_refresh, 5 s)`` and re-parsed only when it changed; a file that turns bad keeps the
last good keys until ``jwks_max_stale``.

Keys from a ``jwks_uri``, or from the ``jwks_uri`` that ``discovery: true`` finds in the issuer's
OpenID configuration, are fetched by :mod:`broker.jwks_fetch` lazily, on first use (nothing
connects while the app is built, so an unreachable endpoint never stops a start: the verifier
is just not :meth:`Verifier.ready` until keys arrive). They are refetched every
``jwks_refresh`` by one thread while the others keep verifying with the current keys, and on
an unknown ``kid`` at most every :data:`UNKNOWN_KID_COOLDOWN_S` per issuer. Each fetch
replaces the whole key set, so a key removed at the endpoint stops verifying after the next
refresh. While the endpoint fails, the last fetched keys are trusted until ``jwks_max_stale``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import jwt
import orjson
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from broker.errors import ConfigError, InvalidSubjectToken
from broker.jwks_fetch import TOTAL_TIMEOUT_S, FetchError, KeyFetcher
from broker.model import WorkloadIdentity
from broker.protocol import MAX_SUBJECT_TOKEN_BYTES
from broker.settings import API_SERVER_AUDIENCES, IssuerSettings

log = logging.getLogger(__name__)

REASONS: tuple[str, ...] = (
    "token_missing",
    "token_too_large",
    "token_malformed",
    "unsupported_algorithm",
    "unknown_issuer",
    "unknown_key",
    "bad_signature",
    "token_expired",
    "token_not_yet_valid",
    "wrong_audience",
    "api_server_audience",
    "claims_missing",
    "lifetime_too_long",
    "claims_inconsistent",
    "legacy_token",
)

ALGORITHMS: tuple[str, ...] = ("RS256", "RS384", "RS512", "ES256", "ES384", "PS256")
MAX_TOKEN_BYTES = MAX_SUBJECT_TOKEN_BYTES  # one limit, the wire's (broker.protocol)
LEEWAY_S = 60.0
MAX_STAT_INTERVAL_S = 5.0
MIN_RSA_BITS = 2048
UNKNOWN_KID_COOLDOWN_S = 30.0  # at most one refetch per issuer this often for unknown kids
MAX_RETRY_S = 30.0  # after a failed fetch, retry after 1, 2, 4 ... up to this many seconds
_FETCH_WAIT_S = 2 * TOTAL_TIMEOUT_S + 5  # discovery + JWKS: how long a caller may wait on them

_RSA_ALGS = ("RS256", "RS384", "RS512", "PS256")
_EC_ALGS = {"secp256r1": ("P-256", "ES256"), "secp384r1": ("P-384", "ES384")}
_LEGACY = "kubernetes.io/serviceaccount/"
# base64url to the standard alphabet for binascii's strict decoder; '+', '/' and '=' are not
# base64url, so they become '!', which the strict decoder refuses like any other stray character.
_URL_TO_STD = bytes.maketrans(b"-_+/=", b"+/!!!")
# The last character of an unpadded segment of length 2 or 3 (mod 4) carries 4 or 2 unused bits,
# which must be zero (RFC 4648 §3.5). Refusing the others gives a token's bytes one spelling, so
# re-encoding a replayed token cannot change its audit fingerprint (subject_token_sha256). An
# ECDSA signature can still be replaced by its twin (s -> n - s, also valid): for ES256/ES384
# issuers the fingerprint identifies a presented token, not a signing event.
_CANONICAL_LAST = ("", "", "AQgw", "AEIMQUYcgkosw048")
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----.*?-----END \1-----", re.S)
AUDIT_TEXT_MAX = 256  # caller-chosen text kept in an audit record is cut to this length


def _fail(reason: str, description: str) -> InvalidSubjectToken:
    return InvalidSubjectToken(description, reason=reason)


def _show(value: object, limit: int = 80) -> str:
    """repr() of a token-supplied value, cut short: it ends up in responses and logs."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _when(ts: float) -> str:
    try:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return f"{ts:.0f} (unix time)"


def _no_constants(name: str) -> Any:
    # json.loads would turn NaN/Infinity into floats: an `exp` of Infinity never expires.
    raise ValueError(f"non-standard JSON constant {name}")


def b64url_decode(segment: str) -> bytes:
    """Decode one JWS segment: base64url without padding, canonical (RFC 7515 §2, RFC 4648 §3.5).

    Raises ``ValueError`` for anything else: other characters, padding, whitespace, a length of 1
    (mod 4), or unused bits that are not zero.
    """
    tail = len(segment) % 4
    data = segment.encode("ascii").translate(_URL_TO_STD)  # UnicodeEncodeError is a ValueError
    if tail:
        if tail == 1 or segment[-1] not in _CANONICAL_LAST[tail]:
            raise ValueError("not canonical base64url")
        data += b"=" * (4 - tail)
    return binascii.a2b_base64(data, strict_mode=True)  # binascii.Error is a ValueError too


def _b64json(segment: str) -> Any:
    # orjson: strict JSON (NaN/Infinity refused) and several times faster than json.
    return orjson.loads(b64url_decode(segment))


def key_id(public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> str:
    """The kid kube-apiserver gives a key: base64url (unpadded) SHA-256 of its DER SPKI."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode("ascii")


# --------------------------------------------------------------------------- keys


@dataclass(frozen=True, slots=True)
class _Key:
    """One public key, parsed once per file version, as a PyJWK per algorithm it may verify."""

    kid: str
    kid_published: bool  # False: derived by us (PEM, or a JWK without kid)
    kind: str  # "RSA" | "EC P-256" | "EC P-384", for messages
    by_alg: Mapping[str, jwt.PyJWK] = field(repr=False)


@dataclass(frozen=True, slots=True)
class _KeySet:
    keys: tuple[_Key, ...]
    by_kid: Mapping[str, tuple[_Key, ...]]

    @classmethod
    def of(cls, keys: Sequence[_Key]) -> _KeySet:
        by_kid: dict[str, tuple[_Key, ...]] = {}
        for k in keys:
            by_kid[k.kid] = (*by_kid.get(k.kid, ()), k)
        return cls(tuple(keys), by_kid)


def _key_from_public(public: object, kid: str | None, alg: str | None) -> _Key:
    """Wrap a public key; ``alg`` (a JWK's own ``alg``) narrows what it may verify."""
    if isinstance(public, rsa.RSAPublicKey):
        if public.key_size < MIN_RSA_BITS:
            raise ValueError(f"RSA key of {public.key_size} bits (need >= {MIN_RSA_BITS})")
        jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
        algs: tuple[str, ...] = _RSA_ALGS
        kind = "RSA"
    elif isinstance(public, ec.EllipticCurvePublicKey):
        if public.curve.name not in _EC_ALGS:
            raise ValueError(f"EC curve {public.curve.name} is not accepted")
        crv, ec_alg = _EC_ALGS[public.curve.name]
        jwk = ECAlgorithm.to_jwk(public, as_dict=True)
        algs = (ec_alg,)
        kind = f"EC {crv}"
    else:
        raise ValueError(f"{type(public).__name__} keys are not accepted (RSA or EC only)")
    if alg is not None:
        if alg not in algs:
            raise ValueError(f"alg {_show(alg)} does not fit a {kind} key or is not accepted")
        algs = (alg,)
    by_alg = {a: jwt.PyJWK(jwk, algorithm=a) for a in algs}
    published = bool(kid)
    return _Key(kid or key_id(public), published, kind, by_alg)


def _keys_from_jwks(doc: object, problems: list[str]) -> list[_Key]:
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError('not a JWKS: expected a JSON object with a "keys" list')
    keys = []
    for i, entry in enumerate(doc["keys"]):
        where = f"keys[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: not an object")
            continue
        kid = entry.get("kid")
        if kid is not None and not isinstance(kid, str):
            problems.append(f"{where}: kid is not a string")
            continue
        where = f"{where} (kid {_show(kid)})"
        if entry.get("use", "sig") != "sig":
            problems.append(f"{where}: use {_show(entry.get('use'))} is not sig")
            continue
        if "d" in entry or "p" in entry or "k" in entry:
            problems.append(f"{where}: holds secret or private key material, never trusted")
            continue
        kty = entry.get("kty")
        try:
            if kty == "RSA":
                public: object = RSAAlgorithm.from_jwk({"kty": "RSA", **_pick(entry, "n", "e")})
            elif kty == "EC":
                public = ECAlgorithm.from_jwk({"kty": "EC", **_pick(entry, "crv", "x", "y")})
            else:
                problems.append(f"{where}: kty {_show(kty)} is not accepted (RSA or EC only)")
                continue
            alg = entry.get("alg")
            keys.append(_key_from_public(public, kid, alg if isinstance(alg, str) else None))
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            problems.append(f"{where}: {exc}")
    return keys


def _pick(entry: Mapping[str, Any], *names: str) -> dict[str, Any]:
    return {n: entry[n] for n in names if n in entry}


def _keys_from_pem(data: bytes, problems: list[str]) -> list[_Key]:
    keys = []
    for i, m in enumerate(_PEM_BLOCK.finditer(data)):
        label = m.group(1).decode("ascii")
        where = f"PEM block {i} ({label})"
        if "PRIVATE" in label:
            # A signing key has no business on the broker: refuse the file rather than use it.
            raise ValueError(f"{where}: a private key; give the broker public keys only")
        try:
            if label == "CERTIFICATE":
                public: object = x509.load_pem_x509_certificate(m.group(0)).public_key()
            elif label in ("PUBLIC KEY", "RSA PUBLIC KEY"):
                public = serialization.load_pem_public_key(m.group(0))
            else:
                problems.append(f"{where}: not a public key or certificate, ignored")
                continue
            keys.append(_key_from_public(public, None, None))
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
    return keys


def load_keys(data: bytes) -> tuple[_KeySet, list[str]]:
    """Parse a key file (JWKS JSON or PEM); return the usable keys and what was skipped, why.

    Raises ValueError when the file holds no usable key at all.
    """
    problems: list[str] = []
    text = data.lstrip()
    if text[:1] in (b"{", b"["):
        keys = _keys_from_jwks(_json(text), problems)
    elif b"-----BEGIN " in text:
        keys = _keys_from_pem(text, problems)
    else:
        raise ValueError("neither a JWKS (JSON) nor PEM public keys / certificates")
    return _usable_keys(keys, problems), problems


def load_jwks(data: bytes) -> tuple[_KeySet, list[str]]:
    """Parse a JWKS document (JSON only: what a ``jwks_uri`` serves), as :func:`load_keys`.

    Raises ValueError when it is not a JWKS or holds no usable key.
    """
    problems: list[str] = []
    keys = _keys_from_jwks(_json(data), problems)
    return _usable_keys(keys, problems), problems


def _json(data: bytes) -> Any:
    try:
        return json.loads(data, parse_constant=_no_constants)
    except RecursionError as exc:  # deeply nested arrays from a hostile endpoint
        raise ValueError("not valid JSON: nested too deeply") from exc
    except ValueError as exc:
        raise ValueError(f"not valid JSON: {exc}") from exc


def _usable_keys(keys: list[_Key], problems: list[str]) -> _KeySet:
    if not keys:
        detail = "; ".join(problems) if problems else "empty"
        raise ValueError(f"no usable public key ({detail})")
    return _KeySet.of(keys)


class _KeyProvider(Protocol):
    def current(self, *, wait: bool = True) -> _KeySet:
        """The keys to verify with now (refreshing when due); raise unknown_key if none."""

    def refetch_for_unknown_kid(self, seen: _KeySet) -> _KeySet | None:
        """Newer keys than ``seen`` (fetched now unless in cooldown), or None."""


class _KeySource:
    """An issuer's keys from a file, re-read when its stat changes (checked rate-limited)."""

    def __init__(
        self,
        name: str,
        path: Path,
        *,
        interval_s: float,
        max_stale_s: float,
        clock: Callable[[], float],
    ) -> None:
        self._name = name
        self._path = path
        self._interval_s = interval_s
        self._max_stale_s = max_stale_s
        self._clock = clock
        self._lock = threading.Lock()
        self._stamp: tuple[int, ...] | None = None  # stat of the version in self._keys
        self._bad_stamp: tuple[int, ...] | None = None  # a version that failed (warned once)
        self._problem: str | None = None
        now = clock()
        self._checked_at = now
        self._good_at = now
        try:
            self._stamp = self._stat()
            self._keys = self._load()
        except (OSError, ValueError) as exc:
            raise ConfigError(str(path), [f"issuers[{name}].jwks_file: {_describe(exc)}"]) from exc

    def current(self, *, wait: bool = True) -> _KeySet:
        """The keys to verify with now; refuses (unknown_key) when they are too stale."""
        del wait  # a stat is quick: always done inline
        now = self._clock()
        if not 0 <= now - self._checked_at < self._interval_s:
            with self._lock:
                if not 0 <= now - self._checked_at < self._interval_s:
                    self._refresh(now)
        if now - self._good_at > self._max_stale_s:
            raise _fail(
                "unknown_key",
                f"the keys of issuer {self._name!r} are stale: its key file has been unusable "
                f"since {_when(self._good_at)} ({self._problem or 'unknown problem'})",
            )
        return self._keys

    def refetch_for_unknown_kid(self, seen: _KeySet) -> _KeySet | None:
        """Never: the file is already re-checked every few seconds."""
        del seen
        return None

    def _stat(self) -> tuple[int, ...]:
        st = os.stat(self._path)
        return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)

    def _load(self) -> _KeySet:
        keys, problems = load_keys(self._path.read_bytes())
        for problem in problems:
            log.warning("issuer %s: %s: %s", self._name, self._path, problem)
        log.info(
            "issuer %s: loaded %d key(s) from %s (kids %s)",
            self._name,
            len(keys.keys),
            self._path,
            ", ".join(k.kid for k in keys.keys),
        )
        return keys

    def _refresh(self, now: float) -> None:
        self._checked_at = now
        try:
            stamp = self._stat()
        except OSError as exc:
            self._note_problem(f"cannot stat: {_describe(exc)}")
            return
        if stamp == self._stamp:
            self._good_at = now
            self._note_problem(None)
            return
        if stamp == self._bad_stamp:
            return
        try:
            keys = self._load()
        except (OSError, ValueError) as exc:
            self._bad_stamp = stamp
            self._note_problem(_describe(exc))
            return
        self._keys, self._stamp, self._bad_stamp, self._good_at = keys, stamp, None, now
        self._note_problem(None)

    def _note_problem(self, problem: str | None) -> None:
        if problem == self._problem:
            return
        if problem is None:
            log.info("issuer %s: key file %s is usable again", self._name, self._path)
        else:
            log.warning(
                "issuer %s: key file %s: %s; keeping the last good keys for up to %.0f s",
                self._name,
                self._path,
                problem,
                self._max_stale_s,
            )
        self._problem = problem


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return str(exc)


class _RemoteKeySource:
    """An issuer's keys fetched over HTTP(S): from ``jwks_uri``, or the one discovery names.

    Nothing is fetched until keys are first needed. When a refresh is due, one thread fetches
    while the others keep the current keys; only while there are no usable keys (none yet, or
    stale) do callers wait for the fetch in progress (bounded). A failed fetch is retried
    after 1, 2, 4 ... :data:`MAX_RETRY_S` seconds, so an endpoint that is down is not hammered
    by traffic.
    """

    def __init__(
        self,
        name: str,
        *,
        jwks_uri: str | None,
        discover_from: str | None,
        fetcher: KeyFetcher,
        refresh_s: float,
        max_stale_s: float,
        clock: Callable[[], float],
    ) -> None:
        self._name = name
        self._jwks_uri = jwks_uri
        self._discover_from = discover_from
        self._fetcher = fetcher
        # Refresh no later than max_stale, so a healthy endpoint never lets keys go stale.
        self._refresh_s = min(refresh_s, max_stale_s)
        self._max_stale_s = max_stale_s
        self._clock = clock
        self._lock = threading.Lock()  # held by the one thread that fetches
        # The keys in hand and when they were fetched: one attribute, read without the lock.
        self._fetched: tuple[_KeySet, float] | None = None
        self._attempt_at = -math.inf  # when the last fetch (good or not) started
        self._wait_s = 0.0  # after _attempt_at, the next scheduled fetch is due
        self._failures = 0
        self._problem: str | None = None
        self._logged: tuple[tuple[str, ...], tuple[str, ...]] | None = None

    def current(self, *, wait: bool = True) -> _KeySet:
        """The keys to verify with now, fetched first if due; unknown_key when none or stale.

        ``wait`` False (the readiness probe) never waits for another thread's fetch; otherwise
        a caller waits for one only when the keys in hand are absent or stale.
        """
        now = self._clock()
        fetched = self._fetched
        usable = fetched is not None and now - fetched[1] <= self._max_stale_s
        # Without usable keys, also wait out a fetch that another thread has already started.
        if self._due(now) or (wait and not usable):
            blocking = wait and not usable
            if self._lock.acquire(blocking, _FETCH_WAIT_S if blocking else -1):
                try:
                    now = self._clock()
                    if self._due(now):
                        self._fetch(now)
                finally:
                    self._lock.release()
        return self._usable(self._clock())

    def refetch_for_unknown_kid(self, seen: _KeySet) -> _KeySet | None:
        """Keys newer than ``seen``: fetched now unless the issuer is in its cooldown."""
        if not self._lock.acquire(timeout=_FETCH_WAIT_S):
            return None
        try:
            if self._fetched is not None and self._fetched[0] is not seen:
                return self._fetched[0]  # another thread fetched while this one waited
            now = self._clock()
            if 0 <= now - self._attempt_at < UNKNOWN_KID_COOLDOWN_S:
                return None
            self._fetch(now)
            return self._fetched[0] if self._fetched and self._fetched[0] is not seen else None
        finally:
            self._lock.release()

    def _due(self, now: float) -> bool:
        # A clock that went backwards makes a fetch due, rather than postponing it for long.
        return not 0 <= now - self._attempt_at < self._wait_s

    def _usable(self, now: float) -> _KeySet:
        fetched = self._fetched
        if fetched is None:
            raise _fail(
                "unknown_key",
                f"the keys of issuer {self._name!r} are unavailable: they could not be "
                f"fetched yet ({self._problem or 'no fetch has completed'})",
            )
        keys, good_at = fetched
        if now - good_at > self._max_stale_s:
            raise _fail(
                "unknown_key",
                f"the keys of issuer {self._name!r} are stale: last fetched at {_when(good_at)}, "
                f"over jwks_max_stale ago, and fetching fails ({self._problem or 'unknown'})",
            )
        return keys

    def _fetch(self, now: float) -> None:
        self._attempt_at = now
        uri = self._jwks_uri
        try:
            if uri is None:
                assert self._discover_from is not None
                uri = self._fetcher.discover_jwks_uri(self._discover_from)
            body = self._fetcher.get(uri)
            try:
                keys, problems = load_jwks(body)
            except ValueError as exc:
                raise FetchError(f"GET {uri}: {exc}") from exc
        except FetchError as exc:
            self._failures += 1
            self._wait_s = min(2.0 ** (self._failures - 1), MAX_RETRY_S, self._refresh_s)
            self._note_problem(str(exc))
            return
        self._fetched, self._failures = (keys, now), 0
        self._wait_s = self._refresh_s
        self._note_problem(None)
        kids = tuple(k.kid for k in keys.keys)
        if self._logged != (kids, tuple(problems)):
            self._logged = (kids, tuple(problems))
            for problem in problems:
                log.warning("issuer %s: %s: %s", self._name, uri, problem)
            log.info(
                "issuer %s: fetched %d key(s) from %s (kids %s)",
                self._name,
                len(kids),
                uri,
                ", ".join(kids),
            )

    def _note_problem(self, problem: str | None) -> None:
        if problem == self._problem:
            return
        if problem is None:
            log.info("issuer %s: keys can be fetched again", self._name)
        elif self._fetched is None:
            log.warning("issuer %s: fetching keys failed: %s; not ready", self._name, problem)
        else:
            log.warning(
                "issuer %s: fetching keys failed: %s; keeping the last fetched keys for up to "
                "%.0f s after they were fetched",
                self._name,
                problem,
                self._max_stale_s,
            )
        self._problem = problem


# --------------------------------------------------------------------------- verification


@dataclass(frozen=True, slots=True)
class _Issuer:
    settings: IssuerSettings
    keys: _KeyProvider
    api_server_audiences: frozenset[str]


class Verifier:
    """Verifies subject tokens against the configured issuers. Thread-safe."""

    def __init__(
        self,
        issuers: Sequence[IssuerSettings],
        *,
        resolve_path: Callable[[str], Path] = Path,
        clock: Callable[[], float] = time.time,
        fetcher: KeyFetcher | None = None,
    ) -> None:
        """Load every issuer's key file now; raise :class:`ConfigError` if one is unusable.

        Keys from a ``jwks_uri`` or discovery are fetched on first use, through ``fetcher``
        (default: :class:`~broker.jwks_fetch.KeyFetcher` trusting the environment's CA bundle).
        """
        self._clock = clock
        self._issuers: dict[str, _Issuer] = {}
        for s in issuers:
            if s.issuer in self._issuers:
                raise ConfigError(f"issuers[{s.name}]", [f"duplicate issuer {s.issuer!r}"])
            source: _KeyProvider
            if s.jwks_file is not None:
                source = _KeySource(
                    s.name,
                    resolve_path(s.jwks_file),
                    interval_s=min(s.jwks_refresh, MAX_STAT_INTERVAL_S),
                    max_stale_s=s.jwks_max_stale,
                    clock=clock,
                )
            else:
                fetcher = fetcher or KeyFetcher()
                source = _RemoteKeySource(
                    s.name,
                    jwks_uri=s.jwks_uri,
                    discover_from=s.issuer if s.discovery else None,
                    fetcher=fetcher,
                    refresh_s=s.jwks_refresh,
                    max_stale_s=s.jwks_max_stale,
                    clock=clock,
                )
            api = frozenset((*API_SERVER_AUDIENCES, s.issuer))
            self._issuers[s.issuer] = _Issuer(s, source, api)

    def verify(self, token: str, *, audiences: Sequence[str] | None = None) -> WorkloadIdentity:
        """Verify ``token`` and return who presented it, or raise :class:`InvalidSubjectToken`.

        ``audiences`` None means the matched issuer's configured audiences (the exchange), for
        which ``allow_api_server_audience`` also admits the API server's audiences. An explicit
        list (the admin path) admits exactly those: a token for the API server, or a legacy
        token without ``aud``, is then never enough.
        """
        if not isinstance(token, str) or not token.strip():
            raise _fail("token_missing", "no subject token was given")
        token = token.strip()
        if len(token) > MAX_TOKEN_BYTES:
            raise _fail(
                "token_too_large",
                f"the subject token is longer than {MAX_TOKEN_BYTES} bytes",
            )
        header, claims, signed = _parse(token)

        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ALGORITHMS:
            raise _fail(
                "unsupported_algorithm",
                f"token algorithm {_show(alg)} is not accepted (accepted: {', '.join(ALGORITHMS)})",
            )
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _fail("token_malformed", "the token header's kid is not a string")
        if "crit" in header or "b64" in header:
            raise _fail("token_malformed", "the token header uses crit/b64 extensions")
        if not signed:
            raise _fail("token_malformed", "the subject token has no signature")

        iss = claims.get("iss")
        if iss is None:
            raise _fail("claims_missing", "the token has no iss (issuer) claim")
        if not isinstance(iss, str):
            raise _fail("token_malformed", "the token's iss claim is not a string")
        issuer = self._issuers.get(iss)
        if issuer is None:
            raise _fail("unknown_issuer", f"issuer {_show(iss)} is not configured")

        self._check_signature(token, issuer, alg, kid)
        return self._check_claims(claims, issuer, audiences)

    def ready(self) -> bool:
        """True while every issuer has usable keys that are not past ``jwks_max_stale``.

        Fetches keys that are due (so the readiness probe loads them before traffic comes),
        but never waits for a fetch another thread is making.
        """
        try:
            for issuer in self._issuers.values():
                issuer.keys.current(wait=False)
        except InvalidSubjectToken:
            return False
        return True

    @staticmethod
    def unverified_claims(token: str) -> dict[str, object]:
        """Audit-relevant claims read WITHOUT verification (for records of refused tokens).

        Keys, when present as strings: iss, sub, namespace, service_account,
        service_account_uid, pod, pod_uid, jti (values cut to 256 characters). Never raises:
        anything unparsable gives ``{}``.
        """
        try:
            token = token.strip()
            if not token or len(token) > MAX_TOKEN_BYTES or not token.isascii():
                return {}
            parts = token.split(".")
            if len(parts) != 3:
                return {}
            claims = _b64json(parts[1])
            if not isinstance(claims, dict):
                return {}
            k8s = claims.get("kubernetes.io")
            k8s = k8s if isinstance(k8s, dict) else {}
            sa = k8s.get("serviceaccount")
            sa = sa if isinstance(sa, dict) else {}
            pod = k8s.get("pod")
            pod = pod if isinstance(pod, dict) else {}
            found = {
                "iss": claims.get("iss"),
                "sub": claims.get("sub"),
                "namespace": k8s.get("namespace", claims.get(_LEGACY + "namespace")),
                "service_account": sa.get("name", claims.get(_LEGACY + "service-account.name")),
                "service_account_uid": sa.get("uid", claims.get(_LEGACY + "service-account.uid")),
                "pod": pod.get("name"),
                "pod_uid": pod.get("uid"),
                "jti": claims.get("jti"),
            }
            return {k: v[:AUDIT_TEXT_MAX] for k, v in found.items() if isinstance(v, str)}
        except Exception:
            return {}

    # -- steps

    def _check_signature(self, token: str, issuer: _Issuer, alg: str, kid: str | None) -> None:
        name = issuer.settings.name
        keyset = issuer.keys.current()
        if kid is not None and kid not in keyset.by_kid:
            # The issuer may have rotated since the last refresh (rate-limited per issuer).
            keyset = issuer.keys.refetch_for_unknown_kid(keyset) or keyset
        by_kid = keyset.by_kid.get(kid, ()) if kid is not None else ()
        if by_kid:
            candidates = [k.by_alg[alg] for k in by_kid if alg in k.by_alg]
            if not candidates:
                kinds = ", ".join(sorted({k.kind for k in by_kid}))
                raise _fail(
                    "unsupported_algorithm",
                    f"token algorithm {alg} does not fit key {_show(kid)} ({kinds}) "
                    f"of issuer {name!r}",
                )
        else:
            # kube-apiserver tries every key of --service-account-key-file whatever the kid, so
            # keys whose kid we derived are tried for any kid; published kids must match.
            pool = keyset.keys if kid is None else [k for k in keyset.keys if not k.kid_published]
            candidates = [k.by_alg[alg] for k in pool if alg in k.by_alg]
            if not candidates:
                if kid is None:
                    msg = f"issuer {name!r} has no key for algorithm {alg} (token has no kid)"
                else:
                    msg = f"issuer {name!r} has no key with kid {_show(kid)}"
                raise _fail("unknown_key", msg)
        # The header and claims were parsed once already (_parse); verify the signature with
        # PyJWT's algorithm objects directly rather than letting jwt.decode parse it all again.
        signing_input, _, encoded_sig = token.rpartition(".")
        try:
            signature = b64url_decode(encoded_sig)
        except ValueError as exc:
            raise _fail("token_malformed", "the token's signature is not base64url") from exc
        message = signing_input.encode("ascii")
        for jwk in candidates:
            if jwk.Algorithm.verify(message, jwk.key, signature):
                return
        if kid is not None and not by_kid:
            raise _fail(
                "unknown_key",
                f"issuer {name!r} has no key with kid {_show(kid)}, and none of its "
                f"{len(candidates)} key(s) without a published kid verifies the token",
            )
        raise _fail(
            "bad_signature",
            f"the token's {alg} signature does not verify with "
            + (f"key {_show(kid)}" if kid is not None else f"any of {len(candidates)} key(s)")
            + f" of issuer {name!r}",
        )

    def _check_claims(
        self, claims: Mapping[str, Any], issuer: _Issuer, audiences: Sequence[str] | None
    ) -> WorkloadIdentity:
        s = issuer.settings
        legacy = "kubernetes.io" not in claims and any(k.startswith(_LEGACY) for k in claims)
        if legacy and not s.allow_legacy_tokens:
            raise _fail(
                "legacy_token",
                "secret-based (legacy) service-account tokens are not accepted from issuer "
                f"{s.name!r}; use a projected token with an audience",
            )
        self._check_audience(claims, issuer, audiences, legacy)
        iat, exp = self._check_times(claims, s, legacy)
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise _fail("claims_missing", "the token has no sub (subject) claim")
        jti = claims.get("jti")
        if jti is not None and not isinstance(jti, str):
            raise _fail("token_malformed", "the token's jti claim is not a string")
        base: dict[str, Any] = {
            "issuer_name": s.name,
            "issuer": s.issuer,
            "kind": s.kind,
            "subject": sub,
            "jti": jti,
            "issued_at": iat,
            "expires_at": exp,
        }
        if legacy:
            ns = _text(claims, _LEGACY + "namespace")
            sa = _text(claims, _LEGACY + "service-account.name")
            uid = _text(claims, _LEGACY + "service-account.uid")
            _require_sub(sub, ns, sa, "the legacy namespace / service-account.name claims")
            return WorkloadIdentity(
                **base, namespace=ns, service_account=sa, service_account_uid=uid, legacy=True
            )
        if s.kind == "oidc":
            return WorkloadIdentity(**base)
        return WorkloadIdentity(**base, **_kubernetes_claims(sub, claims))

    def _check_audience(
        self,
        claims: Mapping[str, Any],
        issuer: _Issuer,
        audiences: Sequence[str] | None,
        legacy: bool,
    ) -> None:
        s = issuer.settings
        aud = claims.get("aud")
        if aud is None:
            if not legacy:
                raise _fail("claims_missing", "the token has no aud (audience) claim")
            if audiences is None:
                return  # legacy tokens carry no audience; allow_legacy_tokens accepts that
            raise _fail(
                "wrong_audience",
                f"a legacy token has no audience, so it is never valid for {_show(audiences)}",
            )
        token_auds = [aud] if isinstance(aud, str) else aud
        if not isinstance(token_auds, list) or not all(isinstance(a, str) for a in token_auds):
            raise _fail("token_malformed", "the token's aud claim is not a string or string list")
        api = [a for a in token_auds if a in issuer.api_server_audiences]
        if api and not s.allow_api_server_audience:
            raise _fail(
                "api_server_audience",
                f"the token is for the Kubernetes API server (aud {_show(api[0])}); request a "
                "token for this broker's audience (issuer "
                f"{s.name!r} has allow_api_server_audience off)",
            )
        accepted = set(s.audiences if audiences is None else audiences)
        if audiences is None and s.allow_api_server_audience:
            accepted |= issuer.api_server_audiences
        if not accepted.intersection(token_auds):
            raise _fail(
                "wrong_audience",
                f"the token's audience {_show(token_auds)} does not include "
                f"{' or '.join(map(repr, sorted(accepted)))}",
            )

    def _check_times(
        self, claims: Mapping[str, Any], s: IssuerSettings, legacy: bool
    ) -> tuple[float | None, float | None]:
        exp = _number(claims, "exp", required=not legacy)
        iat = _number(claims, "iat", required=not legacy)
        # Kubernetes always sets nbf; OIDC providers such as Google's leave it out.
        nbf = _number(claims, "nbf", required=not legacy and s.kind == "kubernetes")
        now = self._clock()
        if exp is not None and now > exp + LEEWAY_S:
            raise _fail(
                "token_expired",
                f"the token expired at {_when(exp)} ({now - exp:.0f} s ago)",
            )
        if nbf is not None and nbf > now + LEEWAY_S:
            raise _fail("token_not_yet_valid", f"the token is not valid before {_when(nbf)}")
        if iat is not None and iat > now + LEEWAY_S:
            raise _fail(
                "token_not_yet_valid", f"the token claims to be issued in the future ({_when(iat)})"
            )
        if exp is not None and iat is not None:
            if exp < iat:
                raise _fail("claims_inconsistent", "the token expires (exp) before its iat")
            if exp - iat > s.max_token_lifetime:
                raise _fail(
                    "lifetime_too_long",
                    f"the token's lifetime (exp - iat) of {exp - iat:.0f} s exceeds issuer "
                    f"{s.name!r}'s max_token_lifetime of {s.max_token_lifetime:.0f} s",
                )
        return iat, exp


def _parse(token: str) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """Header, claims (not yet verified) and whether there is a signature segment."""
    parts = token.split(".")
    if len(parts) != 3 or not token.isascii():
        raise _fail("token_malformed", "the subject token is not a JWT (header.payload.signature)")
    try:
        header = _b64json(parts[0])
        claims = _b64json(parts[1])
    except (ValueError, RecursionError) as exc:
        raise _fail(
            "token_malformed", "the subject token's header or payload is not base64url JSON"
        ) from exc
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise _fail("token_malformed", "the subject token's header or payload is not an object")
    return header, claims, bool(parts[2])


def _number(claims: Mapping[str, Any], name: str, *, required: bool) -> float | None:
    value = claims.get(name)
    if value is None:
        if required:
            raise _fail("claims_missing", f"the token has no {name} claim")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _fail("token_malformed", f"the token's {name} claim is not a number")
    return float(value)


def _text(obj: Mapping[str, Any], key: str) -> str | None:
    value = obj.get(key)
    return value if isinstance(value, str) and value else None


def _require_sub(sub: str, ns: str | None, sa: str | None, where: str) -> None:
    if ns is None or sa is None:
        raise _fail("claims_missing", f"the token lacks {where}")
    expected = f"system:serviceaccount:{ns}:{sa}"
    if sub != expected:
        raise _fail(
            "claims_inconsistent",
            f"the token's sub {_show(sub)} does not match its service account {expected!r}",
        )


def _kubernetes_claims(subject: str, claims: Mapping[str, Any]) -> dict[str, Any]:
    """The identity's fields from the ``kubernetes.io`` claim of a projected token."""
    k8s = claims.get("kubernetes.io")
    if k8s is None:
        raise _fail("claims_missing", "the token has no kubernetes.io claim")
    if not isinstance(k8s, dict):
        raise _fail("token_malformed", "the token's kubernetes.io claim is not an object")
    ns = _text(k8s, "namespace")
    if ns is None:
        raise _fail("claims_missing", "the token lacks kubernetes.io.namespace")
    sa_obj = k8s.get("serviceaccount")
    if not isinstance(sa_obj, dict):
        raise _fail("claims_missing", "the token lacks the kubernetes.io.serviceaccount object")
    sa, sa_uid = _text(sa_obj, "name"), _text(sa_obj, "uid")
    if sa is None or sa_uid is None:
        missing = "name" if sa is None else "uid"
        raise _fail("claims_missing", f"the token lacks kubernetes.io.serviceaccount.{missing}")
    _require_sub(subject, ns, sa, "kubernetes.io.namespace")
    # pod/node are there when the token is bound to one (not for TokenRequest on a bare SA).
    bound: dict[str, tuple[str, str | None]] = {}
    for kind in ("pod", "node"):
        obj = k8s.get(kind)
        if obj is None:
            continue
        name = _text(obj, "name") if isinstance(obj, dict) else None
        if name is None:
            raise _fail("token_malformed", f"the token's kubernetes.io.{kind} has no name")
        bound[kind] = (name, _text(obj, "uid"))
    pod, pod_uid = bound.get("pod", (None, None))
    node = bound["node"][0] if "node" in bound else None
    return {
        "namespace": ns,
        "service_account": sa,
        "service_account_uid": sa_uid,
        "pod": pod,
        "pod_uid": pod_uid,
        "node": node,
    }
