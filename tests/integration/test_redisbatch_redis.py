"""The atomic batch script on a real redis-server."""

from __future__ import annotations

import uuid

import redis

from broker.redisbatch import CommandRecorder, run_atomically


def test_batch_on_real_redis(redis_client: redis.Redis):
    p = f"tbtest-batch:{uuid.uuid4().hex[:8]}:"
    try:
        batch = CommandRecorder()
        for i in range(50):
            batch.xadd(p + "s", {"r": f"rec{i}"}, id=f"100-{i}")
            batch.xadd(p + "idx", {"p": f"w 100-{i}"}, minid=0, approximate=True)
            batch.hincrby(p + "h", "n", 1)
        run_atomically(redis_client, batch)
        assert redis_client.xlen(p + "s") == 50 and redis_client.xlen(p + "idx") == 50
        assert redis_client.hget(p + "h", "n") == b"50"
    finally:
        for key in redis_client.scan_iter(p + "*"):
            redis_client.delete(key)
