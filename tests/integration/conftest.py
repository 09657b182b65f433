"""Real processes for integration tests: Redis, the IAM emulator, the broker under gunicorn."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from tests.support import AUDIT_SIGNING_KEY, CACHE_KEY, REPO, free_port

REDIS_URL = os.environ.get("TB_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")


@pytest.fixture(scope="session")
def redis_url() -> str:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.RedisError:
        if os.environ.get("TB_REQUIRE_REDIS") or os.environ.get("CI"):
            pytest.fail(f"Redis is required at {REDIS_URL} (scripts/test.sh starts it)")
        pytest.skip(f"no Redis at {REDIS_URL}")
    return REDIS_URL


@pytest.fixture(scope="session")
def redis_client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, timeout=1).status_code < 500:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@dataclass
class Emulator:
    url: str

    def stats(self) -> dict[str, int]:
        return requests.get(f"{self.url}/emulator/stats", timeout=5).json()

    def calls(self) -> int:
        return int(self.stats().get("generateAccessToken", 0))

    def token_info(self, token: str) -> dict[str, Any]:
        return requests.get(f"{self.url}/emulator/tokens/{token}", timeout=5).json()

    def faults(self, **faults: Any) -> None:
        requests.post(f"{self.url}/emulator/faults", json=faults, timeout=5).raise_for_status()

    def reset(self) -> None:
        requests.post(f"{self.url}/emulator/reset", timeout=5).raise_for_status()


@pytest.fixture(scope="session")
def emulator_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    port = free_port()
    log = (tmp_path_factory.mktemp("emulator") / "emulator.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker.cli", "emulator", "--bind", f"127.0.0.1:{port}"],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/emulator/stats", proc)
    yield Emulator(url)
    stop(proc)


@pytest.fixture
def emulator(emulator_process: Emulator) -> Emulator:
    emulator_process.reset()
    return emulator_process


@dataclass
class RunningBroker:
    url: str
    proc: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path

    def logs(self) -> str:
        return self.stdout_path.read_text(errors="replace") + self.stderr_path.read_text(
            errors="replace"
        )

    def token(self, form: dict[str, str], **kw: Any) -> requests.Response:
        return requests.post(f"{self.url}/v1/token", data=form, timeout=30, **kw)


@contextlib.contextmanager
def run_broker(config: Path, *, env: dict[str, str] | None = None) -> Iterator[RunningBroker]:
    """``token-broker serve --config`` as a subprocess on a free port (gunicorn, real workers)."""
    port = free_port()
    full_env = dict(os.environ)
    full_env.update({
        "BROKER_CACHE_KEYS": CACHE_KEY,
        "BROKER_AUDIT_SIGNING_KEY": AUDIT_SIGNING_KEY,
        "BROKER_BIND": f"127.0.0.1:{port}",
    })
    full_env.update(env or {})
    out, err = config.parent / f"broker-{port}.out", config.parent / f"broker-{port}.err"
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker.cli", "serve", "--config", str(config)],
        cwd=REPO,
        env=full_env,
        stdout=out.open("wb"),
        stderr=err.open("wb"),
    )
    broker = RunningBroker(f"http://127.0.0.1:{port}", proc, out, err)
    try:
        wait_http(f"{broker.url}/healthz", proc)
        yield broker
    except Exception:
        sys.stderr.write(broker.logs()[-5000:])
        raise
    finally:
        stop(proc)
