from __future__ import annotations

import threading
import time

import fakeredis
import pytest
import redis

from broker.redisbatch import CommandRecorder
from broker.redismux import Multiplexer


def rec(*commands):
    r = CommandRecorder()
    for c in commands:
        r.execute_command(*c)
    return r


def test_each_caller_gets_its_own_replies_and_round_trips_are_shared(monkeypatch):
    client = fakeredis.FakeRedis()
    mux = Multiplexer(client)
    sent = []
    real = mux._round_trip

    def round_trip(commands):
        time.sleep(0.01)  # hold the round trip so others queue behind it
        sent.append(len(commands))
        return real(commands)

    monkeypatch.setattr(mux, "_round_trip", round_trip)
    out = {}
    barrier = threading.Barrier(20)

    def one(i):
        barrier.wait()
        out[i] = mux.run(rec(("INCRBY", f"k{i}", i), ("GET", f"k{i}")))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {i: (int(a), int(b)) for i, (a, b) in out.items()} == {i: (i, i) for i in range(20)}
    assert sum(sent) == 40 and len(sent) < 20  # 40 commands in fewer round trips


def test_an_error_reply_is_raised_only_to_its_caller():
    client = fakeredis.FakeRedis()
    client.set("str", "x")
    mux = Multiplexer(client)
    with pytest.raises(redis.ResponseError):
        mux.run(rec(("HINCRBY", "str", "f", 1)))  # WRONGTYPE
    assert mux.run(rec(("SET", "a", "1"), ("GET", "a"))) == [b"OK", b"1"]  # raw replies


def test_connection_errors_reach_every_caller():
    mux = Multiplexer(redis.Redis(port=1, socket_connect_timeout=0.2, retry=None))
    with pytest.raises(redis.ConnectionError):
        mux.run(rec(("GET", "a")))
    assert mux.run(CommandRecorder()) == []


def test_a_dropped_connection_is_replaced():
    client = fakeredis.FakeRedis()
    mux = Multiplexer(client)
    assert mux.run(rec(("SET", "a", "1"))) == [b"OK"]
    mux._conn.disconnect()  # e.g. Redis restarted between two batches
    assert mux.run(rec(("GET", "a"))) == [b"1"]
