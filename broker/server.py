"""Run the broker under gunicorn (gthread workers), configured from settings."""

from __future__ import annotations

import gc
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication

from broker.settings import Settings, load_settings


class BrokerServer(BaseApplication):  # type: ignore[misc]
    """A gunicorn application whose workers each build their own app (nothing shared by fork)."""

    def __init__(self, config_path: str, settings: Settings, extra: dict[str, Any] | None = None):
        self._config_path = config_path
        self._options: dict[str, Any] = {
            "bind": settings.server.bind,
            "workers": settings.server.workers,
            "threads": settings.server.threads,
            "worker_class": "gthread",
            "preload_app": False,  # each worker connects after fork
            "timeout": 30,
            "graceful_timeout": 10,
            "keepalive": 5,
            "accesslog": None,
            "limit_request_line": 8190,
            "child_exit": _child_exit,
            "post_worker_init": _worker_ready,
            # gunicorn's control socket would need a writable $HOME/$XDG_RUNTIME_DIR; unused here.
            "control_socket_disable": True,
        }
        self._options.update(extra or {})
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Flask:
        from broker.app import create_app

        return create_app(load_settings(self._config_path))


def _worker_ready(_worker: Any) -> None:
    # What the worker built at start (app, settings, keys, imported modules) lives as long as
    # it does: move it out of the collector's generations, so full collections under load walk
    # only the objects requests create (start-up garbage is collected first, not frozen).
    gc.collect()
    gc.freeze()


def _child_exit(_server: Any, worker: Any) -> None:
    from broker.metrics import mark_worker_dead

    mark_worker_dead(worker.pid)


def serve(config_path: str, settings: Settings, extra: dict[str, Any] | None = None) -> None:
    """Block serving ``settings`` under gunicorn until signalled."""
    BrokerServer(config_path, settings, extra).run()
