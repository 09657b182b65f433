from __future__ import annotations

import fakeredis
import pytest
import redis

from broker.redisbatch import SCRIPT_SHA, CommandRecorder, Condition, run_atomically


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


# -- conditions: checked before anything is written, all or nothing ---------------------------


def _batch(*values: str) -> CommandRecorder:
    batch = CommandRecorder()
    for v in values:
        batch.rpush("log", v)
    return batch


def test_counts_within_their_limits_are_applied_with_the_batch():
    client = fakeredis.FakeRedis()
    hits = [Condition.count("rl:1", "subject:a", 2, 65), Condition.count("rl:1", "ip:x", 5, 65)]
    assert run_atomically(client, _batch("one"), conditions=hits) == ()
    assert client.hgetall("rl:1") == {b"subject:a": b"1", b"ip:x": b"1"}
    assert 0 < client.ttl("rl:1") <= 65
    assert client.lrange("log", 0, -1) == [b"one"]


def test_a_count_over_its_limit_writes_nothing_and_names_the_failure():
    client = fakeredis.FakeRedis()
    client.hset("rl:1", "subject:a", 2)
    hits = [Condition.count("rl:1", "ip:x", 5, 65), Condition.count("rl:1", "subject:a", 2, 65)]
    assert run_atomically(client, _batch("one"), conditions=hits) == (1,)
    assert client.hgetall("rl:1") == {b"subject:a": b"2"}  # the ip hit was not counted either
    assert client.exists("log") == 0 and client.ttl("rl:1") == -1


def test_hits_on_one_counter_in_one_batch_add_up():
    client = fakeredis.FakeRedis()
    three = [Condition.count("rl:1", "subject:a", 2, 65)] * 3
    assert run_atomically(client, _batch("x"), conditions=three) == (2,)  # the third is over
    assert run_atomically(client, _batch("x"), conditions=three[:2]) == ()
    assert client.hget("rl:1", "subject:a") == b"2"


def test_an_existing_expiry_is_kept():
    client = fakeredis.FakeRedis()
    client.hset("rl:1", "other", 1)
    client.expire("rl:1", 10)
    run_atomically(client, _batch("x"), conditions=[Condition.count("rl:1", "f", 3, 65)])
    assert client.ttl("rl:1") <= 10


def test_equals_holds_for_the_current_value_and_an_absent_key_is_empty():
    client = fakeredis.FakeRedis()
    assert run_atomically(client, _batch("a"), conditions=[Condition.equals("gen", "")]) == ()
    client.set("gen", "g2")
    assert run_atomically(client, _batch("b"), conditions=[Condition.equals("gen", "")]) == (0,)
    assert run_atomically(client, _batch("c"), conditions=[Condition.equals("gen", "g2")]) == ()
    assert client.lrange("log", 0, -1) == [b"a", b"c"]


def test_equals_on_one_key_many_times_in_a_batch_each_judged_on_its_value():
    """The script reads each key once per batch (nothing is written before every condition is
    checked); each condition still compares its own value."""
    client = fakeredis.FakeRedis()
    client.set("gen", "g1")
    same = [Condition.equals("gen", "g1"), Condition.equals("gen", "g0"),
            Condition.equals("gen", "g1"), Condition.equals("none", ""),
            Condition.equals("none", "")]
    assert run_atomically(client, _batch("a"), conditions=same) == (1,)
    assert run_atomically(client, _batch("b"), conditions=[same[0], same[2], same[3]]) == ()
    assert client.lrange("log", 0, -1) == [b"b"]


def test_conditions_travel_through_a_runner():
    client = fakeredis.FakeRedis()
    client.set("gen", "g1")
    from broker.redismux import Multiplexer

    mux = Multiplexer(client)
    assert run_atomically(client, _batch("a"), mux, [Condition.equals("gen", "g0")]) == (0,)
    assert run_atomically(client, _batch("b"), mux, [Condition.equals("gen", "g1")]) == ()
    assert client.lrange("log", 0, -1) == [b"b"]


def test_xadds_adds_one_entry_per_key():
    client = fakeredis.FakeRedis()
    client.xadd("i1", {"p": "old"}, id="1-0")
    batch = CommandRecorder()
    batch.xadds(["i1", "i2"], 5, "p", "w 9-0")
    batch.xadds([], 5, "p", "nothing")  # no keys: no command
    assert len(batch) == 1
    run_atomically(client, batch)
    assert [f[b"p"] for _, f in client.xrange("i2")] == [b"w 9-0"]
    assert [f[b"p"] for _, f in client.xrange("i1")][-1] == b"w 9-0"  # MINID ~: trims lazily


def test_a_failing_command_counts_no_hit():
    client = fakeredis.FakeRedis()
    client.set("str", "x")
    batch = CommandRecorder()
    batch.hincrby("str", "f", 1)  # WRONGTYPE: aborts the script
    with pytest.raises(redis.ResponseError):
        run_atomically(client, batch, conditions=[Condition.count("rl", "subject:a", 5, 65)])
    assert client.hget("rl", "subject:a") is None
