"""broker.cache against a real Redis (127.0.0.1:6379, DB 15, keys under ``tbtest-cache:``)."""

from __future__ import annotations

import base64
import hashlib
import multiprocessing
import queue
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from broker.cache import CacheKeys, TokenCache, cache_key
from broker.errors import TemporarilyUnavailable
from broker.model import AccessToken, MintRequest

pytestmark = pytest.mark.integration

REDIS_HOST, REDIS_PORT, REDIS_DB = "127.0.0.1", 6379, 15
KEYS = base64.b64encode(bytes(range(32))).decode()
REQ = MintRequest(
    service_account="flux-source@my-project.iam.gserviceaccount.com",
    scopes=("https://www.googleapis.com/auth/cloud-platform",),
    lifetime_s=3600,
)


def client() -> redis.Redis:
    return redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB)


@pytest.fixture
def prefix() -> Iterator[str]:
    """A fresh prefix under ``tbtest-cache:`` per test; only its keys are deleted afterwards."""
    p = f"tbtest-cache:{uuid.uuid4().hex[:12]}:"
    yield p
    r = client()
    for name in list(r.scan_iter(match=f"{p}*")):
        r.delete(name)
    r.close()


def test_round_trip_and_ttl(prefix: str) -> None:
    r = client()
    cache = TokenCache(r, CacheKeys.parse(KEYS), prefix=prefix, min_remaining_s=300)
    key = cache_key("flux-source-reader", REQ)
    token = AccessToken(token="ya29.integration-token", expires_at=time.time() + 3600)
    assert cache.get(key) is None
    cache.put(key, token)
    assert cache.get(key) == token
    assert 3_200_000 < r.pttl(f"{prefix}{{cache:{key}}}:token") <= 3_300_000
    assert cache.purge([key]) == 1
    assert cache.get(key) is None


def test_no_access_token_in_clear_in_the_keyspace(prefix: str) -> None:
    r = client()
    cache = TokenCache(r, CacheKeys.parse(KEYS), prefix=prefix)
    secrets = [f"ya29.c.clear-text-canary-{i}-{uuid.uuid4().hex}" for i in range(5)]
    for i, secret in enumerate(secrets):
        minted = cache.get_or_mint(
            cache_key(f"role-{i}", REQ),
            lambda s=secret: AccessToken(token=s, expires_at=time.time() + 3600),  # type: ignore[misc]
            wait_s=5,
        )
        assert minted[0].token == secret
    names = list(r.scan_iter(match=f"{prefix}*"))
    assert len(names) == 5  # the tokens, and no lock left behind
    for name in names:
        assert r.type(name) == b"string"
        raw = r.get(name)
        assert raw is not None
        for secret in secrets:
            assert secret.encode() not in raw
            assert secret.encode() not in name
            for enc in (base64.b64encode, base64.urlsafe_b64encode):
                assert enc(secret.encode()).rstrip(b"=") not in raw


# -- cross-process single flight ---------------------------------------------------------------


def _process_worker(
    prefix: str,
    key: str,
    counter: str,
    start: threading.Barrier,
    results: multiprocessing.Queue[tuple[str, str, bool]],
    threads: int,
) -> None:
    """Runs in a spawned process: ``threads`` threads race get_or_mint on one cold key."""
    cache = TokenCache(client(), CacheKeys.parse(KEYS), prefix=prefix)
    r = client()

    def mint() -> AccessToken:
        time.sleep(0.3)  # keeps the mint in flight while every other caller arrives
        n = r.incr(counter)
        return AccessToken(
            token=f"ya29.cross-process-{n}-{uuid.uuid4().hex}", expires_at=time.time() + 3600
        )

    def run() -> None:
        try:
            token, hit = cache.get_or_mint(key, mint, wait_s=60)
            results.put(("ok", hashlib.sha256(token.token.encode()).hexdigest(), hit))
        except Exception as exc:
            results.put(("error", repr(exc), False))

    start.wait(60)  # every process is up before anyone asks
    pool = [threading.Thread(target=run) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()


def test_cross_process_single_flight(prefix: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs_n, threads_n = 4, 10
    key = cache_key("flux-source-reader", REQ)
    counter = f"{prefix}mint-counter"
    start = ctx.Barrier(procs_n)
    results: multiprocessing.Queue[tuple[str, str, bool]] = ctx.Queue()
    procs = [
        ctx.Process(target=_process_worker, args=(prefix, key, counter, start, results, threads_n))
        for _ in range(procs_n)
    ]
    for p in procs:
        p.start()
    got = []
    try:
        for _ in range(procs_n * threads_n):
            got.append(results.get(timeout=120))
    except queue.Empty:
        pass
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    assert [g for g in got if g[0] != "ok"] == []
    assert len(got) == procs_n * threads_n
    assert client().get(counter) == b"1"  # exactly one IAM call for 40 concurrent callers
    assert len({fingerprint for _, fingerprint, _ in got}) == 1
    assert sorted(hit for _, _, hit in got) == [False] + [True] * (procs_n * threads_n - 1)
    assert all(p.exitcode == 0 for p in procs)


def test_expired_lock_of_a_crashed_holder_does_not_block(prefix: str) -> None:
    r = client()
    cache = TokenCache(r, CacheKeys.parse(KEYS), prefix=prefix)
    key = cache_key("flux-source-reader", REQ)
    lock = f"{prefix}{{cache:{key}}}:lock"
    assert r.set(lock, "crashed-holder", nx=True, px=500)
    calls = []

    def mint() -> AccessToken:
        calls.append(1)
        return AccessToken(token="ya29.after-crash", expires_at=time.time() + 3600)

    token, hit = cache.get_or_mint(key, mint, wait_s=30)
    assert (token.token, hit, len(calls)) == ("ya29.after-crash", False, 1)
    assert r.exists(lock) == 0
    assert cache.get(key) == token


def test_unexpired_foreign_lock_times_out_and_is_left_alone(prefix: str) -> None:
    r = client()
    cache = TokenCache(r, CacheKeys.parse(KEYS), prefix=prefix)
    key = cache_key("flux-source-reader", REQ)
    lock = f"{prefix}{{cache:{key}}}:lock"
    r.set(lock, "live-holder", px=60_000)
    with pytest.raises(TemporarilyUnavailable) as info:
        cache.get_or_mint(key, lambda: pytest.fail("must not mint"), wait_s=0.3)
    assert info.value.reason == "mint_wait_timeout"
    assert r.get(lock) == b"live-holder"
