"""Benchmark: the broker's cache-hit path against the web stack's own ceiling, in the same run.

Starts its own redis-server, the IAM emulator, the broker under gunicorn (production worker
settings, default config but for the client-IP rate limit: every request here comes from
127.0.0.1), and two baselines under gunicorn with the same worker settings:

  (a)  broker, cache hits, a different subject token per request (tens of thousands)
  (b)  bare Flask: parse the same form, return a fixed JSON body
  (b') (b) plus one Redis XADD per request
  (c)  cold burst: N callers x K cold keys with the emulator at 100 ms
  (d)  ratios (a)/(b) and (a)/(b')

Sides alternate over several short wrk runs (gunicorn workers race to accept connections, so a
single run can land everything on one worker); best is compared with best.

    python bench/run.py [--duration 8] [--rounds 3] [--connections 32] [--tokens 30000]
                        [--workers 2] [--threads 8]
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import requests
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from broker.settings import ServerSettings

REPO = Path(__file__).resolve().parents[1]
ISSUER = "https://bench.invalid/cluster"
AUDIENCE = "https://token-broker.bench"
DOMAIN = "bench-project.iam.gserviceaccount.com"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, timeout=1).status_code < 500:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


@contextlib.contextmanager
def process(
    cmd: list[str], log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        try:
            yield proc
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _sign_batch(args: tuple[bytes, str, int, int]) -> list[str]:
    pem, kid, start, count = args
    key = serialization.load_pem_private_key(pem, None)
    now = int(time.time())
    out = []
    for i in range(start, start + count):
        ns, sa = f"team-{i % 1000}", "runner"
        claims = {
            "iss": ISSUER,
            "aud": [AUDIENCE],
            "sub": f"system:serviceaccount:{ns}:{sa}",
            "iat": now,
            "nbf": now,
            "exp": now + 3600,
            "jti": str(uuid.uuid4()),
            "kubernetes.io": {
                "namespace": ns,
                "serviceaccount": {"name": sa, "uid": str(uuid.uuid4())},
                "pod": {"name": f"job-{i}", "uid": str(uuid.uuid4())},
            },
        }
        out.append(jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid}))  # type: ignore[arg-type]
    return out


def make_tokens(key: rsa.RSAPrivateKey, kid: str, n: int) -> list[str]:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    chunk = max(1, n // 8)
    jobs = [(pem, kid, s, min(chunk, n - s)) for s in range(0, n, chunk)]
    with concurrent.futures.ProcessPoolExecutor(2) as pool:
        return [t for batch in pool.map(_sign_batch, jobs) for t in batch]


def write_config(
    tmp: Path, redis_url: str, emulator: str, bind: str, keys: int, *, workers: int, threads: int
) -> Path:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    kid = "bench-" + secrets.token_hex(4)
    jwk.update(kid=kid, alg="RS256", use="sig")
    (tmp / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    roles = [
        {
            "name": "bench-team",
            "subjects": [{"issuer": "bench", "namespace": "team-*", "service_account": "runner"}],
            "service_account": f"bench-team@{DOMAIN}",
            "scopes": ["https://www.googleapis.com/auth/cloud-platform"],
            "lifetime": "1h",
        }
    ]
    for k in range(keys):
        roles.append(
            {
                "name": f"burst-{k}",
                "subjects": [
                    {"issuer": "bench", "namespace": "burst", "service_account": "caller"}
                ],
                "service_account": f"burst-{k}@{DOMAIN}",
                "scopes": ["https://www.googleapis.com/auth/cloud-platform"],
                "lifetime": "1h",
            }
        )
    (tmp / "roles.yaml").write_text(yaml.safe_dump({"roles": roles}))
    config = {
        "server": {"bind": bind, "workers": workers, "threads": threads},
        "redis": {"url": redis_url},
        "issuers": [
            {
                "name": "bench",
                "issuer": ISSUER,
                "audiences": [AUDIENCE],
                "jwks_file": str(tmp / "jwks.json"),
            }
        ],
        "gcp": {
            "iam_endpoint": emulator,
            "credentials": "anonymous",
            "allowed_service_accounts": [f"*@{DOMAIN}"],
        },
        "roles": {"file": str(tmp / "roles.yaml")},
        # Every request of the benchmark comes from 127.0.0.1: a per-IP limit would measure 429s.
        "rate_limit": {"per_client_ip_per_minute": 0},
    }
    (tmp / "broker.yaml").write_text(yaml.safe_dump(config))
    (tmp / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return tmp / "broker.yaml"


def signing_key(tmp: Path) -> tuple[rsa.RSAPrivateKey, str]:
    """The benchmark issuer's private key and kid, as :func:`write_config` wrote them."""
    key = serialization.load_pem_private_key((tmp / "key.pem").read_bytes(), None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise TypeError("the benchmark's issuer key is not RSA")
    return key, str(json.loads((tmp / "jwks.json").read_text())["keys"][0]["kid"])


def broker_secrets() -> dict[str, str]:
    """A fresh token-cache key and audit signing key, as the broker reads them from its
    environment."""
    signing = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return {
        "BROKER_CACHE_KEYS": base64.b64encode(os.urandom(32)).decode(),
        "BROKER_AUDIT_SIGNING_KEY": base64.b64encode(signing).decode(),
    }


def backing_services(
    stack: contextlib.ExitStack, tmp: Path, redis_port: int, emu_port: int
) -> subprocess.Popen[bytes]:
    """Start a redis-server (nothing kept on disk) and the IAM emulator, both stopped with
    ``stack``; return the Redis server's process."""
    redis_proc = stack.enter_context(
        process(
            [
                "redis-server",
                "--port",
                str(redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            tmp / "redis.log",
        )
    )
    stack.enter_context(
        process(
            [sys.executable, "-m", "broker.cli", "emulator", "--bind", f"127.0.0.1:{emu_port}"],
            tmp / "emulator.log",
        )
    )
    return redis_proc


def wrk(url: str, tokens: Path, duration: int, connections: int) -> dict[str, float]:
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{duration}s",
            "--latency",
            "-s",
            str(REPO / "bench" / "token.lua"),
            url,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "BENCH_TOKENS": str(tokens)},
        check=True,
    ).stdout
    m = re.search(
        r"BENCH rps=([\d.]+) p50_ms=([\d.]+) p99_ms=([\d.]+) requests=(\d+) "
        r"errors=(\d+) non2xx=(\d+)",
        out,
    )
    if not m:
        raise RuntimeError(f"wrk output not understood:\n{out}")
    keys = ("rps", "p50_ms", "p99_ms", "requests", "errors", "non2xx")
    return dict(zip(keys, map(float, m.groups()), strict=True))


def _processes() -> Iterator[tuple[Path, list[str]]]:
    """Every process still readable in /proc: its directory and the fields of its ``stat``
    after the command name (``[1]`` is the parent's pid, ``[11]``/``[12]`` user/system ticks)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            yield stat.parent, stat.read_text().rsplit(")", 1)[1].split()


def worker_rss_mb(master_pid: int) -> list[float]:
    out = []
    for proc, fields in _processes():
        with contextlib.suppress(OSError, ValueError):
            if int(fields[1]) == master_pid:
                status = (proc / "status").read_text()
                kb = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
                out.append(round(kb / 1024, 1))
    return sorted(out)


def cpu_seconds(roots: list[int]) -> float:
    """CPU time (user + system) used so far by ``roots`` and their direct children (a gunicorn
    master's workers), read from /proc; processes that are gone count nothing."""
    ticks = sum(
        int(fields[11]) + int(fields[12])
        for proc, fields in _processes()
        if int(proc.name) in roots or int(fields[1]) in roots
    )
    return ticks / os.sysconf("SC_CLK_TCK")


def cold_burst(url: str, emulator: str, token: str, callers: int, keys: int) -> dict[str, Any]:
    requests.post(f"{emulator}/emulator/faults", json={"latency_ms": 100}, timeout=5)
    before = (
        requests.get(f"{emulator}/emulator/stats", timeout=5).json().get("generateAccessToken", 0)
    )

    def call(i: int) -> tuple[int, str]:
        form = {
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
            "subject_token": token,
            "audience": f"burst-{i % keys}",
        }
        r = requests.post(f"{url}/v1/token", data=form, timeout=60)
        return r.status_code, r.json().get("access_token", "")

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(min(callers * keys, 256)) as pool:
        results = list(pool.map(call, range(callers * keys)))
    elapsed = time.perf_counter() - start
    after = (
        requests.get(f"{emulator}/emulator/stats", timeout=5).json().get("generateAccessToken", 0)
    )
    requests.post(f"{emulator}/emulator/faults", json={"latency_ms": 0}, timeout=5)
    return {
        "requests": len(results),
        "seconds": round(elapsed, 2),
        "iam_calls": after - before,
        "errors": sum(1 for s, _ in results if s != 200),
        "distinct_tokens": len({t for s, t in results if s == 200}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=30000)
    ap.add_argument("--burst-callers", type=int, default=20)
    ap.add_argument("--burst-keys", type=int, default=10)
    ap.add_argument("--sides", default="a,b,b'")
    defaults = ServerSettings()
    ap.add_argument(
        "--workers", type=int, default=defaults.workers, help="all sides (default: production)"
    )
    ap.add_argument(
        "--threads", type=int, default=defaults.threads, help="all sides (default: production)"
    )
    args = ap.parse_args()
    if not shutil.which("wrk") or not shutil.which("redis-server"):
        sys.exit("needs wrk and redis-server (Debian packages wrk, redis-server)")

    tmp = Path(tempfile.mkdtemp(prefix="tb-bench-"))
    redis_port, emu_port, broker_port = free_port(), free_port(), free_port()
    bare_port, xadd_port = free_port(), free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    emulator = f"http://127.0.0.1:{emu_port}"
    config = write_config(
        tmp, redis_url, emulator, f"127.0.0.1:{broker_port}", args.burst_keys,
        workers=args.workers, threads=args.threads,
    )
    key, kid = signing_key(tmp)
    print(f"signing {args.tokens} distinct subject tokens...", file=sys.stderr)
    tokens = make_tokens(key, kid, args.tokens)
    token_file = tmp / "tokens.txt"
    token_file.write_text("\n".join(tokens) + "\n")
    burst_token = _sign_batch((((tmp / "key.pem").read_bytes()), kid, 0, 1))[0]
    burst_token = jwt.encode(
        {
            **jwt.decode(burst_token, options={"verify_signature": False}),
            "sub": "system:serviceaccount:burst:caller",
            "kubernetes.io": {
                "namespace": "burst",
                "serviceaccount": {"name": "caller", "uid": "u"},
            },
        },
        key,
        algorithm="RS256",
        headers={"kid": kid},
    )

    env = {**broker_secrets(), "BENCH_REDIS_URL": redis_url}
    gunicorn = [
        sys.executable,
        "-m",
        "gunicorn",
        "-k",
        "gthread",
        "-w",
        str(args.workers),
        "--threads",
        str(args.threads),
        "--keep-alive",
        "5",
        "--log-level",
        "warning",
    ]
    with contextlib.ExitStack() as stack:
        redis_proc = backing_services(stack, tmp, redis_port, emu_port)
        broker = stack.enter_context(
            process(
                [sys.executable, "-m", "broker.cli", "serve", "--config", str(config)],
                tmp / "broker.log",
                env,
            )
        )
        bare = stack.enter_context(
            process(
                [*gunicorn, "-b", f"127.0.0.1:{bare_port}", "bench.baseline_app:create('bare')"],
                tmp / "bare.log",
                env,
            )
        )
        xadd = stack.enter_context(
            process(
                [*gunicorn, "-b", f"127.0.0.1:{xadd_port}", "bench.baseline_app:create('xadd')"],
                tmp / "xadd.log",
                env,
            )
        )
        urls = {
            "a": f"http://127.0.0.1:{broker_port}",
            "b": f"http://127.0.0.1:{bare_port}",
            "b'": f"http://127.0.0.1:{xadd_port}",
        }
        # What each side's requests cost the machine: its gunicorn processes, plus the Redis
        # server for the sides that use it (the client, wrk, is not counted).
        servers = {
            "a": [broker.pid, redis_proc.pid],
            "b": [bare.pid],
            "b'": [xadd.pid, redis_proc.pid],
        }
        for url in urls.values():
            wait_http(f"{url}/healthz" if url == urls["a"] else url)
        warm = requests.post(
            f"{urls['a']}/v1/token",
            timeout=30,
            data={
                "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
                "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
                "subject_token": tokens[0],
                "audience": "bench-team",
            },
        )
        if warm.status_code != 200:
            sys.exit(f"broker warm-up failed: {warm.status_code} {warm.text}")

        sides = args.sides.split(",")
        runs: dict[str, list[dict[str, float]]] = {s: [] for s in sides}
        rss: list[list[float]] = [worker_rss_mb(broker.pid)]
        for r in range(args.rounds):
            order = sides[r % len(sides) :] + sides[: r % len(sides)]
            for side in order:
                cpu_before = cpu_seconds(servers[side])
                redis_before = cpu_seconds([redis_proc.pid])
                result = wrk(urls[side], token_file, args.duration, args.connections)
                spent = cpu_seconds(servers[side]) - cpu_before
                requests_done = max(result["requests"], 1)
                result["cpu_us"] = spent / requests_done * 1e6
                # Redis's part of it (the sides that use Redis count the server's CPU too).
                result["redis_us"] = (
                    (cpu_seconds([redis_proc.pid]) - redis_before) / requests_done * 1e6
                    if redis_proc.pid in servers[side]
                    else 0.0
                )
                runs[side].append(result)
                print(
                    f"round {r + 1} {side:>2}: {result['rps']:8.0f} req/s"
                    f"  p50 {result['p50_ms']:.2f} ms  p99 {result['p99_ms']:.2f} ms"
                    f"  non-2xx {int(result['non2xx'])}  CPU {result['cpu_us']:.0f} us/req"
                    f" (Redis {result['redis_us']:.0f})",
                    file=sys.stderr,
                )
            rss.append(worker_rss_mb(broker.pid))
        burst = cold_burst(urls["a"], emulator, burst_token, args.burst_callers, args.burst_keys)
        rss.append(worker_rss_mb(broker.pid))

    best = {s: max(v, key=lambda x: x["rps"]) for s, v in runs.items()}
    print(
        f"\n== token-broker benchmark (best of {args.rounds} runs of {args.duration}s, "
        f"wrk -t1 -c{args.connections}, {args.tokens} distinct tokens, gunicorn gthread "
        f"{args.workers} workers x {args.threads} threads on every side) =="
    )
    labels = {
        "a": "(a)  broker cache hit",
        "b": "(b)  bare Flask+gunicorn",
        "b'": "(b') (b) + XADD",
    }
    for s in sides:
        b = best[s]
        print(
            f"{labels[s]:<28} {b['rps']:8.0f} req/s   p50 {b['p50_ms']:6.2f} ms   "
            f"p99 {b['p99_ms']:6.2f} ms   non-2xx {int(b['non2xx'])}"
        )
    if "a" in best:
        for s in ("b", "b'"):
            if s in best:
                print(f"(d)  (a)/{s:<3} = {best['a']['rps'] / best[s]['rps']:.2f}")
    # Two cross-checks that the machine's noise moves less than best-of-N req/s: what a request
    # costs the server in CPU (a round whose connections all land on one worker is much slower
    # but costs only somewhat more per request), and each round's own ratio (its sides run
    # back to back, so a slow spell of the machine hits both).
    cpu = {s: statistics.median(r["cpu_us"] for r in v) for s, v in runs.items()}
    in_redis = {s: statistics.median(r["redis_us"] for r in v) for s, v in runs.items()}
    print("server CPU per request (median of rounds; gunicorn processes, plus Redis for a, b'):")
    print(
        "     "
        + "   ".join(
            f"({s}) {cpu[s]:.0f} us" + (f" (Redis {in_redis[s]:.0f})" if in_redis[s] else "")
            for s in sides
        )
    )
    if "a" in cpu:
        for s in ("b", "b'"):
            if s in cpu:
                paired = statistics.median(
                    x["rps"] / y["rps"] for x, y in zip(runs["a"], runs[s], strict=True)
                )
                print(
                    f"(d)  (a)/{s:<3} by CPU per request = {cpu[s] / cpu['a']:.2f}; "
                    f"median of the rounds' own ratios = {paired:.2f}"
                )
    print(
        f"(c)  cold burst: {burst['requests']} requests ({args.burst_callers} callers x "
        f"{args.burst_keys} cold keys, IAM at 100 ms): {burst['seconds']} s, IAM calls "
        f"{burst['iam_calls']} (expected {args.burst_keys}), errors {burst['errors']}, "
        f"distinct tokens {burst['distinct_tokens']}"
    )
    print(f"RSS per broker worker (MB) at start, after each round, after the burst: {rss}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
