"""Prometheus metrics, correct across gunicorn workers.

Under gunicorn, ``PROMETHEUS_MULTIPROC_DIR`` is set by the master before forking, so every
worker writes its samples to files there and ``/metrics`` aggregates them; in one process (dev
mode, tests) the default registry is used.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# In multiprocess mode every sample write first asks for the process id, to notice a fork; glibc
# no longer caches getpid, so that is a system call per write (three per token request). The
# id is kept here instead, refreshed in every forked child (prometheus_client's documented
# ``process_identifier`` hook: it must differ between processes, which this does).
_PID = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _PID.__setitem__(0, os.getpid()))


def _process_id() -> int:
    return _PID[0]


if getattr(values.ValueClass, "_multiprocess", False):  # chosen from the environment at import
    values.ValueClass = values.MultiProcessValue(_process_id)  # type: ignore[no-untyped-call]

REQUESTS = Counter(
    "token_broker_token_requests_total",
    "Token exchange requests by outcome",
    ["decision", "reason"],
)
LATENCY = Histogram(
    "token_broker_token_request_seconds",
    "Token exchange latency",
    ["decision"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


_CHILDREN: dict[tuple[str, str], tuple[Any, Any]] = {}  # labels() validates on every call


def observe(decision: str, reason: str, seconds: float) -> None:
    """Count one token request."""
    children = _CHILDREN.get((decision, reason))
    if children is None:
        children = (
            REQUESTS.labels(decision=decision, reason=reason),
            LATENCY.labels(decision=decision),
        )
        if len(_CHILDREN) < 1024:  # reasons are a closed set; never grow without bound
            _CHILDREN[(decision, reason)] = children
    children[0].inc()
    children[1].observe(seconds)


def render() -> tuple[bytes, str]:
    """The exposition text and its content type, aggregated over workers when multiprocess."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


def mark_worker_dead(pid: int) -> None:
    """gunicorn child_exit hook: drop a dead worker's live gauges."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
