"""Share Redis round trips among the threads of a worker (the hot path's I/O).

Every token request makes two dependent trips to Redis: read (rate limits, cache) and write
(its audit record). Under load, a worker's threads each make them at the same time; sending each
separately costs a send and a receive system call and a reply parse apiece. The
:class:`Multiplexer` keeps at most one pipeline in flight per worker: a thread that finds none
under way sends everything queued so far, including the commands of threads that arrived while
it was busy, and hands the lead to the next waiter. Each caller gets exactly its own replies.

Same shape as the audit log's group commit (:mod:`broker.audit`); commands are recorded with
:class:`broker.redisbatch.CommandRecorder`. Atomicity is the caller's: a pipeline here is not a
transaction (the audit batch is one atomic script call within it).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import redis

from broker.redisbatch import CommandRecorder


def held_lock() -> threading.Lock:
    """A lock already held: one ``release`` wakes the one thread waiting in ``acquire`` (the
    cheapest cross-thread wake-up; Event.set goes through Python code)."""
    lock = threading.Lock()
    lock.acquire()
    return lock


@dataclass
class _Call:
    commands: list[tuple[Any, ...]]
    results: list[Any] = field(default_factory=list)
    error: BaseException | None = None
    done: bool = False
    leader: bool = False
    wake: threading.Lock = field(default_factory=held_lock)  # released once: done or lead


class Multiplexer:
    """Runs recorded commands, sharing one pipeline round trip among concurrent callers."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._lock = threading.Lock()  # guards _queue and _busy
        self._queue: list[_Call] = []
        self._busy = False

    def run(self, recorder: CommandRecorder) -> list[Any]:
        """Send ``recorder``'s commands (with whatever else is queued); return their replies.

        Raises ``redis.RedisError``: the first error among this caller's replies, or the
        connection's error.
        """
        call = _Call(recorder.commands)
        if not call.commands:
            return []
        with self._lock:
            self._queue.append(call)
            lead = not self._busy
            self._busy = True
        if lead:
            call.leader = True
        else:
            call.wake.acquire()  # released when our replies are in, or when handed the lead
        if not call.done:
            self._lead()
        if call.error is not None:
            raise call.error
        return call.results

    def _lead(self) -> None:
        with self._lock:
            batch, self._queue = self._queue, []
        try:
            self._send(batch)
        finally:
            for call in batch:
                call.done = True
                if not call.leader:
                    call.wake.release()
            with self._lock:
                if self._queue:
                    nxt = self._queue[0]
                    nxt.leader = True
                    nxt.wake.release()
                else:
                    self._busy = False

    def _send(self, batch: list[_Call]) -> None:
        try:
            pipe = self._client.pipeline(transaction=False)
            for call in batch:
                for command in call.commands:
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
        if len(replies) != sum(len(call.commands) for call in batch):  # never guess
            for call in batch:
                call.error = redis.RedisError("pipeline answered the wrong number of replies")
            return
        at = 0
        for call in batch:
            mine = replies[at : at + len(call.commands)]
            at += len(call.commands)
            call.results = mine
            call.error = next((r for r in mine if isinstance(r, redis.RedisError)), None)
