"""The atomic batch script on a real redis-server."""

from __future__ import annotations

import uuid

import redis

from broker.redisbatch import CommandRecorder, Condition, run_atomically


def test_batch_on_real_redis(redis_client: redis.Redis):
    p = f"tbtest-batch:{uuid.uuid4().hex[:8]}:"
    try:
        batch = CommandRecorder()
        for i in range(50):
            batch.xadd(p + "s", {"r": f"rec{i}"}, id=f"100-{i}")
            batch.xadds([p + "idx", p + "idx2"], 0, "p", f"w 100-{i}")
            batch.hincrby(p + "h", "n", 1)
        run_atomically(redis_client, batch)
        assert redis_client.xlen(p + "s") == 50 and redis_client.xlen(p + "idx") == 50
        assert redis_client.xlen(p + "idx2") == 50
        assert redis_client.hget(p + "h", "n") == b"50"
    finally:
        for key in redis_client.scan_iter(p + "*"):
            redis_client.delete(key)


def test_conditions_on_real_redis(redis_client: redis.Redis):
    p = f"tbtest-batch:{uuid.uuid4().hex[:8]}:"
    try:
        def batch(v: str) -> CommandRecorder:
            b = CommandRecorder()
            b.rpush(p + "log", v)
            return b

        hit = Condition.count(p + "rl", "subject:a", 2, 65)
        fresh = Condition.equals(p + "gen", "")
        assert run_atomically(redis_client, batch("1"), conditions=[hit, fresh]) == ()
        assert run_atomically(redis_client, batch("2"), conditions=[hit, fresh]) == ()
        assert run_atomically(redis_client, batch("3"), conditions=[hit, fresh]) == (0,)
        redis_client.set(p + "gen", "g1")
        other = Condition.count(p + "rl", "subject:b", 2, 65)
        assert run_atomically(redis_client, batch("4"), conditions=[other, fresh]) == (1,)
        assert redis_client.lrange(p + "log", 0, -1) == [b"1", b"2"]
        assert redis_client.hgetall(p + "rl") == {b"subject:a": b"2"}
        assert 0 < redis_client.ttl(p + "rl") <= 65
    finally:
        for key in redis_client.scan_iter(p + "*"):
            redis_client.delete(key)
