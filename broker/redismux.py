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

from typing import Any

import redis

from broker.groupcommit import GroupCommit, Ticket
from broker.redisbatch import CommandRecorder


class Multiplexer:
    """Runs recorded commands, sharing one pipeline round trip among concurrent callers."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._calls: GroupCommit[list[tuple[Any, ...]]] = GroupCommit(self._send)

    def run(self, recorder: CommandRecorder) -> list[Any]:
        """Send ``recorder``'s commands (with whatever else is queued); return their replies.

        Raises ``redis.RedisError``: the first error among this caller's replies, or the
        connection's error.
        """
        if not recorder.commands:
            return []
        call = self._calls.submit(recorder.commands)
        if call.error is not None:
            raise call.error
        return list(call.result)

    def _send(self, batch: list[Ticket[list[tuple[Any, ...]]]]) -> None:
        try:
            pipe = self._client.pipeline(transaction=False)
            for call in batch:
                for command in call.payload:
                    pipe.execute_command(*command)  # type: ignore[no-untyped-call]
            replies = pipe.execute(raise_on_error=False)
        except redis.RedisError as exc:
            for call in batch:
                call.error = exc
            return
        except Exception as exc:  # fail closed: nobody may take a reply that never came
            for call in batch:
                call.error = redis.RedisError(f"pipeline failed: {type(exc).__name__}")
            return
        if len(replies) != sum(len(call.payload) for call in batch):  # never guess
            for call in batch:
                call.error = redis.RedisError("pipeline answered the wrong number of replies")
            return
        at = 0
        for call in batch:
            mine = replies[at : at + len(call.payload)]
            at += len(call.payload)
            call.result = mine
            call.error = next((r for r in mine if isinstance(r, redis.RedisError)), None)
