"""Minting GCP access tokens through the IAM Credentials API (DESIGN.md §6).

:class:`Minter` is what the cache calls; :class:`IamCredentialsMinter` implements it with the
``google-cloud-iam`` client over its REST transport, so one code path serves Google
(``https://iamcredentials.googleapis.com``) and the local emulator (``http://127.0.0.1:PORT``).

Upstream errors become ours:

* transient (HTTP 429, 500, 502, 503, 504, deadline, connection/timeout errors) are retried with
  capped exponential backoff and full jitter inside a total deadline; when it is spent →
  :class:`~broker.errors.TemporarilyUnavailable` (``reason="iam_unavailable"``, ``retry_after``);
* permanent (400, 401, 403, 404 and any other refusal) →
  :class:`~broker.errors.UpstreamRefused` (``reason="iam_refused"``) at once, naming the service
  account and the upstream status;
* GCP credentials that cannot be loaded or refreshed for good → ``UpstreamRefused`` with
  ``reason="iam_credentials"``.

A :class:`~broker.circuit.CircuitBreaker`, when given, is asked before every attempt and told
every outcome: while IAM is down (the circuit is open) the minter stops at once with
``TemporarilyUnavailable`` (``reason="iam_circuit_open"``) instead of spending its deadline, and
only the circuit's single probe reaches IAM until it answers again.

The retry loop is hand-written rather than ``google.api_core.retry.Retry``: that helper reads
``time.monotonic``/``time.sleep``/``random`` directly (tests could not drive it without patching
globals) and does not shrink the per-attempt timeout to what is left of the total deadline. The
client's own default retry (60 s deadline) is switched off with ``retry=None``.
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, Protocol

import google.auth
import requests
from google.api_core import exceptions as api_exceptions
from google.api_core.client_options import ClientOptions
from google.auth import aws, identity_pool, pluggable
from google.auth import exceptions as auth_exceptions
from google.auth.credentials import AnonymousCredentials
from google.cloud.iam_credentials_v1 import IAMCredentialsClient
from google.oauth2 import service_account

from broker.circuit import CircuitBreaker, Permit
from broker.errors import TemporarilyUnavailable, UpstreamRefused
from broker.model import AccessToken, MintRequest
from broker.settings import GcpSettings

log = logging.getLogger(__name__)

CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})
_TRANSIENT_NETWORK = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    auth_exceptions.TransportError,
)
# HTTP status → google.rpc.Code name, for messages.
_GOOGLE_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    502: "BAD_GATEWAY",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
# Belt and braces for log lines built from library messages: no bearer or access token leaks.
_SECRETISH = re.compile(r"(ya29\.[\w.\-]+|Bearer\s+\S+)", re.IGNORECASE)


class Minter(Protocol):
    """Mints one access token for a :class:`MintRequest`; raises :mod:`broker.errors` only."""

    def mint(self, request: MintRequest) -> AccessToken:
        """Return a fresh token, or raise TemporarilyUnavailable / UpstreamRefused."""
        ...


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How long and how often to retry transient IAM failures."""

    deadline_s: float = 10.0  # total, all attempts and sleeps included
    attempt_timeout_s: float = 5.0  # per HTTP attempt, shrunk to what is left of the deadline
    base_s: float = 0.1  # first backoff ceiling; doubles each retry
    cap_s: float = 2.0  # backoff ceiling never exceeds this
    retry_after_s: int = 2  # what callers are told when the deadline is spent

    def backoff(self, retry: int, rand: float) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2**retry)); ``rand`` in [0, 1)."""
        return rand * min(self.cap_s, self.base_s * (2.0**retry))


class _Transient(Exception):
    """Internal: an attempt failed in a way worth retrying; ``what`` is safe to show."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


def _scrub(text: str) -> str:
    return _SECRETISH.sub("[redacted]", text)[:300]


def _status_of(exc: api_exceptions.GoogleAPICallError) -> str:
    code = exc.code
    if not isinstance(code, int):
        return type(exc).__name__
    name = _GOOGLE_STATUS.get(code)
    return f"HTTP {code} {name}" if name else f"HTTP {code}"


def _delegate_name(delegate: str) -> str:
    return (
        delegate if delegate.startswith("projects/") else f"projects/-/serviceAccounts/{delegate}"
    )


_AWS_SUBJECT_TOKEN_TYPE = "urn:ietf:params:aws:token-type:aws4_request"  # noqa: S105 - a URN


def load_credentials(spec: str) -> Any:
    """``adc`` | ``anonymous`` | a key/credential file path → google-auth credentials.

    Files are loaded with the loader of their declared ``type`` (``service_account`` or
    ``external_account``), as google-auth recommends instead of the deprecated generic
    ``load_credentials_from_file``, which would also accept other types and look up a project
    over the network.
    """
    scopes = [CLOUD_PLATFORM_SCOPE]
    if spec == "anonymous":
        return AnonymousCredentials()  # type: ignore[no-untyped-call]  # google-auth stub gap
    if spec == "adc":
        credentials, _ = google.auth.default(scopes=scopes)
        return credentials
    with open(spec, encoding="utf-8") as f:
        info = json.load(f)
    kind = info.get("type") if isinstance(info, dict) else None
    if kind == "service_account":
        return service_account.Credentials.from_service_account_info(info, scopes=scopes)  # type: ignore[no-untyped-call]
    if kind == "external_account":
        # The same class choice google-auth makes for workload identity federation configs.
        source = info.get("credential_source")
        if info.get("subject_token_type") == _AWS_SUBJECT_TOKEN_TYPE:
            return aws.Credentials.from_info(info, scopes=scopes)  # type: ignore[no-untyped-call]
        if isinstance(source, dict) and source.get("executable") is not None:
            return pluggable.Credentials.from_info(info, scopes=scopes)  # type: ignore[no-untyped-call]
        return identity_pool.Credentials.from_info(info, scopes=scopes)  # type: ignore[no-untyped-call]
    raise ValueError(
        f"{spec}: credential type {kind!r} is not supported "
        "(use a service_account key or an external_account config)"
    )


class IamCredentialsMinter:
    """:class:`Minter` over the IAM Credentials REST API. Thread-safe; connects on first mint."""

    def __init__(
        self,
        endpoint: str,
        credentials: str = "adc",
        *,
        policy: RetryPolicy | None = None,
        client_factory: Callable[[], Any] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
        circuit: CircuitBreaker | None = None,
    ) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.circuit = circuit
        self._credentials_spec = credentials
        self.policy = policy or RetryPolicy()
        self._client_factory = client_factory or self._build_client
        self._sleep = sleep
        self._clock = clock
        self._rand = rand
        self._client: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"IamCredentialsMinter(endpoint={self.endpoint!r})"

    def _build_client(self) -> IAMCredentialsClient:
        # A full URL as api_endpoint keeps its scheme in the REST transport, so http:// works
        # for the loopback emulator and https:// for Google.
        return IAMCredentialsClient(
            credentials=load_credentials(self._credentials_spec),
            transport="rest",
            client_options=ClientOptions(api_endpoint=self.endpoint),
        )

    def _get_client(self, service_account: str) -> Any:
        client = self._client
        if client is not None:
            return client
        with self._lock:
            if self._client is None:
                try:
                    self._client = self._client_factory()
                except (auth_exceptions.GoogleAuthError, OSError, ValueError) as exc:
                    log.error("cannot load GCP credentials: %s", _scrub(str(exc)))
                    raise UpstreamRefused(
                        f"cannot mint a token for {service_account}: the broker's GCP "
                        f"credentials ({type(exc).__name__}) could not be loaded",
                        reason="iam_credentials",
                    ) from exc
            return self._client

    def mint(self, request: MintRequest) -> AccessToken:
        """Mint a token for ``request``, retrying transient failures within the deadline."""
        sa = request.service_account
        policy = self.policy
        deadline = self._clock() + policy.deadline_s
        client = self._get_client(sa)
        attempts = 0
        last = "no attempt within the deadline"
        cause: BaseException | None = None
        while True:
            remaining = deadline - self._clock()
            if remaining <= 0:
                break
            permit = self._permit(attempts, last, cause)
            attempts += 1
            try:
                token = self._attempt(client, request, min(policy.attempt_timeout_s, remaining))
            except _Transient as exc:
                last, cause = exc.what, exc.__cause__
                self._outcome(permit, "failure")
            except UpstreamRefused as exc:
                # IAM answered (a refusal is an answer); our own credentials failing says
                # nothing about IAM.
                self._outcome(permit, "release" if exc.reason == "iam_credentials" else "success")
                raise
            except BaseException:
                self._outcome(permit, "release")
                raise
            else:
                self._outcome(permit, "success")
                return token
            delay = policy.backoff(attempts - 1, self._rand())
            give_up = self._clock() + delay >= deadline
            log.warning(
                "IAM generateAccessToken for %s failed (attempt %d, %s); %s",
                sa,
                attempts,
                last,
                "giving up" if give_up else f"retrying in {delay:.3f}s",
            )
            if give_up:
                break
            self._sleep(delay)
        raise TemporarilyUnavailable(
            f"IAM Credentials could not mint a token for {sa}: {last} "
            f"({attempts} attempt{'' if attempts == 1 else 's'} in "
            f"{policy.deadline_s:g}s); retry later",
            reason="iam_unavailable",
            retry_after=max(1, policy.retry_after_s),
        ) from cause

    def _permit(self, attempts: int, last: str, cause: BaseException | None) -> Permit | None:
        """Ask the circuit for one attempt; while it is open, stop here (no IAM call)."""
        if self.circuit is None:
            return None
        try:
            return self.circuit.before_call()
        except TemporarilyUnavailable as exc:
            if attempts:
                exc.description = f"{exc.description} (after {attempts} failed attempt(s): {last})"
                raise exc from cause
            raise

    def _outcome(
        self, permit: Permit | None, outcome: Literal["success", "failure", "release"]
    ) -> None:
        if self.circuit is None or permit is None:
            return
        if outcome == "success":
            self.circuit.record_success(permit)
        elif outcome == "failure":
            self.circuit.record_failure(permit)
        else:
            self.circuit.release(permit)

    def _attempt(self, client: Any, request: MintRequest, timeout: float) -> AccessToken:
        sa = request.service_account
        try:
            response = client.generate_access_token(
                name=f"projects/-/serviceAccounts/{sa}",
                scope=list(request.scopes),
                lifetime=timedelta(seconds=request.lifetime_s),
                delegates=[_delegate_name(d) for d in request.delegates],
                retry=None,  # ours, not the client's 60 s default
                timeout=timeout,
            )
        except api_exceptions.GoogleAPICallError as exc:
            status = _status_of(exc)
            if exc.code in TRANSIENT_STATUSES or isinstance(exc, api_exceptions.DeadlineExceeded):
                raise _Transient(status) from exc
            log.error("IAM refused a token for %s: %s: %s", sa, status, _scrub(str(exc.message)))
            raise UpstreamRefused(
                f"IAM Credentials refused to mint a token for {sa}: {status}",
                reason="iam_refused",
            ) from exc
        except _TRANSIENT_NETWORK as exc:
            raise _Transient(f"{type(exc).__name__} reaching {self.endpoint}") from exc
        except auth_exceptions.RefreshError as exc:
            if exc.retryable:
                raise _Transient("credential refresh failed (retryable)") from exc
            log.error("GCP credential refresh failed: %s", _scrub(str(exc)))
            raise UpstreamRefused(
                f"cannot mint a token for {sa}: the broker's GCP credentials were refused",
                reason="iam_credentials",
            ) from exc
        except auth_exceptions.GoogleAuthError as exc:
            log.error("GCP credentials failed: %s", _scrub(str(exc)))
            raise UpstreamRefused(
                f"cannot mint a token for {sa}: the broker's GCP credentials failed "
                f"({type(exc).__name__})",
                reason="iam_credentials",
            ) from exc
        token = getattr(response, "access_token", "")
        expire_time = getattr(response, "expire_time", None)
        if not token or expire_time is None:
            raise UpstreamRefused(
                f"IAM Credentials returned no token for {sa}", reason="iam_refused"
            )
        return AccessToken(token=token, expires_at=expire_time.timestamp())


def build_minter(
    gcp: GcpSettings, *, circuit: CircuitBreaker | None = None
) -> IamCredentialsMinter:
    """The production minter for ``gcp.iam_endpoint`` with ``gcp.credentials``."""
    return IamCredentialsMinter(gcp.iam_endpoint, gcp.credentials, circuit=circuit)
