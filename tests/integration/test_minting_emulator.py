"""The real google-cloud-iam client (IamCredentialsMinter) against the emulator over HTTP."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import requests

from broker.emulator import TOKEN_PREFIX, EmulatorServer, start_emulator
from broker.errors import TemporarilyUnavailable, UpstreamRefused
from broker.minting import IamCredentialsMinter, RetryPolicy
from broker.model import MintRequest

pytestmark = pytest.mark.integration

SA = "flux-source@test-project.iam.gserviceaccount.com"
HOP = "hop@test-project.iam.gserviceaccount.com"
SCOPES = (
    "https://www.googleapis.com/auth/cloud-platform",
    "https://www.googleapis.com/auth/userinfo.email",
)
REQ = MintRequest(SA, SCOPES, 1200, (HOP,))
FAST = RetryPolicy(deadline_s=2.0, attempt_timeout_s=1.0, base_s=0.01, cap_s=0.05)


@pytest.fixture(scope="module")
def emulator() -> Iterator[EmulatorServer]:
    server = start_emulator("127.0.0.1", 0)
    yield server
    server.shutdown()


@pytest.fixture
def emu(emulator: EmulatorServer) -> Iterator[EmulatorServer]:
    requests.post(f"{emulator.url}/emulator/reset", timeout=5).raise_for_status()
    yield emulator
    requests.post(f"{emulator.url}/emulator/reset", timeout=5).raise_for_status()


def faults(emu: EmulatorServer, **body: Any) -> None:
    requests.post(f"{emu.url}/emulator/faults", json=body, timeout=5).raise_for_status()


def calls(emu: EmulatorServer) -> int:
    return int(requests.get(f"{emu.url}/emulator/stats", timeout=5).json()["generateAccessToken"])


class SleepLog:
    def __init__(self) -> None:
        self.sleeps: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        time.sleep(seconds)


def minter(emu: EmulatorServer, policy: RetryPolicy = FAST, **kw: Any) -> IamCredentialsMinter:
    return IamCredentialsMinter(emu.url, "anonymous", policy=policy, **kw)


def test_emulator_server_basics(emu: EmulatorServer) -> None:
    assert emu.port > 0
    assert emu.url == f"http://127.0.0.1:{emu.port}"


def test_mint_over_http(emu: EmulatorServer) -> None:
    before = time.time()
    token = minter(emu).mint(REQ)
    assert token.token.startswith(TOKEN_PREFIX)
    info = requests.get(f"{emu.url}/emulator/tokens/{token.token}", timeout=5).json()
    assert info["service_account"] == SA
    assert info["scopes"] == list(SCOPES)
    assert info["delegates"] == [f"projects/-/serviceAccounts/{HOP}"]
    expire = datetime.strptime(info["expire_time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert token.expires_at == expire.timestamp()
    # the requested 1200 s lifetime reached the emulator (whole seconds, so allow the truncation)
    assert before + 1200 - 2 <= token.expires_at <= time.time() + 1200
    assert calls(emu) == 1


def test_nothing_connects_before_first_mint(emu: EmulatorServer) -> None:
    m = minter(emu)
    assert calls(emu) == 0
    m.mint(REQ)
    m.mint(REQ)
    assert calls(emu) == 2


def test_transient_503_is_retried(emu: EmulatorServer) -> None:
    faults(emu, fail_next=2, status=503)
    sleep = SleepLog()
    token = minter(emu, sleep=sleep).mint(REQ)
    assert token.token.startswith(TOKEN_PREFIX)
    assert calls(emu) == 3
    assert len(sleep.sleeps) == 2


def test_429_is_retried(emu: EmulatorServer) -> None:
    faults(emu, fail_next=1, status=429)
    assert minter(emu).mint(REQ).token.startswith(TOKEN_PREFIX)
    assert calls(emu) == 2


def test_persistent_503_gives_temporarily_unavailable(emu: EmulatorServer) -> None:
    # every call takes >= 200 ms, so a 1 s deadline leaves room for at most 5-6 attempts
    faults(emu, fail_next=10_000, status=503, latency_ms=200)
    sleep = SleepLog()
    policy = RetryPolicy(deadline_s=1.0, attempt_timeout_s=1.0, base_s=0.01, cap_s=0.05)
    with pytest.raises(TemporarilyUnavailable) as info:
        minter(emu, policy, sleep=sleep).mint(REQ)
    err = info.value
    assert err.reason == "iam_unavailable"
    assert isinstance(err.retry_after, int) and err.retry_after >= 1
    # the last attempt may be cut short by the deadline, so the final cause is 503 or a timeout
    assert SA in err.description and ("503" in err.description or "Timeout" in err.description)
    n = calls(emu)
    assert 2 <= n <= 6
    assert n == len(sleep.sleeps) + 1


def test_403_is_refused_without_retry(emu: EmulatorServer) -> None:
    faults(emu, fail_next=5, status=403)
    with pytest.raises(UpstreamRefused) as info:
        minter(emu).mint(REQ)
    err = info.value
    assert err.reason == "iam_refused"
    assert SA in err.description and "403" in err.description
    assert calls(emu) == 1


def test_invalid_request_is_refused(emu: EmulatorServer) -> None:
    # 43201 s is over the API's maximum: Google (and the emulator) answer 400
    with pytest.raises(UpstreamRefused, match="400"):
        minter(emu).mint(MintRequest(SA, SCOPES, 43201))
    assert calls(emu) == 1


def test_slow_upstream_times_out_and_is_unavailable(emu: EmulatorServer) -> None:
    faults(emu, latency_ms=800)
    policy = RetryPolicy(deadline_s=0.5, attempt_timeout_s=0.2, base_s=0.01, cap_s=0.05)
    with pytest.raises(TemporarilyUnavailable, match="Timeout"):
        minter(emu, policy).mint(REQ)
    assert calls(emu) >= 1


def test_unreachable_endpoint_is_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    policy = RetryPolicy(deadline_s=0.3, attempt_timeout_s=0.2, base_s=0.01, cap_s=0.05)
    m = IamCredentialsMinter(f"http://127.0.0.1:{port}", "anonymous", policy=policy)
    with pytest.raises(TemporarilyUnavailable) as info:
        m.mint(REQ)
    assert info.value.reason == "iam_unavailable"
    assert isinstance(info.value.__cause__, requests.ConnectionError)


def test_one_minter_shared_by_threads(emu: EmulatorServer) -> None:
    m = minter(emu)
    tokens: list[str] = []
    lock = threading.Lock()

    def work() -> None:
        t = m.mint(REQ).token
        with lock:
            tokens.append(t)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(set(tokens)) == 8
    assert calls(emu) == 8
