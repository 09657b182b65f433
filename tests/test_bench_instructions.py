"""bench/instructions.py's request driver and its reading of callgrind's summary (the counting
itself runs by hand, under valgrind: README, Benchmarks)."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask, Response, request

from bench.baseline_app import create
from bench.instructions import COLLECTED, environ, serve


def test_environ_posts_the_token_form_as_gunicorn_would() -> None:
    seen: list[dict[str, Any]] = []
    app = Flask(__name__)

    @app.post("/v1/token")
    def token() -> Response:
        seen.append(dict(request.form) | {"ip": request.remote_addr})
        return Response(b"{}", mimetype="application/json")

    serve(app, ["tok-1", "tok-2"])
    assert [s["subject_token"] for s in seen] == ["tok-1", "tok-2"]
    assert seen[0]["grant_type"] == "urn:ietf:params:oauth:grant-type:token-exchange"
    assert seen[0]["audience"] == "bench-team"
    assert seen[0]["ip"] == "127.0.0.1"
    env = environ("abc")
    assert int(env["CONTENT_LENGTH"]) == len(env["wsgi.input"].getvalue())


def test_serve_stops_at_the_first_answer_that_is_not_200() -> None:
    serve(create("bare"), ["a", "b"])  # the bare baseline answers every token
    app = Flask(__name__)

    @app.post("/v1/token")
    def token() -> tuple[str, int]:
        return "no", 400

    with pytest.raises(SystemExit, match="400"):
        serve(app, ["a"])


def test_collected_reads_callgrinds_total() -> None:
    stderr = b"==123== Events    : Ir\n==123== Collected : 3043600221\n==123==\n"
    found = COLLECTED.search(stderr)
    assert found is not None and int(found.group(1)) == 3043600221
    assert COLLECTED.search(b"==123== valgrind: failed to start tool") is None
