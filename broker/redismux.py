"""Share Redis round trips among the threads of a worker (the hot path's I/O).

Every token request makes two dependent trips to Redis: read (rate limits, cache) and write
(its audit record). Under load, a worker's threads each make them at the same time; sending each
separately costs a send and a receive system call and a reply parse apiece. The
:class:`Multiplexer` keeps at most one pipeline in flight per worker: a thread that finds none
under way sends everything queued so far, including the commands of threads that arrived while
it was busy, and hands the lead to the next waiter. Each caller gets exactly its own replies.

Built on :mod:`broker.groupcommit`, like the audit log's group commit; commands are recorded
with :class:`broker.redisbatch.CommandRecorder`. Atomicity is the caller's: a pipeline here is not a
transaction (the audit batch is one atomic script call within it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis

from broker.groupcommit import GroupCommit, Ticket
from broker.redisbatch import CommandRecorder

_hiredis_pack: Callable[[tuple[Any, ...]], bytes] | None
try:
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # pragma: no cover - hiredis is a dependency; redis-py works without it
    _hiredis_pack = None


class Multiplexer:
    """Runs recorded commands, sharing one pipeline round trip among concurrent callers."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._calls: GroupCommit[list[tuple[Any, ...]]] = GroupCommit(self._send)
        # Only the flushing leader touches it (one batch at a time), so one connection serves
        # the worker; taken from the pool on first use, dropped after any failure.
        self._conn: Any = None

    def run(self, recorder: CommandRecorder) -> list[Any]:
        """Send ``recorder``'s commands (with whatever else is queued); return their replies.

        Replies are raw (no response callbacks): bytes, ints, lists. Raises
        ``redis.RedisError``: the first error among this caller's replies, or the connection's
        error.
        """
        if not recorder.commands:
            return []
        call = self._calls.submit(recorder.commands)
        if call.error is not None:
            raise call.error
        return list(call.result)

    def _send(self, batch: list[Ticket[list[tuple[Any, ...]]]]) -> None:
        commands = [command for call in batch for command in call.payload]
        try:
            replies = self._round_trip(commands)
        except redis.RedisError as exc:
            for call in batch:
                call.error = exc
            return
        except Exception as exc:  # fail closed: nobody may take a reply that never came
            for call in batch:
                call.error = redis.RedisError(f"pipeline failed: {type(exc).__name__}")
            return
        if len(replies) != len(commands):  # never guess
            for call in batch:
                call.error = redis.RedisError("pipeline answered the wrong number of replies")
            return
        at = 0
        for call in batch:
            mine = replies[at : at + len(call.payload)]
            at += len(call.payload)
            call.result = mine
            call.error = next((r for r in mine if isinstance(r, redis.RedisError)), None)

    def _round_trip(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """All ``commands`` in one write, then their replies: a pipeline without redis-py's
        per-call pipeline object, pool checkout and response callbacks. Retried as redis-py
        retries a pipeline (the client's retry policy; the broker's is none: a dropped
        connection fails one batch with a 503, and the next connects afresh)."""
        if self._conn is None:
            self._conn = self._client.connection_pool.get_connection()
        conn = self._conn
        # As a pool checkout does: a connection with something to read before we asked was
        # closed by the server (idle timeout, restart, failover) or is out of step: replace it.
        try:
            if conn.can_read():
                conn.disconnect()
        except (redis.ConnectionError, OSError):
            conn.disconnect()

        def exchange() -> list[Any]:
            conn.send_packed_command(_pack(conn, commands))
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(conn.read_response())
                except redis.ResponseError as exc:  # an error reply: the others still follow
                    replies.append(exc)
            return replies

        try:
            replies: list[Any] = conn.retry.call_with_retry(
                exchange, lambda _error: conn.disconnect()
            )
            return replies
        except BaseException:
            conn.disconnect()  # its state is unknown: the next batch connects afresh
            raise


def _pack(conn: Any, commands: list[tuple[Any, ...]]) -> Any:
    """The commands in the Redis protocol. hiredis packs a whole command in C; redis-py's own
    packer (used without hiredis, and by the embedded store) first walks every argument in
    Python, which shows on audit batches of hundreds of arguments."""
    if _hiredis_pack is not None and type(conn) is redis.Connection:
        return [b"".join([_hiredis_pack(command) for command in commands])]
    return conn.pack_commands(commands)
