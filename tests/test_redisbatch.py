from __future__ import annotations

import fakeredis
import pytest
import redis

from broker.redisbatch import SCRIPT_SHA, CommandRecorder, run_atomically


def test_records_redis_py_commands_and_runs_them_in_order():
    client = fakeredis.FakeRedis()
    batch = CommandRecorder()
    batch.xadd("s", {"r": b"one"}, id="5-0")
    batch.hincrby("h", "f", 2)
    batch.set("k", "v")
    batch.xadd("s", {"r": b"two"}, id="5-1")
    assert len(batch) == 4 and batch.commands[0][0] == "XADD"
    run_atomically(client, batch)
    assert [f[b"r"] for _, f in client.xrange("s")] == [b"one", b"two"]
    assert client.hget("h", "f") == b"2" and client.get("k") == b"v"


def test_first_use_loads_the_script_then_uses_its_sha():
    client = fakeredis.FakeRedis()
    client.script_flush()
    batch = CommandRecorder()
    batch.set("a", "1")
    run_atomically(client, batch)  # NOSCRIPT -> EVAL (caches it)
    assert client.script_exists(SCRIPT_SHA) == [True]
    batch = CommandRecorder()
    batch.set("a", "2")
    run_atomically(client, batch)
    assert client.get("a") == b"2"


def test_an_error_surfaces_as_redis_error():
    client = fakeredis.FakeRedis()
    client.xadd("s", {"r": b"x"}, id="9-0")
    batch = CommandRecorder()
    batch.xadd("s", {"r": b"older"}, id="1-0")  # ids must increase
    with pytest.raises(redis.RedisError):
        run_atomically(client, batch)


def test_empty_batch_is_a_no_op():
    run_atomically(fakeredis.FakeRedis(), CommandRecorder())
