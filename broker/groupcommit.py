"""Group commit: concurrent callers of a process share one flush of everything queued.

A caller that finds no flush under way leads: it takes every queued ticket (its own included),
flushes them together, wakes their owners and hands the lead to the next waiter. Callers that
arrive meanwhile wait on their own ticket, so a wake-up is one lock release (no broadcast). Used
by the audit log (many records, one atomic write) and the Redis multiplexer (many callers' commands,
one pipeline).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

P = TypeVar("P")


def held_lock() -> threading.Lock:
    """A lock already held: one ``release`` wakes the one thread waiting in ``acquire`` (the
    cheapest cross-thread wake-up; Event.set goes through Python code)."""
    lock = threading.Lock()
    lock.acquire()
    return lock


@dataclass
class Ticket(Generic[P]):
    """One caller's item. The flush sets ``result`` or ``error``; ``done`` once flushed."""

    payload: P
    result: Any = None
    error: BaseException | None = None
    done: bool = False
    leader: bool = False
    # Held from creation; released exactly once: when flushed, or when handed the lead.
    wake: threading.Lock = field(default_factory=held_lock)


class GroupCommit(Generic[P]):
    """Runs ``flush(tickets)`` for batches of concurrent submissions, one batch at a time.

    ``flush`` must set each ticket's ``result`` or ``error``. If it raises, every ticket of the
    batch fails with that error (fail closed) and the leader re-raises it.
    """

    def __init__(self, flush: Callable[[list[Ticket[P]]], None]) -> None:
        self._flush = flush
        self._lock = threading.Lock()  # guards _queue and _busy
        self._queue: list[Ticket[P]] = []
        self._busy = False

    def submit(self, payload: P) -> Ticket[P]:
        """Queue ``payload`` and return its ticket once it has been flushed."""
        ticket: Ticket[P] = Ticket(payload)
        with self._lock:
            self._queue.append(ticket)
            lead = not self._busy
            self._busy = True
        if lead:
            ticket.leader = True
        else:
            ticket.wake.acquire()  # released when flushed, or when handed the lead
        if not ticket.done:
            self._lead()
        return ticket

    def _lead(self) -> None:
        with self._lock:
            batch, self._queue = self._queue, []
        try:
            self._flush(batch)
        except BaseException as exc:
            for t in batch:
                t.error = exc
            raise
        finally:
            for t in batch:
                t.done = True
                if not t.leader:  # a leader's wake was released already (or never waited)
                    t.wake.release()
            with self._lock:
                if self._queue:
                    nxt = self._queue[0]
                    nxt.leader = True
                    nxt.wake.release()  # not done: it wakes up as the next leader
                else:
                    self._busy = False
