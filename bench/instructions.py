"""Instructions per request: the broker's cache hit against bare Flask, counted, not timed.

``bench/run.py`` times the real stack, and on a shared 2-core machine its figures move by a
fifth from one minute to the next: a change worth a few percent cannot be seen there. This
counts the CPU instructions one request costs in-process, under valgrind's callgrind, which
gives the same count for the same code and inputs whatever else the machine is doing. Each side
(the broker's ``create_app``, and ``bench/baseline_app.py``'s bare app) is run twice, with
``--small`` and ``--large`` requests after the same warm-up; the difference divided by the
difference in requests is the cost of one request, start-up and warm-up cancelled out.

What it measures: one thread, requests called as WSGI (no gunicorn, no sockets to the client),
Redis real (its own redis-server; the server's work is not counted), distinct subject tokens,
cache hits. What it leaves out: gunicorn, threads, the machine's caches under load. So it says
how much Python work a change saves on the hot path; ``bench/run.py`` says what that is worth
under load.

    python bench/instructions.py [--small 100] [--large 400]

Needs valgrind and redis-server (Debian packages valgrind, redis-server).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import redis

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.run import (  # noqa: E402
    backing_services,
    broker_secrets,
    free_port,
    make_tokens,
    signing_key,
    wait_http,
    write_config,
)

WARM_UP = 30  # requests before counting: the first mints, reads Redis and fills the memo
FORM = (
    "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange"
    "&subject_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Ajwt"
    "&audience=bench-team&subject_token="
)
COLLECTED = re.compile(rb"Collected\s*:\s*(\d+)")


def environ(token: str) -> dict[str, Any]:
    """A WSGI environ for ``POST /v1/token`` with ``token``, as gunicorn would build it."""
    body = (FORM + token).encode()
    return {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/v1/token",
        "SCRIPT_NAME": "",
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8080",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_HOST": "127.0.0.1:8080",
        "HTTP_USER_AGENT": "bench",
        "CONTENT_TYPE": "application/x-www-form-urlencoded",
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.input": io.BytesIO(body),
        "wsgi.url_scheme": "http",
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }


def serve(app: Callable[..., Iterable[bytes]], tokens: list[str]) -> None:
    """Call ``app`` once per token; every answer must be a 200."""
    statuses: list[str] = []

    def start_response(status: str, _headers: Any, _exc: Any = None) -> None:
        statuses.append(status)

    for token in tokens:
        for _ in app(environ(token), start_response):
            pass
        if not statuses[-1].startswith("200"):
            raise SystemExit(f"request answered {statuses[-1]}")


def child(side: str, config: str, token_file: str, count: int) -> None:
    """Run under valgrind: build ``side``'s app, warm it up, serve ``count`` requests."""
    tokens = Path(token_file).read_text().split()
    if side == "a":
        from broker.app import create_app
        from broker.settings import load_settings

        # Audit lines go to memory, as they would go to a pipe: the write is not what's measured.
        app: Any = create_app(load_settings(config), audit_out=io.StringIO())
    else:
        from bench.baseline_app import create

        app = create("bare")
    serve(app, tokens[:WARM_UP])
    # What the broker's gunicorn workers run once their app is built, for both sides alike:
    # start-up objects leave the collector's generations.
    from broker.server import _worker_ready

    _worker_ready(None)
    serve(app, tokens[WARM_UP : WARM_UP + count])
    sys.stdout.flush()
    os._exit(0)  # the interpreter's teardown is the same for any count: skip it


def instructions(side: str, config: Path, tokens: Path, count: int, env: dict[str, str]) -> int:
    """Instructions ``side``'s child executed (callgrind's total) for ``count`` requests."""
    out = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            __file__,
            "--child",
            side,
            "--config",
            str(config),
            "--token-file",
            str(tokens),
            "--count",
            str(count),
        ],
        cwd=REPO,
        env={**os.environ, **env, "PYTHONHASHSEED": "0"},
        capture_output=True,
        check=False,
    )
    found = COLLECTED.search(out.stderr)
    if out.returncode != 0 or found is None:
        sys.exit(f"valgrind run of side {side} failed:\n{out.stderr.decode()[-3000:]}")
    return int(found.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--small", type=int, default=100)
    ap.add_argument("--large", type=int, default=400)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--token-file", help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.config, args.token_file, args.count)
        return
    if args.large <= args.small:
        sys.exit("--large must be more than --small")
    if not shutil.which("valgrind") or not shutil.which("redis-server"):
        sys.exit("needs valgrind and redis-server (Debian packages valgrind, redis-server)")

    tmp = Path(tempfile.mkdtemp(prefix="tb-instr-"))
    redis_port, emu_port = free_port(), free_port()
    config = write_config(
        tmp,
        f"redis://127.0.0.1:{redis_port}/0",
        f"http://127.0.0.1:{emu_port}",
        "127.0.0.1:8080",
        0,
        workers=1,
        threads=1,
    )
    key, kid = signing_key(tmp)
    token_file = tmp / "tokens.txt"
    token_file.write_text("\n".join(make_tokens(key, kid, WARM_UP + args.large)) + "\n")
    env = broker_secrets()
    per_request: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        backing_services(stack, tmp, redis_port, emu_port)
        wait_http(f"http://127.0.0.1:{emu_port}")
        store = redis.Redis(port=redis_port)
        counts: dict[int, int] = {}
        for side in ("a", "b"):
            for n in (args.small, args.large):
                # Every run starts from an empty Redis, so both warm up alike (the first request
                # mints, reads the role table, registers the audit writer): otherwise the second
                # run skips that work and the difference undercounts a request.
                store.flushall()
                counts[n] = instructions(side, config, token_file, n, env)
            small, large = counts[args.small], counts[args.large]
            per_request[side] = (large - small) / (args.large - args.small)
            print(
                f"side {side}: {small:,} instructions for {args.small} requests, "
                f"{large:,} for {args.large}",
                file=sys.stderr,
            )
    shutil.rmtree(tmp, ignore_errors=True)
    a, b = per_request["a"], per_request["b"]
    print(
        f"\n== instructions per request (callgrind, in-process, 1 thread, "
        f"{args.large - args.small} requests counted, distinct tokens) =="
    )
    print(f"(a)  broker cache hit        {a:12,.0f}")
    print(f"(b)  bare Flask              {b:12,.0f}")
    print(f"     the exchange's own cost {a - b:12,.0f}   (a)-(b)")
    print(f"(d)  (b)/(a) = {b / a:.2f}")


if __name__ == "__main__":
    main()
