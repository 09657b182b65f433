"""Unit tests for broker.cache (fakeredis)."""

from __future__ import annotations

import base64
import hashlib
import logging
import socket
import threading
import time
from collections.abc import Callable

import fakeredis
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from broker.cache import CacheKeys, TokenCache, cache_key
from broker.errors import ConfigError, StoreUnavailable, TemporarilyUnavailable
from broker.model import AccessToken, MintRequest

NOW = 1_800_000_000.0
SA = "flux-source@my-project.iam.gserviceaccount.com"
CP = "https://www.googleapis.com/auth/cloud-platform"
RO = "https://www.googleapis.com/auth/devstorage.read_only"
SECRET = "ya29.c.SECRET-access-token-value"

KEY_A = bytes(range(32))
KEY_B = bytes(range(32, 64))


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def req(**kw: object) -> MintRequest:
    base: dict[str, object] = {
        "service_account": SA,
        "scopes": (CP, RO),
        "lifetime_s": 3600,
        "delegates": (),
    }
    base.update(kw)
    return MintRequest(**base)  # type: ignore[arg-type]


@pytest.fixture
def r() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


def make_cache(
    r: redis.Redis, keys: str | None = None, clock: Callable[[], float] = lambda: NOW, **kw: object
) -> TokenCache:
    return TokenCache(r, CacheKeys.parse(keys or b64(KEY_A)), clock=clock, **kw)  # type: ignore[arg-type]


def tok(left: float = 3600.0, value: str = SECRET) -> AccessToken:
    return AccessToken(token=value, expires_at=NOW + left)


KEY = cache_key("flux-source-reader", req())


# -- cache_key ------------------------------------------------------------------------------


def test_cache_key_is_sha256_hex_and_scope_order_free() -> None:
    assert len(KEY) == 64 and int(KEY, 16) >= 0
    assert cache_key("flux-source-reader", req(scopes=(RO, CP))) == KEY
    assert cache_key("flux-source-reader", req(scopes=(RO, CP, RO))) == KEY


@pytest.mark.parametrize(
    "role,changes",
    [
        ("other-role", {}),
        ("flux-source-reader", {"service_account": "x@my-project.iam.gserviceaccount.com"}),
        ("flux-source-reader", {"scopes": (CP,)}),
        ("flux-source-reader", {"lifetime_s": 1800}),
        ("flux-source-reader", {"delegates": ("d1@p.iam.gserviceaccount.com",)}),
    ],
)
def test_cache_key_changes_with_each_component(role: str, changes: dict[str, object]) -> None:
    assert cache_key(role, req(**changes)) != KEY


def test_cache_key_delegate_order_matters_and_fields_do_not_run_together() -> None:
    d1, d2 = "d1@p.iam.gserviceaccount.com", "d2@p.iam.gserviceaccount.com"
    assert cache_key("r", req(delegates=(d1, d2))) != cache_key("r", req(delegates=(d2, d1)))
    # An ambiguous encoding (plain concatenation) would make these collide.
    assert cache_key("a", req(service_account="b" + SA)) != cache_key("ab", req())


# -- CacheKeys ------------------------------------------------------------------------------


def test_parse_accepts_standard_urlsafe_and_unpadded() -> None:
    key = bytes([0xFB, 0xFF] * 16)  # encodes with + and / (standard) or - and _ (urlsafe)
    std = base64.b64encode(key).decode()
    url = base64.urlsafe_b64encode(key).decode().rstrip("=")
    assert "+" in std or "/" in std
    keys = CacheKeys.parse(f" {std} , {url}", "BROKER_CACHE_KEYS")
    assert keys.keys == (key,)  # the same key twice is kept once
    assert keys.kids == (hashlib.sha256(key).hexdigest()[:8],)
    two = CacheKeys.parse(f"{b64(KEY_B)},{b64(KEY_A)}")
    assert two.keys == (KEY_B, KEY_A)


@pytest.mark.parametrize(
    "value,position,problem",
    [
        (f"{b64(KEY_A)},not*base64!", 2, "not base64"),
        (f"{b64(KEY_A)},{b64(b'short')}", 2, "5 bytes"),
        (b64(KEY_A + b"xyz"), 1, "35 bytes"),
        (f"{b64(KEY_A)},,{b64(KEY_B)}", 2, "empty"),
    ],
)
def test_parse_errors_name_env_var_and_position_not_key(
    value: str, position: int, problem: str
) -> None:
    with pytest.raises(ConfigError) as info:
        CacheKeys.parse(value, "MY_KEYS_ENV")
    text = str(info.value)
    assert info.value.source == "MY_KEYS_ENV"
    assert f"entry {position}" in text and problem in text
    for entry in value.split(","):
        if entry:
            assert entry not in text


def test_parse_empty_is_error() -> None:
    with pytest.raises(ConfigError, match="BROKER_CACHE_KEYS"):
        CacheKeys.parse("  ")


def test_repr_hides_key_material_and_generate_roundtrips() -> None:
    generated = CacheKeys.generate()
    keys = CacheKeys.parse(generated)
    raw = base64.b64decode(generated)
    assert len(raw) == 32
    text = repr(keys) + str(keys) + repr(make_cache(fakeredis.FakeRedis(), generated))
    assert generated not in text and raw.hex() not in text and repr(raw) not in text
    assert keys.kids[0] in text
    assert CacheKeys.generate() != generated


# -- get / put ------------------------------------------------------------------------------


def test_round_trip_and_value_is_encrypted(r: fakeredis.FakeRedis) -> None:
    cache = make_cache(r)
    assert cache.get(KEY) is None
    cache.put(KEY, tok())
    assert cache.get(KEY) == tok()
    raw = r.get(f"tb:{{cache:{KEY}}}:token")
    assert raw is not None
    assert SECRET.encode() not in raw
    assert base64.b64encode(SECRET.encode()) not in raw
    assert r.keys("*") == [f"tb:{{cache:{KEY}}}:token".encode()]


def test_prefix_is_used(r: fakeredis.FakeRedis) -> None:
    make_cache(r, prefix="other:").put(KEY, tok())
    assert r.exists(f"other:{{cache:{KEY}}}:token") == 1


def test_min_remaining_is_respected(r: fakeredis.FakeRedis) -> None:
    clock = [NOW]
    cache = make_cache(r, clock=lambda: clock[0], min_remaining_s=300)
    cache.put(KEY, tok(left=600))
    assert cache.get(KEY) == tok(left=600)
    clock[0] = NOW + 300  # exactly min_remaining left: still a hit
    assert cache.get(KEY) == tok(left=600)
    clock[0] = NOW + 301  # less than min_remaining left: a miss
    assert cache.get(KEY) is None


def test_ttl_is_until_min_remaining_and_at_least_one_second(r: fakeredis.FakeRedis) -> None:
    cache = make_cache(r, min_remaining_s=300)
    cache.put(KEY, tok(left=3600))
    pttl = r.pttl(f"tb:{{cache:{KEY}}}:token")
    assert 3_299_000 < pttl <= 3_300_000
    other = cache_key("other", req())
    cache.put(other, tok(left=100))  # already under min_remaining: stored briefly, never served
    assert 0 < r.pttl(f"tb:{{cache:{other}}}:token") <= 1000
    assert cache.get(other) is None


def test_value_moved_under_another_key_is_a_miss(
    r: fakeredis.FakeRedis, caplog: pytest.LogCaptureFixture
) -> None:
    cache = make_cache(r)
    cache.put(KEY, tok())
    other = cache_key("another-role", req())
    r.set(f"tb:{{cache:{other}}}:token", r.get(f"tb:{{cache:{KEY}}}:token"))
    with caplog.at_level(logging.WARNING, logger="broker.cache"):
        assert cache.get(other) is None
    assert other[:12] in caplog.text
    assert SECRET not in caplog.text and other not in caplog.text
    assert cache.get(KEY) == tok()


def _tamper(value: bytes) -> bytes:
    version, kid, body = value.split(b".")
    flipped = body[:20] + (b"A" if body[20:21] != b"A" else b"B") + body[21:]
    return b".".join((version, kid, flipped))


@pytest.mark.parametrize(
    "mangle",
    [
        _tamper,
        lambda v: v[:-4],  # truncated
        lambda v: b"v1.00000000." + v.split(b".")[2],  # unknown key id
        lambda v: b"v2" + v[2:],  # unknown envelope version
        lambda v: b"garbage",
        lambda v: b"\xff\xfe",
    ],
)
def test_tampered_or_malformed_value_is_a_miss(
    r: fakeredis.FakeRedis, mangle: Callable[[bytes], bytes]
) -> None:
    cache = make_cache(r)
    cache.put(KEY, tok())
    name = f"tb:{{cache:{KEY}}}:token"
    raw = r.get(name)
    assert raw is not None
    r.set(name, mangle(raw))
    assert cache.get(KEY) is None


def test_key_rotation(r: fakeredis.FakeRedis) -> None:
    old, new = b64(KEY_A), b64(KEY_B)
    make_cache(r, old).put(KEY, tok())
    assert make_cache(r, f"{new},{old}").get(KEY) == tok()
    assert make_cache(r, new).get(KEY) is None
    # After rotation, writes use the new key: the old key alone can no longer read them.
    make_cache(r, f"{new},{old}").put(KEY, tok())
    assert make_cache(r, new).get(KEY) == tok()
    assert make_cache(r, old).get(KEY) is None


def test_works_with_decode_responses_client() -> None:
    server = fakeredis.FakeServer()
    make_cache(fakeredis.FakeRedis(server=server)).put(KEY, tok())
    text_client = fakeredis.FakeRedis(server=server, decode_responses=True)
    assert make_cache(text_client).get(KEY) == tok()


def test_purge(r: fakeredis.FakeRedis) -> None:
    cache = make_cache(r)
    keys = [cache_key(f"role-{i}", req()) for i in range(3)]
    for k in keys:
        cache.put(k, tok())
    assert cache.purge([keys[0], keys[1], cache_key("never-stored", req())]) == 2
    assert cache.get(keys[0]) is None and cache.get(keys[1]) is None
    assert cache.get(keys[2]) == tok()
    assert cache.purge([]) == 0


# -- get_or_mint ----------------------------------------------------------------------------


class CountingMint:
    def __init__(self, delay: float = 0.0) -> None:
        self.calls = 0
        self.delay = delay
        self._lock = threading.Lock()

    def __call__(self) -> AccessToken:
        with self._lock:
            self.calls += 1
            n = self.calls
        time.sleep(self.delay)
        return tok(value=f"{SECRET}-{n}")


def test_get_or_mint_miss_then_hit(r: fakeredis.FakeRedis) -> None:
    cache = make_cache(r)
    mint = CountingMint()
    first = cache.get_or_mint(KEY, mint, wait_s=5)
    second = cache.get_or_mint(KEY, mint, wait_s=5)
    assert first == (tok(value=f"{SECRET}-1"), False)
    assert second == (tok(value=f"{SECRET}-1"), True)
    assert mint.calls == 1
    assert r.exists(f"tb:{{cache:{KEY}}}:lock") == 0
    assert len(cache._local_locks) == 0


def test_thread_single_flight(r: fakeredis.FakeRedis) -> None:
    cache = make_cache(r)
    mint = CountingMint(delay=0.2)  # long enough that every thread arrives during the mint
    start = threading.Barrier(20)
    results: list[tuple[AccessToken, bool]] = []
    errors: list[BaseException] = []

    def worker() -> None:
        start.wait()
        try:
            results.append(cache.get_or_mint(KEY, mint, wait_s=30))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert mint.calls == 1
    assert len(results) == 20
    assert {t for t, _ in results} == {tok(value=f"{SECRET}-1")}
    assert sorted(hit for _, hit in results) == [False] + [True] * 19
    assert len(cache._local_locks) == 0  # the in-process lock map does not keep idle keys
    assert r.exists(f"tb:{{cache:{KEY}}}:lock") == 0


def test_mint_exception_propagates_and_releases_locks(r: fakeredis.FakeRedis) -> None:
    cache = make_cache(r)
    boom = RuntimeError("iam down")

    def failing() -> AccessToken:
        raise boom

    with pytest.raises(RuntimeError) as info:
        cache.get_or_mint(KEY, failing, wait_s=5)
    assert info.value is boom
    assert r.exists(f"tb:{{cache:{KEY}}}:lock") == 0
    assert len(cache._local_locks) == 0
    assert cache.get(KEY) is None
    # Nothing is left locked: the next caller mints at once (wait_s=0 allows no waiting).
    assert cache.get_or_mint(KEY, CountingMint(), wait_s=0) == (tok(value=f"{SECRET}-1"), False)


def test_release_never_deletes_another_owners_lock(r: fakeredis.FakeRedis) -> None:
    cache = make_cache(r)
    lock = f"tb:{{cache:{KEY}}}:lock"

    def slow_mint() -> AccessToken:
        # Simulates our lock expiring mid-mint and another process taking it.
        r.set(lock, "someone-else", px=60_000)
        return tok()

    assert cache.get_or_mint(KEY, slow_mint, wait_s=5) == (tok(), False)
    assert r.get(lock) == b"someone-else"


def test_wait_timeout_when_another_process_holds_the_lock(r: fakeredis.FakeRedis) -> None:
    cache = make_cache(r)
    r.set(f"tb:{{cache:{KEY}}}:lock", "other-process", px=60_000)
    mint = CountingMint()
    with pytest.raises(TemporarilyUnavailable) as info:
        cache.get_or_mint(KEY, mint, wait_s=0.2)
    assert info.value.reason == "mint_wait_timeout"
    assert info.value.retry_after == 1
    assert info.value.status == 503
    assert mint.calls == 0
    assert r.get(f"tb:{{cache:{KEY}}}:lock") == b"other-process"


def test_waiter_gets_the_value_another_process_stores(r: fakeredis.FakeRedis) -> None:
    cache = make_cache(r)
    r.set(f"tb:{{cache:{KEY}}}:lock", "other-process", px=60_000)
    other = make_cache(r)
    timer = threading.Timer(0.2, other.put, args=(KEY, tok(value="from-other")))
    timer.start()
    mint = CountingMint()
    try:
        assert cache.get_or_mint(KEY, mint, wait_s=30) == (tok(value="from-other"), True)
    finally:
        timer.cancel()
    assert mint.calls == 0


def test_crashed_holders_lock_expires(r: fakeredis.FakeRedis) -> None:
    cache = make_cache(r)
    r.set(f"tb:{{cache:{KEY}}}:lock", "crashed-process", px=300)
    mint = CountingMint()
    assert cache.get_or_mint(KEY, mint, wait_s=30) == (tok(value=f"{SECRET}-1"), False)
    assert mint.calls == 1


def test_thread_waiting_for_local_lock_times_out(r: fakeredis.FakeRedis) -> None:
    cache = make_cache(r)
    entered, release = threading.Event(), threading.Event()

    def blocking_mint() -> AccessToken:
        entered.set()
        release.wait(30)
        return tok()

    holder = threading.Thread(
        target=cache.get_or_mint, args=(KEY, blocking_mint), kwargs={"wait_s": 30}
    )
    holder.start()
    try:
        assert entered.wait(30)
        with pytest.raises(TemporarilyUnavailable) as info:
            cache.get_or_mint(KEY, CountingMint(), wait_s=0.1)
        assert info.value.reason == "mint_wait_timeout"
    finally:
        release.set()
        holder.join()
    assert cache.get(KEY) == tok()


# -- Redis failures -------------------------------------------------------------------------


@pytest.fixture
def dead_redis() -> redis.Redis:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Nothing listens on the port now: connections are refused.
    return redis.Redis(
        host="127.0.0.1",
        port=port,
        socket_connect_timeout=2,
        socket_timeout=2,
        retry=Retry(NoBackoff(), 0),  # fail at once instead of redis-py's default retries
    )


@pytest.mark.parametrize(
    "op",
    [
        lambda c: c.get(KEY),
        lambda c: c.put(KEY, tok()),
        lambda c: c.purge([KEY]),
        lambda c: c.get_or_mint(KEY, CountingMint(), wait_s=1),
    ],
    ids=["get", "put", "purge", "get_or_mint"],
)
def test_redis_errors_become_store_unavailable(
    dead_redis: redis.Redis, op: Callable[[TokenCache], object]
) -> None:
    with pytest.raises(StoreUnavailable) as info:
        op(make_cache(dead_redis))
    assert isinstance(info.value.__cause__, redis.exceptions.RedisError)
    assert info.value.retry_after == 1
    assert info.value.status == 503


def test_put_failure_after_mint_still_releases_locks(r: fakeredis.FakeRedis) -> None:
    cache = make_cache(r)
    real_set = r.set

    def set_failing_for_values(name: str, *args: object, **kw: object) -> object:
        if str(name).endswith(":token"):
            raise redis.exceptions.ConnectionError("gone")
        return real_set(name, *args, **kw)  # type: ignore[arg-type]

    r.set = set_failing_for_values  # type: ignore[method-assign]
    with pytest.raises(StoreUnavailable):
        cache.get_or_mint(KEY, CountingMint(), wait_s=1)
    assert r.exists(f"tb:{{cache:{KEY}}}:lock") == 0
    assert len(cache._local_locks) == 0
