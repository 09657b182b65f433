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


# -- mint failures shared with waiters (share_failure_s) ----------------------------------------


def test_a_failed_mint_is_the_answer_of_its_waiters(r: fakeredis.FakeRedis) -> None:
    cache = make_cache(r)
    calls: list[int] = []
    entered, release = threading.Event(), threading.Event()
    down = TemporarilyUnavailable("IAM down", reason="iam_unavailable", retry_after=2)

    def failing() -> AccessToken:
        calls.append(1)
        entered.set()
        release.wait(30)
        raise down

    errors: list[BaseException] = []

    def call() -> None:
        try:
            cache.get_or_mint(KEY, failing, wait_s=30, share_failure_s=5)
        except BaseException as exc:
            errors.append(exc)

    holder = threading.Thread(target=call)
    holder.start()
    assert entered.wait(30)
    waiters = [threading.Thread(target=call) for _ in range(5)]
    for t in waiters:
        t.start()
    release.set()
    for t in [holder, *waiters]:
        t.join(30)
    assert len(calls) == 1  # one IAM question for six callers
    assert len(errors) == 6
    assert all(isinstance(e, TemporarilyUnavailable) for e in errors)
    assert {(e.reason, e.retry_after, e.description) for e in errors} == {  # type: ignore[attr-defined]
        ("iam_unavailable", 2, "IAM down")
    }
    # Callers arriving while the failure is fresh get it too; once it expires, a mint again.
    with pytest.raises(TemporarilyUnavailable):
        cache.get_or_mint(KEY, CountingMint(), wait_s=1, share_failure_s=5)
    r.delete(f"tb:{{cache:{KEY}}}:failed")
    assert cache.get_or_mint(KEY, CountingMint(), wait_s=1, share_failure_s=5)[1] is False


def test_a_permanent_refusal_is_shared_as_such(r: fakeredis.FakeRedis) -> None:
    from broker.errors import UpstreamRefused

    cache = make_cache(r)
    refused = UpstreamRefused("IAM refused: HTTP 403 PERMISSION_DENIED", reason="iam_refused")

    def failing() -> AccessToken:
        raise refused

    with pytest.raises(UpstreamRefused) as first:
        cache.get_or_mint(KEY, failing, wait_s=1, share_failure_s=5)
    assert first.value is refused  # the holder gets the original
    with pytest.raises(UpstreamRefused) as second:
        cache.get_or_mint(KEY, CountingMint(), wait_s=1, share_failure_s=5)
    assert (second.value.reason, second.value.status) == ("iam_refused", 502)
    assert 0 < r.pttl(f"tb:{{cache:{KEY}}}:failed") <= 5000


def test_failures_are_not_shared_unless_asked(r: fakeredis.FakeRedis) -> None:
    cache = make_cache(r)

    def failing() -> AccessToken:
        raise TemporarilyUnavailable("IAM down", reason="iam_unavailable")

    with pytest.raises(TemporarilyUnavailable):
        cache.get_or_mint(KEY, failing, wait_s=1)
    assert r.exists(f"tb:{{cache:{KEY}}}:failed") == 0
    with pytest.raises(TemporarilyUnavailable):
        cache.get_or_mint(KEY, failing, wait_s=1, share_failure_s=1)
    with pytest.raises(TemporarilyUnavailable):
        cache.get_or_mint(KEY, CountingMint(), wait_s=1, share_failure_s=1)
    # A caller that does not share failures does not read them either.
    assert cache.get_or_mint(KEY, CountingMint(), wait_s=1)[1] is False


def test_unreadable_shared_failure_is_ignored(r: fakeredis.FakeRedis) -> None:
    cache = make_cache(r)
    r.set(f"tb:{{cache:{KEY}}}:failed", "garbage", px=60_000)
    assert cache.get_or_mint(KEY, CountingMint(), wait_s=1, share_failure_s=1)[1] is False


# -- refresh-ahead support: peek, replace, refresh ----------------------------------------------


def test_peek_ignores_min_remaining_and_unreadable_values(r: fakeredis.FakeRedis) -> None:
    cache = make_cache(r, min_remaining_s=300)
    cache.put(KEY, tok(left=100))
    assert cache.get(KEY) is None
    assert cache.peek(KEY) == tok(left=100)
    r.set(f"tb:{{cache:{KEY}}}:token", "v1.deadbeef.garbage")
    assert cache.peek(KEY) is None
    assert cache.peek("absent") is None


def test_replace_only_where_an_entry_exists(r: fakeredis.FakeRedis) -> None:
    cache = make_cache(r, min_remaining_s=300)
    assert cache.replace(KEY, tok()) is False
    assert cache.get(KEY) is None
    cache.put(KEY, tok(value="old"))
    assert cache.replace(KEY, tok(value="new")) is True
    assert cache.get(KEY) == tok(value="new")
    assert 3_200_000 < r.pttl(f"tb:{{cache:{KEY}}}:token") <= 3_300_000


def test_refresh_outcomes(r: fakeredis.FakeRedis) -> None:
    cache = make_cache(r)
    mint = CountingMint()
    due = lambda t: t.expires_at - NOW < 1000  # noqa: E731
    assert cache.refresh(KEY, mint, is_due=due).outcome == "gone"  # nothing to refresh
    cache.put(KEY, tok(left=3600, value="fresh"))
    result = cache.refresh(KEY, mint, is_due=due)
    assert (result.outcome, result.token) == ("fresh", tok(left=3600, value="fresh"))
    cache.put(KEY, tok(left=900, value="due"))
    r.set(f"tb:{{cache:{KEY}}}:lock", "someone-minting", px=60_000)
    assert cache.refresh(KEY, mint, is_due=due).outcome == "busy"
    r.delete(f"tb:{{cache:{KEY}}}:lock")
    result = cache.refresh(KEY, mint, is_due=due)
    assert (result.outcome, result.token) == ("refreshed", tok(value=f"{SECRET}-1"))
    assert cache.get(KEY) == tok(value=f"{SECRET}-1")
    assert mint.calls == 1
    assert r.exists(f"tb:{{cache:{KEY}}}:lock") == 0


def test_refresh_shares_the_single_flight_lock_with_get_or_mint(r: fakeredis.FakeRedis) -> None:
    """While a refresh mints, a caller missing the same key waits for its result."""
    cache = make_cache(r, min_remaining_s=300)
    cache.put(KEY, tok(left=900, value="due"))
    entered, release = threading.Event(), threading.Event()

    def slow_mint() -> AccessToken:
        entered.set()
        release.wait(30)
        return tok(value="refreshed")

    refresher = threading.Thread(
        target=cache.refresh, args=(KEY, slow_mint), kwargs={"is_due": lambda t: True}
    )
    refresher.start()
    assert entered.wait(30)
    timer = threading.Timer(0.2, release.set)
    timer.start()
    mint = CountingMint()
    try:
        # A caller to whom the stored token (900 s left) is too short: a miss.
        strict = make_cache(r, min_remaining_s=1000)
        token, hit = strict.get_or_mint(KEY, mint, wait_s=30)
    finally:
        timer.cancel()
        release.set()
        refresher.join(30)
    assert (token, hit, mint.calls) == (tok(value="refreshed"), True, 0)


def test_refresh_releases_the_lock_when_the_mint_fails(r: fakeredis.FakeRedis) -> None:
    cache = make_cache(r)
    cache.put(KEY, tok(left=900))

    def failing() -> AccessToken:
        raise TemporarilyUnavailable("IAM down", reason="iam_unavailable")

    with pytest.raises(TemporarilyUnavailable):
        cache.refresh(KEY, failing, is_due=lambda t: True)
    assert r.exists(f"tb:{{cache:{KEY}}}:lock") == 0
    assert r.exists(f"tb:{{cache:{KEY}}}:failed") == 0  # a refresh failure is nobody's answer
    assert cache.get(KEY) == tok(left=900)


# -- detached mints (get_or_mint(detach=True)) ------------------------------------------------


def test_detached_mint_outlives_a_caller_who_stops_waiting(r: fakeredis.FakeRedis) -> None:
    cache = make_cache(r)
    release, done = threading.Event(), threading.Event()
    calls: list[int] = []

    def slow_mint() -> AccessToken:
        calls.append(1)
        release.wait(30)
        return tok(value="late")

    original_put = cache.put

    def put(key: str, token: AccessToken) -> None:
        original_put(key, token)
        done.set()

    cache.put = put  # type: ignore[method-assign]
    with pytest.raises(TemporarilyUnavailable) as info:
        cache.get_or_mint(KEY, slow_mint, wait_s=0.2, detach=True)
    assert info.value.reason == "mint_wait_timeout"
    assert r.exists(f"tb:{{cache:{KEY}}}:lock") == 1  # the mint still holds it
    assert len(cache._local_locks) == 0  # the caller's thread is free
    release.set()
    assert done.wait(30)
    assert cache.get_or_mint(KEY, CountingMint(), wait_s=5) == (tok(value="late"), True)
    assert calls == [1]
    for _ in range(100):  # the minting thread releases the lock right after storing
        if not r.exists(f"tb:{{cache:{KEY}}}:lock"):
            break
        time.sleep(0.01)
    assert r.exists(f"tb:{{cache:{KEY}}}:lock") == 0


def test_detached_mint_result_and_errors_reach_the_caller(r: fakeredis.FakeRedis) -> None:
    cache = make_cache(r)
    assert cache.get_or_mint(KEY, CountingMint(), wait_s=5, detach=True) == (
        tok(value=f"{SECRET}-1"),
        False,
    )
    boom = RuntimeError("iam down")

    def failing() -> AccessToken:
        raise boom

    other = cache_key("other-role", req())
    with pytest.raises(RuntimeError) as info:
        cache.get_or_mint(other, failing, wait_s=5, detach=True)
    assert info.value is boom
    assert r.exists(f"tb:{{cache:{other}}}:lock") == 0
