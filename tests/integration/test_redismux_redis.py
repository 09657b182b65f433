"""The multiplexer's own connection on a real redis-server: killed, it is replaced."""

from __future__ import annotations

import uuid

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from broker.redisbatch import CommandRecorder
from broker.redismux import Multiplexer


def _cmd(*args):
    rec = CommandRecorder()
    rec.execute_command(*args)
    return rec


def _kill(mux: Multiplexer, redis_client) -> None:
    (client_id,) = mux.run(_cmd("CLIENT", "ID"))
    assert redis_client.client_kill_filter(_id=int(client_id)) == 1


def test_a_connection_the_server_closed_is_replaced_before_use(redis_url: str, redis_client):
    key = f"tbtest-mux:{uuid.uuid4().hex[:8]}"
    mux = Multiplexer(redis.Redis.from_url(redis_url))  # the broker's policy: no retries
    try:
        assert mux.run(_cmd("SET", key, "1")) == [b"OK"]
        _kill(mux, redis_client)  # as an idle timeout, a restart or a failover would
        assert mux.run(_cmd("GET", key)) == [b"1"]  # noticed before sending: no failed batch
    finally:
        redis_client.delete(key)


def test_the_clients_retry_policy_applies(redis_url: str, redis_client):
    key = f"tbtest-mux:{uuid.uuid4().hex[:8]}"
    mux = Multiplexer(redis.Redis.from_url(redis_url, retry=Retry(NoBackoff(), 1)))
    try:
        assert mux.run(_cmd("SET", key, "2")) == [b"OK"]
        _kill(mux, redis_client)
        assert mux.run(_cmd("GET", key)) == [b"2"]  # retried on a new connection
    finally:
        redis_client.delete(key)
