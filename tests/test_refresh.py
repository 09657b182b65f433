"""Unit tests of broker.refresh: which keys are refreshed, when, once, and what never happens."""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from dataclasses import dataclass, field

import fakeredis
import pytest

from broker.cache import CacheKeys, TokenCache, cache_key
from broker.errors import TemporarilyUnavailable
from broker.model import AccessToken, MintRequest, Role, SubjectMatcher
from broker.policy import RoleTable
from broker.ratelimit import MintBudget, RateLimiter
from broker.refresh import Refresher, RefreshPolicy, RefreshTarget
from tests.support import FakeClock, exchange_form

SA = "flux-source@test-project.iam.gserviceaccount.com"
SCOPE = "https://www.googleapis.com/auth/cloud-platform"
ROLE = Role(
    name="flux-source-reader",
    service_account=SA,
    scopes=(SCOPE,),
    lifetime_s=3600,
    subjects=(SubjectMatcher(issuer="test", namespace="flux-system", service_account="sc"),),
)
REQ = MintRequest(SA, (SCOPE,), 3600)
KEY = cache_key(ROLE.name, REQ)
T0 = 1_800_000_000.0


class Clock(FakeClock):
    def __init__(self, now: float = T0) -> None:
        super().__init__(now)


@dataclass
class Minter:
    clock: Clock
    calls: list[MintRequest] = field(default_factory=list)
    fail: Exception | None = None
    during: list[object] = field(default_factory=list)  # callables run inside mint
    _n: itertools.count[int] = field(default_factory=itertools.count)

    def mint(self, request: MintRequest) -> AccessToken:
        self.calls.append(request)
        for hook in self.during:
            hook()  # type: ignore[operator]
        if self.fail is not None:
            raise self.fail
        return AccessToken(f"ya29.refreshed-{next(self._n)}", self.clock.now + request.lifetime_s)


@dataclass
class World:
    clock: Clock
    redis: fakeredis.FakeRedis
    cache: TokenCache
    minter: Minter
    table: list[RoleTable]

    def refresher(self, **policy: float) -> Refresher:
        """One worker process's refresher (each has its own cache object, sharing Redis)."""
        return Refresher(
            self.redis,
            TokenCache(self.redis, KEYS, prefix="t:", min_remaining_s=300, clock=self.clock),
            roles=lambda: self.table[0],
            minter=self.minter,
            budget=MintBudget(RateLimiter(self.redis, prefix="t:", clock=self.clock)),
            prefix="t:",
            policy=RefreshPolicy(**policy),  # type: ignore[arg-type]
            clock=self.clock,
        )

    def seed(self, expires_in: float, value: str = "ya29.old") -> AccessToken:
        token = AccessToken(value, self.clock.now + expires_in)
        self.cache.put(KEY, token)
        return token


KEYS = CacheKeys((b"k" * 32,))


@pytest.fixture
def world() -> World:
    clock = Clock()
    r = fakeredis.FakeRedis()
    cache = TokenCache(r, KEYS, prefix="t:", min_remaining_s=300, clock=clock)
    return World(clock, r, cache, Minter(clock), [RoleTable((ROLE,))])


def due_score(world: World) -> float | None:
    return world.redis.zscore("t:{refresh}:due", KEY)


# -- the refresh point --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lifetime", "ratio", "min_remaining", "before_expiry"),
    [
        (3600, 0.8, 300, 720),  # 0.8 x L comes first
        (3600, 0.5, 300, 1800),
        (3600, 0.95, 300, 330),  # L - min_remaining (plus the lead) comes first
        (600, 0.8, 300, 330),  # shortest lifetime: still refreshed while it is served
    ],
)
def test_refresh_point(lifetime: int, ratio: float, min_remaining: float, before_expiry: float):
    policy = RefreshPolicy(ratio=ratio, min_remaining_s=min_remaining, lead_s=30)
    token = AccessToken("t", T0 + lifetime)
    assert policy.refresh_at(token, lifetime) == T0 + lifetime - before_expiry


def test_policy_validation():
    with pytest.raises(ValueError):
        RefreshPolicy(ratio=1.0)
    with pytest.raises(ValueError):
        RefreshPolicy(tick_s=0)


def test_target_round_trip_and_garbage():
    target = RefreshTarget("r", MintRequest(SA, (SCOPE,), 600, ("hop@p.iam.gserviceaccount.com",)))
    assert RefreshTarget.from_json(target.to_json()) == target
    assert RefreshTarget.from_json(b"not json") is None
    assert RefreshTarget.from_json('{"role": "r"}') is None


# -- touch ----------------------------------------------------------------------------------------


def test_touch_records_use_due_time_and_what_to_mint(world: World):
    refresher = world.refresher()
    token = world.seed(3600)
    refresher.touch(KEY, ROLE.name, REQ, token)
    refresher.stop()
    assert due_score(world) == T0 + 3600 - 720
    assert world.redis.zscore("t:{refresh}:used", KEY) == T0
    raw = world.redis.hget("t:{refresh}:what", KEY)
    assert RefreshTarget.from_json(raw) == RefreshTarget(ROLE.name, REQ)
    assert b"ya29" not in raw  # the token itself is never in the index


def test_touch_is_written_at_most_every_touch_every_s(world: World):
    refresher = world.refresher(touch_every_s=30)
    token = world.seed(3600)
    refresher.touch(KEY, ROLE.name, REQ, token)
    refresher.stop()
    world.redis.delete("t:{refresh}:used")
    world.clock.now += 29
    refresher.touch(KEY, ROLE.name, REQ, token)
    assert world.redis.zscore("t:{refresh}:used", KEY) is None  # a hit costs no Redis write
    world.clock.now += 2
    refresher.touch(KEY, ROLE.name, REQ, token)
    assert world.redis.zscore("t:{refresh}:used", KEY) == T0 + 31


def test_touch_keeps_a_postponed_refresh_and_restores_a_dropped_key(world: World):
    refresher = world.refresher(touch_every_s=30)
    token = world.seed(600)
    refresher.touch(KEY, ROLE.name, REQ, token)
    refresher.stop()
    assert due_score(world) == T0 + 600 - 720
    world.redis.zadd("t:{refresh}:due", {KEY: T0 + 100})  # postponed after a failure
    world.clock.now += 31
    refresher.touch(KEY, ROLE.name, REQ, token)  # the same token: the postponement stays
    assert due_score(world) == T0 + 100
    world.redis.delete("t:{refresh}:due", "t:{refresh}:what")  # dropped meanwhile
    world.clock.now += 31
    refresher.touch(KEY, ROLE.name, REQ, token)
    assert due_score(world) == T0 + 600 - 720
    assert world.redis.hget("t:{refresh}:what", KEY) is not None
    newer = world.seed(3600, "ya29.newer")  # a token this process has not seen sets the time
    refresher.touch(KEY, ROLE.name, REQ, newer)
    assert due_score(world) == world.clock.now + 3600 - 720


def test_touch_survives_redis_failure(world: World, monkeypatch: pytest.MonkeyPatch):
    import redis

    refresher = world.refresher()

    def boom(*a: object, **k: object) -> object:
        raise redis.ConnectionError("down")

    monkeypatch.setattr(world.redis, "execute_command", boom)
    refresher.touch(KEY, ROLE.name, REQ, AccessToken("t", T0 + 3600))  # no exception
    refresher.stop()


# -- run_once ------------------------------------------------------------------------------------


def in_use(world: World, refresher: Refresher, expires_in: float = 600) -> AccessToken:
    token = world.seed(expires_in)
    refresher.touch(KEY, ROLE.name, REQ, token)
    refresher.stop()  # tests drive run_once themselves
    return token


def test_a_due_key_in_use_is_refreshed_once_while_the_old_token_is_served(world: World):
    refresher = world.refresher()
    old = in_use(world, refresher, expires_in=600)  # due: 600 s left < 720
    assert world.cache.get(KEY) == old
    stats = refresher.run_once()
    assert stats.refreshed == 1
    assert len(world.minter.calls) == 1 and world.minter.calls[0] == REQ
    new = world.cache.get(KEY)
    assert new is not None and new.token == "ya29.refreshed-0"
    assert due_score(world) == world.clock.now + 3600 - 720
    assert refresher.run_once().refreshed == 0  # not due any more
    assert len(world.minter.calls) == 1
    assert world.redis.exists("t:{cache:" + KEY + "}:lock") == 0


def test_nothing_before_the_refresh_point(world: World):
    refresher = world.refresher()
    in_use(world, refresher, expires_in=3600)
    world.clock.now += 2879
    assert refresher.run_once().refreshed == 0
    world.clock.now += 1
    assert refresher.run_once().refreshed == 1


def test_once_across_replicas(world: World):
    """Several workers look at the same due key: one mints, the others find it fresh."""
    replicas = [world.refresher() for _ in range(4)]
    in_use(world, replicas[0])
    old_due = due_score(world)
    assert replicas[0].run_once().refreshed == 1
    for other in replicas[1:]:
        # As if each had read the index before the first one rescheduled the key.
        world.redis.zadd("t:{refresh}:due", {KEY: old_due})
        stats = other.run_once()
        assert (stats.refreshed, stats.fresh) == (0, 1)
    assert len(world.minter.calls) == 1


def test_busy_when_someone_else_mints_the_key(world: World):
    refresher = world.refresher()
    in_use(world, refresher)
    world.redis.set("t:{cache:" + KEY + "}:lock", "another-process", px=60_000)
    stats = refresher.run_once()
    assert (stats.busy, len(world.minter.calls)) == (1, 0)
    assert due_score(world) is not None  # still due: looked at again next tick


def test_a_key_nobody_uses_is_dropped_not_refreshed(world: World):
    refresher = world.refresher()
    in_use(world, refresher, expires_in=3600)
    world.clock.now += 3601  # past the refresh point, and unused for longer than the lifetime
    world.cache.put(KEY, AccessToken("ya29.other", world.clock.now + 600))
    stats = refresher.run_once()
    assert (stats.dropped, len(world.minter.calls)) == (1, 0)
    assert due_score(world) is None
    assert world.redis.hget("t:{refresh}:what", KEY) is None
    assert world.redis.zscore("t:{refresh}:used", KEY) is None


@pytest.mark.parametrize(
    "table",
    [
        RoleTable(()),  # removed
        RoleTable((dataclasses.replace(ROLE, lifetime_s=1800),)),  # changed: mints another key
    ],
    ids=["removed", "changed"],
)
def test_a_key_whose_role_changed_is_dropped(world: World, table: RoleTable):
    refresher = world.refresher()
    in_use(world, refresher)
    world.table[0] = table
    stats = refresher.run_once()
    assert (stats.dropped, len(world.minter.calls)) == (1, 0)


def test_a_purged_entry_is_never_resurrected(world: World):
    refresher = world.refresher()
    in_use(world, refresher)
    world.cache.purge([KEY])
    stats = refresher.run_once()
    assert (stats.dropped, len(world.minter.calls)) == (1, 0)
    assert world.cache.peek(KEY) is None


def test_a_purge_racing_the_mint_wins(world: World):
    refresher = world.refresher()
    in_use(world, refresher)
    world.minter.during.append(lambda: world.cache.purge([KEY]))
    stats = refresher.run_once()
    assert len(world.minter.calls) == 1
    assert stats.dropped == 1 and stats.refreshed == 0
    assert world.cache.peek(KEY) is None  # SET XX: the refreshed token was not stored


def test_failure_keeps_serving_the_cached_token_and_retries_later(world: World):
    refresher = world.refresher(retry_s=10)
    old = in_use(world, refresher)
    world.minter.fail = TemporarilyUnavailable("IAM down", reason="iam_unavailable")
    stats = refresher.run_once()
    assert (stats.failed, stats.errors) == (1, ["iam_unavailable"])
    assert world.cache.get(KEY) == old  # still served: it has min_remaining left
    assert due_score(world) == T0 + 10
    world.clock.now += 9
    assert refresher.run_once().failed == 0  # not yet
    assert len(world.minter.calls) == 1
    world.clock.now += 1
    world.minter.fail = None
    assert refresher.run_once().refreshed == 1
    assert world.cache.get(KEY) != old


def test_the_mint_budget_applies_to_refreshes(world: World):
    refresher = world.refresher()
    refresher._budget = MintBudget(  # type: ignore[assignment]
        RateLimiter(world.redis, prefix="t:", clock=world.clock), per_role_per_minute=1
    )
    in_use(world, refresher)
    assert refresher.run_once().refreshed == 1
    world.cache.put(KEY, AccessToken("ya29.again-due", world.clock.now + 600))
    world.redis.zadd("t:{refresh}:due", {KEY: world.clock.now})
    stats = refresher.run_once()
    assert stats.errors == ["mint_budget_exhausted"]
    assert len(world.minter.calls) == 1


def test_a_token_shorter_than_the_refresh_window_is_not_refreshed_in_a_loop(world: World):
    refresher = world.refresher()
    in_use(world, refresher)
    short = Minter(world.clock)
    short.mint = lambda req: AccessToken("ya29.short", world.clock.now + 200)  # type: ignore[method-assign]
    refresher._minter = short
    stats = refresher.run_once()
    assert stats.dropped == 1
    assert due_score(world) is None


def test_garbage_in_the_index_is_dropped(world: World):
    refresher = world.refresher()
    world.redis.zadd("t:{refresh}:due", {KEY: T0 - 1})
    world.redis.hset("t:{refresh}:what", KEY, "garbage")
    assert refresher.run_once().dropped == 1
    assert len(world.minter.calls) == 0


# -- the background thread ----------------------------------------------------------------------


def test_background_thread_refreshes_and_stops(world: World):
    refresher = world.refresher(tick_s=0.01)
    refreshed = threading.Event()
    world.minter.during.append(refreshed.set)
    token = world.seed(600)
    refresher.touch(KEY, ROLE.name, REQ, token)  # starts the thread
    try:
        assert refreshed.wait(30)
    finally:
        refresher.stop()
    assert refresher._thread is not None and not refresher._thread.is_alive()
    assert len(world.minter.calls) == 1


# -- through the exchange ------------------------------------------------------------------------


def test_exchange_touches_keys_and_the_refresher_remints_a_hot_key(make_broker):
    b = make_broker()
    broker = b.app.extensions["broker"]
    refresher = broker.exchange._refresher
    try:
        assert b.client.post("/v1/token", data=exchange_form(b.issuer.token())).status_code == 200
        assert refresher._thread is not None  # the first use started the background thread
        refresher.stop()  # from here on the test drives run_once itself
        index = f"{b.settings.redis.key_prefix}{{refresh}}"
        (key,) = [k.decode() for k in b.redis.zrange(f"{index}:due", 0, -1)]
        target = RefreshTarget.from_json(b.redis.hget(f"{index}:what", key))
        assert target is not None and target.role == "flux-source-reader"
        # Make the cached token due, as if 80 % of its life had passed.
        broker.cache.put(key, AccessToken("ya29.nearly-due", time.time() + 600))
        resp = b.client.post("/v1/token", data=exchange_form(b.issuer.token()))
        assert resp.json["access_token"] == "ya29.nearly-due"  # served from the cache
        assert b.redis.zscore(f"{index}:due", key) < time.time()  # the hit recorded it as due
        assert refresher.run_once().refreshed == 1
        assert len(b.minter.calls) == 2
        resp = b.client.post("/v1/token", data=exchange_form(b.issuer.token()))
        assert resp.json["access_token"] == "ya29.fake-1"
        assert b.audit()[0]["cache"] == "hit"
    finally:
        refresher.stop()


def test_what_is_minted_comes_from_the_role_table_not_from_redis(world: World):
    """Whoever can write Redis must not choose the service account, scopes or lifetime of a
    refresh (the token would be served under this role's key)."""
    refresher = world.refresher()
    in_use(world, refresher)
    forged = RefreshTarget(
        ROLE.name,
        MintRequest("owner@other-project.iam.gserviceaccount.com", (SCOPE,), 43200, ("x@y",)),
    )
    world.redis.hset("t:{refresh}:what", KEY, forged.to_json())
    assert refresher.run_once().refreshed == 1
    assert world.minter.calls == [REQ]
