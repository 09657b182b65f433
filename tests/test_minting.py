"""Unit tests of broker.minting: retry/backoff/deadline and error mapping, with a fake client."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fakeredis
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.api_core import exceptions as api_exceptions
from google.auth import exceptions as auth_exceptions
from google.auth import identity_pool
from google.auth.credentials import AnonymousCredentials
from google.oauth2 import service_account

from broker.circuit import CircuitBreaker, CircuitPolicy
from broker.errors import TemporarilyUnavailable, UpstreamRefused
from broker.minting import (
    CLOUD_PLATFORM_SCOPE,
    IamCredentialsMinter,
    Minter,
    RetryPolicy,
    build_minter,
    load_credentials,
)
from broker.model import AccessToken, MintRequest
from broker.settings import GcpSettings

SA = "flux-source@test-project.iam.gserviceaccount.com"
CLOUD = "https://www.googleapis.com/auth/cloud-platform"
SECRET = "ya29.super-secret-token-value"
EXPIRES = datetime(2030, 1, 1, tzinfo=UTC)
REQ = MintRequest(SA, (CLOUD,), 1800, ("hop@test-project.iam.gserviceaccount.com",))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@dataclass
class FakeClient:
    """Plays IAMCredentialsClient.generate_access_token: scripted outcomes, one per call."""

    clock: FakeClock
    outcomes: list[Any] = field(default_factory=list)
    attempt_cost: float = 0.0  # fake seconds each call takes
    calls: list[dict[str, Any]] = field(default_factory=list)

    def generate_access_token(self, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        self.clock.now += self.attempt_cost
        outcome = (
            self.outcomes.pop(0)
            if self.outcomes
            else SimpleNamespace(access_token=SECRET, expire_time=EXPIRES)
        )
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def make(
    outcomes: list[Any] | None = None,
    *,
    policy: RetryPolicy | None = None,
    attempt_cost: float = 0.0,
    rand: Callable[[], float] = lambda: 1.0,
) -> tuple[IamCredentialsMinter, FakeClient, FakeClock]:
    clock = FakeClock()
    client = FakeClient(clock, list(outcomes or []), attempt_cost)
    minter = IamCredentialsMinter(
        "http://127.0.0.1:1",
        "anonymous",
        policy=policy,
        client_factory=lambda: client,
        sleep=clock.sleep,
        clock=clock,
        rand=rand,
    )
    return minter, client, clock


def ok() -> Any:
    return SimpleNamespace(access_token=SECRET, expire_time=EXPIRES)


def test_is_a_minter() -> None:
    minter: Minter = make()[0]
    assert isinstance(minter.mint(REQ), AccessToken)


def test_success_maps_request_and_response() -> None:
    minter, client, _ = make()
    token = minter.mint(REQ)
    assert token.token == SECRET
    assert token.expires_at == EXPIRES.timestamp()
    assert SECRET not in repr(token)
    (call,) = client.calls
    assert call["name"] == f"projects/-/serviceAccounts/{SA}"
    assert call["scope"] == [CLOUD]
    assert call["lifetime"] == timedelta(seconds=1800)
    # bare emails become resource names; the client's own retry is off
    assert call["delegates"] == [
        "projects/-/serviceAccounts/hop@test-project.iam.gserviceaccount.com"
    ]
    assert call["retry"] is None
    assert call["timeout"] == 5.0


def test_delegate_resource_names_pass_through() -> None:
    minter, client, _ = make()
    minter.mint(MintRequest(SA, (CLOUD,), 600, ("projects/-/serviceAccounts/123",)))
    assert client.calls[0]["delegates"] == ["projects/-/serviceAccounts/123"]


@pytest.mark.parametrize(
    "exc",
    [
        api_exceptions.TooManyRequests("quota"),
        api_exceptions.InternalServerError("boom"),
        api_exceptions.BadGateway("gfe"),
        api_exceptions.ServiceUnavailable("down"),
        api_exceptions.GatewayTimeout("slow"),
        api_exceptions.DeadlineExceeded("slow"),
        requests.ConnectionError("refused"),
        requests.ReadTimeout("read timed out"),
        requests.ConnectTimeout("connect timed out"),
        auth_exceptions.TransportError("metadata server unreachable"),
        auth_exceptions.RefreshError("try again", retryable=True),
    ],
)
def test_transient_errors_are_retried(exc: Exception) -> None:
    minter, client, clock = make([exc, exc])
    assert minter.mint(REQ).token == SECRET
    assert len(client.calls) == 3
    assert len(clock.sleeps) == 2


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (api_exceptions.BadRequest("bad lifetime"), "400"),
        (api_exceptions.Unauthorized("who"), "401"),
        (api_exceptions.Forbidden("Permission iam.serviceAccounts.getAccessToken denied"), "403"),
        (api_exceptions.NotFound("no such sa"), "404"),
        (api_exceptions.Conflict("odd"), "409"),
    ],
)
def test_permanent_errors_are_refused_at_once(exc: Exception, code: str) -> None:
    minter, client, clock = make([exc])
    with pytest.raises(UpstreamRefused) as info:
        minter.mint(REQ)
    err = info.value
    assert err.reason == "iam_refused"
    assert SA in err.description and f"HTTP {code}" in err.description
    assert err.__cause__ is exc
    assert len(client.calls) == 1
    assert clock.sleeps == []


def test_403_names_permission_denied() -> None:
    minter, _, _ = make([api_exceptions.Forbidden("denied")])
    with pytest.raises(UpstreamRefused, match="PERMISSION_DENIED"):
        minter.mint(REQ)


def test_non_retryable_refresh_error_is_a_credentials_refusal() -> None:
    exc = auth_exceptions.RefreshError("invalid_grant", retryable=False)
    minter, client, _ = make([exc])
    with pytest.raises(UpstreamRefused) as info:
        minter.mint(REQ)
    assert info.value.reason == "iam_credentials"
    assert info.value.__cause__ is exc
    assert len(client.calls) == 1


def test_persistent_failure_spends_the_deadline_then_503() -> None:
    policy = RetryPolicy(deadline_s=10.0, attempt_timeout_s=5.0, base_s=0.1, cap_s=2.0)
    unavailable = api_exceptions.ServiceUnavailable("down")
    minter, client, clock = make([unavailable] * 100, policy=policy)
    start = clock.now
    with pytest.raises(TemporarilyUnavailable) as info:
        minter.mint(REQ)
    err = info.value
    assert err.reason == "iam_unavailable"
    assert isinstance(err.retry_after, int) and err.retry_after >= 1
    assert err.__cause__ is unavailable
    assert SA in err.description and "HTTP 503" in err.description
    # rand() == 1.0 → sleeps are the full ceilings: 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, ...
    assert clock.sleeps[:7] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0])
    assert max(clock.sleeps) == 2.0
    # never sleeps past the deadline, and gives up rather than sleeping into it
    assert clock.now - start <= policy.deadline_s
    assert len(client.calls) == len(clock.sleeps) + 1


def test_full_jitter_scales_backoff() -> None:
    minter, _, clock = make([api_exceptions.ServiceUnavailable("x")] * 3, rand=lambda: 0.5)
    minter.mint(REQ)
    assert clock.sleeps == pytest.approx([0.05, 0.1, 0.2])


def test_backoff_is_capped() -> None:
    policy = RetryPolicy(base_s=1.0, cap_s=3.0)
    assert [policy.backoff(n, 1.0) for n in range(4)] == [1.0, 2.0, 3.0, 3.0]
    assert policy.backoff(10, 0.0) == 0.0


def test_attempt_timeout_shrinks_to_the_remaining_deadline() -> None:
    policy = RetryPolicy(deadline_s=7.0, attempt_timeout_s=5.0, base_s=0.5, cap_s=0.5)
    minter, client, _ = make(
        [api_exceptions.ServiceUnavailable("x")] * 2, policy=policy, attempt_cost=5.0
    )
    with pytest.raises(TemporarilyUnavailable):
        minter.mint(REQ)
    # first attempt 5 s (limit 5), sleep 0.5, then only 1.5 s of the 7 s are left
    assert [c["timeout"] for c in client.calls] == pytest.approx([5.0, 1.5])


def test_slow_attempts_bound_the_number_of_calls() -> None:
    policy = RetryPolicy(deadline_s=10.0, attempt_timeout_s=5.0, base_s=0.1, cap_s=0.1)
    minter, client, _ = make([requests.ReadTimeout("t")] * 10, policy=policy, attempt_cost=5.0)
    with pytest.raises(TemporarilyUnavailable) as info:
        minter.mint(REQ)
    assert len(client.calls) == 2
    assert "ReadTimeout" in info.value.description


def test_success_after_retries_within_deadline() -> None:
    minter, client, _ = make([api_exceptions.TooManyRequests("q"), ok()])
    assert minter.mint(REQ).token == SECRET
    assert len(client.calls) == 2


def test_no_token_in_any_message(caplog: pytest.LogCaptureFixture) -> None:
    leaky = [
        api_exceptions.ServiceUnavailable(f"upstream echoed Bearer {SECRET}"),
        api_exceptions.Forbidden(f"denied for {SECRET}"),
    ]
    minter, _, _ = make(leaky)
    with caplog.at_level("DEBUG"), pytest.raises(UpstreamRefused) as info:
        minter.mint(REQ)
    assert SECRET not in info.value.description and SECRET not in str(info.value)
    assert SECRET not in caplog.text
    assert "super-secret" not in caplog.text
    assert caplog.records  # the failures were logged (scrubbed)

    minter, _, _ = make([api_exceptions.ServiceUnavailable(f"x {SECRET}")] * 100)
    with pytest.raises(TemporarilyUnavailable) as info2:
        minter.mint(REQ)
    assert SECRET not in str(info2.value)
    assert "super-secret" not in repr(minter)


def test_empty_upstream_answer_is_refused() -> None:
    minter, _, _ = make([SimpleNamespace(access_token="", expire_time=EXPIRES)])
    with pytest.raises(UpstreamRefused):
        minter.mint(REQ)


def test_client_built_lazily_once_even_under_concurrency() -> None:
    built: list[int] = []
    clock = FakeClock()
    client = FakeClient(clock)
    gate = threading.Event()

    def factory() -> FakeClient:
        gate.wait(5)
        built.append(1)
        return client

    minter = IamCredentialsMinter(
        "http://127.0.0.1:1", "anonymous", client_factory=factory, sleep=clock.sleep, clock=clock
    )
    assert built == []  # nothing at construction
    threads = [threading.Thread(target=minter.mint, args=(REQ,)) for _ in range(8)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join(10)
    assert built == [1]
    assert len(client.calls) == 8


def test_credential_load_failure_is_refused_and_retried_on_next_mint() -> None:
    attempts: list[int] = []
    clock = FakeClock()

    def factory() -> FakeClient:
        attempts.append(1)
        if len(attempts) == 1:
            raise auth_exceptions.DefaultCredentialsError("no ADC found")
        return FakeClient(clock)

    minter = IamCredentialsMinter(
        "https://iamcredentials.googleapis.com", "adc", client_factory=factory, clock=clock
    )
    with pytest.raises(UpstreamRefused) as info:
        minter.mint(REQ)
    assert info.value.reason == "iam_credentials"
    assert isinstance(info.value.__cause__, auth_exceptions.DefaultCredentialsError)
    assert minter.mint(REQ).token == SECRET
    assert len(attempts) == 2


def test_missing_key_file_is_refused(tmp_path: Path) -> None:
    minter = IamCredentialsMinter(
        "https://iamcredentials.googleapis.com", str(tmp_path / "missing.json")
    )
    with pytest.raises(UpstreamRefused) as info:
        minter.mint(REQ)
    assert info.value.reason == "iam_credentials"


def test_build_minter_reads_settings() -> None:
    gcp = GcpSettings(
        iam_endpoint="http://127.0.0.1:8085/",
        credentials="anonymous",
        allowed_service_accounts=("*@test-project.iam.gserviceaccount.com",),
    )
    minter = build_minter(gcp)
    assert isinstance(minter, IamCredentialsMinter)
    assert minter.endpoint == "http://127.0.0.1:8085"
    assert minter.policy == RetryPolicy()
    assert minter.policy.deadline_s == 10.0 and minter.policy.attempt_timeout_s == 5.0
    assert (minter.policy.base_s, minter.policy.cap_s) == (0.1, 2.0)


# -- credentials ----------------------------------------------------------------------------------


def _service_account_key(tmp_path: Path) -> Path:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    path = tmp_path / "key.json"
    path.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "test-project",
                "private_key_id": "abc",
                "private_key": pem,
                "client_email": "broker@test-project.iam.gserviceaccount.com",
                "client_id": "1",
                "token_uri": "https://oauth2.googleapis.com/token",
            }
        )
    )
    return path


def test_load_service_account_key(tmp_path: Path) -> None:
    creds = load_credentials(str(_service_account_key(tmp_path)))
    assert isinstance(creds, service_account.Credentials)
    assert creds.service_account_email == "broker@test-project.iam.gserviceaccount.com"
    assert creds.scopes == [CLOUD_PLATFORM_SCOPE]


def test_load_external_account_config(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("jwt")
    path = tmp_path / "wif.json"
    path.write_text(
        json.dumps(
            {
                "type": "external_account",
                "audience": "//iam.googleapis.com/projects/1/locations/global/"
                "workloadIdentityPools/p/providers/k",
                "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
                "token_url": "https://sts.googleapis.com/v1/token",
                "credential_source": {"file": str(token_file)},
            }
        )
    )
    creds = load_credentials(str(path))
    assert isinstance(creds, identity_pool.Credentials)
    assert creds.scopes == [CLOUD_PLATFORM_SCOPE]


def test_load_anonymous() -> None:
    assert isinstance(load_credentials("anonymous"), AnonymousCredentials)


def test_unsupported_credential_type_is_refused_on_mint(tmp_path: Path) -> None:
    path = tmp_path / "user.json"
    path.write_text(json.dumps({"type": "authorized_user", "refresh_token": "r"}))
    with pytest.raises(ValueError, match="authorized_user"):
        load_credentials(str(path))
    minter = IamCredentialsMinter("https://iamcredentials.googleapis.com", str(path))
    with pytest.raises(UpstreamRefused) as info:
        minter.mint(REQ)
    assert info.value.reason == "iam_credentials"
    assert "refresh_token" not in info.value.description and '"r"' not in info.value.description


# -- circuit breaker --------------------------------------------------------------------------

CIRCUIT = CircuitPolicy(failure_threshold=3, cool_down_s=5.0, max_cool_down_s=40.0)


def make_with_circuit(
    outcomes: list[Any], r: Any, clock: FakeClock | None = None
) -> tuple[IamCredentialsMinter, FakeClient, FakeClock]:
    clock = clock or FakeClock()
    client = FakeClient(clock, list(outcomes))
    minter = IamCredentialsMinter(
        "http://127.0.0.1:1",
        "anonymous",
        client_factory=lambda: client,
        sleep=clock.sleep,
        clock=clock,
        rand=lambda: 1.0,
        circuit=CircuitBreaker(r, prefix="t:", policy=CIRCUIT, clock=clock),
    )
    return minter, client, clock


def test_open_circuit_stops_retrying_and_then_stops_calling() -> None:
    r = fakeredis.FakeRedis()
    down = api_exceptions.ServiceUnavailable("down")
    minter, client, clock = make_with_circuit([down] * 100, r)
    with pytest.raises(TemporarilyUnavailable) as info:
        minter.mint(REQ)
    # three failures open it; the fourth attempt is refused before reaching IAM
    assert len(client.calls) == 3
    assert info.value.reason == "iam_circuit_open"
    assert info.value.__cause__ is down
    assert "3 failed attempt(s)" in info.value.description
    with pytest.raises(TemporarilyUnavailable) as again:
        minter.mint(REQ)
    assert len(client.calls) == 3  # no call at all while open
    assert again.value.reason == "iam_circuit_open"
    assert 1 <= again.value.retry_after <= 5


def test_other_replicas_see_the_open_circuit() -> None:
    r = fakeredis.FakeRedis()
    clock = FakeClock()
    a, a_client, _ = make_with_circuit([api_exceptions.ServiceUnavailable("x")] * 10, r, clock)
    b, b_client, _ = make_with_circuit([], r, clock)
    with pytest.raises(TemporarilyUnavailable):
        a.mint(REQ)
    with pytest.raises(TemporarilyUnavailable):
        b.mint(REQ)
    assert (len(a_client.calls), len(b_client.calls)) == (3, 0)


def test_probe_after_cool_down_closes_the_circuit_on_success() -> None:
    r = fakeredis.FakeRedis()
    minter, client, clock = make_with_circuit([api_exceptions.ServiceUnavailable("x")] * 3, r)
    with pytest.raises(TemporarilyUnavailable):
        minter.mint(REQ)
    clock.now += 5.0  # the cool-down is over: the next attempt is the probe, and IAM is back
    assert minter.mint(REQ).token == SECRET
    assert minter.circuit is not None and minter.circuit.snapshot().state == "closed"
    assert minter.mint(REQ).token == SECRET
    assert len(client.calls) == 5


def test_failed_probe_reopens_without_retrying() -> None:
    r = fakeredis.FakeRedis()
    minter, client, clock = make_with_circuit([api_exceptions.ServiceUnavailable("x")] * 10, r)
    with pytest.raises(TemporarilyUnavailable):
        minter.mint(REQ)
    clock.now += 5.0
    with pytest.raises(TemporarilyUnavailable) as info:
        minter.mint(REQ)
    assert len(client.calls) == 4  # exactly one probe
    assert info.value.reason == "iam_circuit_open"
    assert info.value.retry_after == 10  # the doubled cool-down


@pytest.mark.parametrize(
    ("outcome", "state"),
    [
        (api_exceptions.Forbidden("denied"), "closed"),  # IAM answered: it is up
        (auth_exceptions.RefreshError("invalid_grant", retryable=False), "half_open"),
    ],
)
def test_probe_refused_permanently(outcome: Exception, state: str) -> None:
    r = fakeredis.FakeRedis()
    minter, client, clock = make_with_circuit(
        [api_exceptions.ServiceUnavailable("x")] * 3 + [outcome], r
    )
    with pytest.raises(TemporarilyUnavailable):
        minter.mint(REQ)
    clock.now += 5.0
    with pytest.raises(UpstreamRefused):
        minter.mint(REQ)
    assert minter.circuit is not None
    assert minter.circuit.snapshot().state == state
    assert r.exists("t:{circuit:iam}:probe") == 0  # the probe slot is free either way


def test_unexpected_error_frees_the_probe() -> None:
    r = fakeredis.FakeRedis()
    minter, _, clock = make_with_circuit(
        [api_exceptions.ServiceUnavailable("x")] * 3 + [KeyError("bug")], r
    )
    with pytest.raises(TemporarilyUnavailable):
        minter.mint(REQ)
    clock.now += 5.0
    with pytest.raises(KeyError):
        minter.mint(REQ)
    assert r.exists("t:{circuit:iam}:probe") == 0


def test_build_minter_takes_a_circuit() -> None:
    gcp = GcpSettings(
        iam_endpoint="http://127.0.0.1:8085",
        credentials="anonymous",
        allowed_service_accounts=("*@p.iam.gserviceaccount.com",),
    )
    circuit = CircuitBreaker(fakeredis.FakeRedis())
    assert build_minter(gcp, circuit=circuit).circuit is circuit
    assert build_minter(gcp).circuit is None
