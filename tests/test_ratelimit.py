from __future__ import annotations

import fakeredis
import pytest

from broker.errors import RateLimited, TemporarilyUnavailable
from broker.ratelimit import MINTS_PER_ROLE_PER_MINUTE, MintBudget, RateLimiter, client_ip


def test_limit_and_window_reset():
    now = [600.0]
    rl = RateLimiter(fakeredis.FakeRedis(), prefix="t:", clock=lambda: now[0])
    for _ in range(3):
        rl.hit("subject", "a", 3)
    with pytest.raises(RateLimited) as info:
        rl.hit("subject", "a", 3)
    assert info.value.retry_after == 60 and info.value.status == 429
    rl.hit("subject", "b", 3)  # another caller is unaffected
    now[0] += 60
    rl.hit("subject", "a", 3)  # a new minute


def test_zero_is_off():
    rl = RateLimiter(fakeredis.FakeRedis(), prefix="t:")
    for _ in range(10):
        rl.hit("client_ip", "x", 0)


@pytest.mark.parametrize(
    ("remote", "xff", "trusted", "expected"),
    [
        ("1.1.1.1", "9.9.9.9", [], "1.1.1.1"),
        ("10.0.0.1", "9.9.9.9", ["10.0.0.0/8"], "9.9.9.9"),
        ("10.0.0.1", "6.6.6.6, 9.9.9.9, 10.0.0.2", ["10.0.0.0/8"], "9.9.9.9"),
        ("1.1.1.1", "9.9.9.9", ["10.0.0.0/8"], "1.1.1.1"),
        ("10.0.0.1", None, ["10.0.0.0/8"], "10.0.0.1"),
    ],
)
def test_client_ip(remote, xff, trusted, expected):
    assert client_ip(remote, xff, trusted) == expected


# -- per-role mint budget -----------------------------------------------------------------------


def test_mint_budget_per_role_shared_by_replicas():
    now = [600.0]
    r = fakeredis.FakeRedis()
    a = MintBudget(RateLimiter(r, prefix="t:", clock=lambda: now[0]), per_role_per_minute=2)
    b = MintBudget(RateLimiter(r, prefix="t:", clock=lambda: now[0]), per_role_per_minute=2)
    a.spend("flux-source-reader")
    b.spend("flux-source-reader")
    with pytest.raises(TemporarilyUnavailable) as info:
        a.spend("flux-source-reader")
    err = info.value
    assert (err.status, err.error, err.reason) == (503, "temporarily_unavailable", "mint_budget_exhausted")
    assert err.retry_after == 60
    assert "flux-source-reader" in err.description
    b.spend("batch-a")  # another role has its own budget
    now[0] += 45
    with pytest.raises(TemporarilyUnavailable) as later:
        b.spend("flux-source-reader")
    assert later.value.retry_after == 15
    now[0] += 15
    a.spend("flux-source-reader")  # a new minute


def test_mint_budget_zero_is_off():
    budget = MintBudget(RateLimiter(fakeredis.FakeRedis(), prefix="t:"), per_role_per_minute=0)
    for _ in range(100):
        budget.spend("r")


def test_default_mint_budget_is_far_above_normal_refreshing():
    # A role's token is re-minted at most every 0.8 x 10 minutes in normal operation.
    assert MintBudget(RateLimiter(fakeredis.FakeRedis(), prefix="t:")).per_role_per_minute == 60
    assert MINTS_PER_ROLE_PER_MINUTE >= 30


def test_exchange_spends_the_budget_only_on_mints(make_broker):
    from tests.support import exchange_form

    b = make_broker()
    exchange = b.app.extensions["broker"].exchange
    exchange._budget.per_role_per_minute = 1
    post = lambda: b.client.post("/v1/token", data=exchange_form(b.issuer.token()))  # noqa: E731
    assert post().status_code == 200  # a miss: spends the role's one mint
    assert post().status_code == 200  # hits spend nothing
    b.app.extensions["broker"].cache.purge(
        [k.decode().split("{cache:")[1].split("}")[0] for k in b.redis.scan_iter("*:token")]
    )
    resp = post()
    assert resp.status_code == 503
    assert resp.json["error"] == "temporarily_unavailable"
    assert int(resp.headers["Retry-After"]) >= 1
    assert len(b.minter.calls) == 1
    assert b.audit()[0]["reason"] == "mint_budget_exhausted"


def test_one_command_per_hit_once_the_window_expiry_is_stored():
    client = fakeredis.FakeRedis()
    rl = RateLimiter(client, prefix="t:", clock=lambda: 600.0)
    pipe = client.pipeline(transaction=False)
    first = rl.queue(pipe, "subject", "a", 5)
    assert len(pipe) == 2  # HINCRBY + the window's EXPIRE
    results = pipe.execute()
    rl.settle(first, results)  # stored: the expiry is known to be set
    assert 0 < client.ttl("t:rl:10") <= 65
    pipe = client.pipeline(transaction=False)
    rl.queue(pipe, "client_ip", "1.2.3.4", 5)
    assert len(pipe) == 1  # one HINCRBY per hit from now on


def test_failed_write_sets_the_expiry_again():
    client = fakeredis.FakeRedis()
    rl = RateLimiter(client, prefix="t:", clock=lambda: 600.0)
    pipe = client.pipeline(transaction=False)
    rl.queue(pipe, "subject", "a", 5)
    rl.write_failed()  # e.g. the pipeline raised
    pipe2 = client.pipeline(transaction=False)
    rl.queue(pipe2, "subject", "a", 5)
    assert len(pipe2) == 2


def test_over_limit_caller_is_refused_in_process_until_the_window_ends():
    now = [600.0]
    client = fakeredis.FakeRedis()
    rl = RateLimiter(client, prefix="t:", clock=lambda: now[0])
    rl.hit("client_ip", "9.9.9.9", 1)
    with pytest.raises(RateLimited):
        rl.hit("client_ip", "9.9.9.9", 1)
    client.flushall()  # even with Redis forgetting, this process remembers until the window ends
    with pytest.raises(RateLimited):
        rl.check_blocked("client_ip", "9.9.9.9", 1)
    rl.check_blocked("client_ip", "8.8.8.8", 1)  # others pass
    now[0] += 60
    rl.check_blocked("client_ip", "9.9.9.9", 1)  # a new window
