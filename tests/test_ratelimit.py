from __future__ import annotations

import fakeredis
import pytest

from broker.errors import RateLimited
from broker.ratelimit import RateLimiter, client_ip


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
