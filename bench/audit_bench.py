"""Benchmark: the audit log at a million records (not a test; run it by hand).

Starts its own redis-server on a free port (never the shared one), then:

  1. calibration: appends through the real ``AuditLog.append`` path in one process, with and
     without the index/counter writes, for the append cost per record and the index overhead;
  2. load: ``--records`` (default 1,000,000) records through ``AuditLog.append`` from
     ``--writers`` processes, each its own writer as gunicorn workers are (checkpoints signed
     every 100 records; stdout witness off). The records look like production: thousands of
     Kubernetes subjects with a skew, hundreds of roles each with its own GCP service account,
     5% refused (a fifth of those with made-up subjects from unverifiable tokens);
  3. Redis memory per record (used_memory), split into chains, indexes and counters;
  4. latency of a filtered first page (100 records, newest first, through ``AuditReader`` and
     JSON encoding, as ``GET /v1/audit/events`` does minus HTTP and bearer verification):
     one subject, one GCP service account, a "24 h window", and a few combinations.

The load takes minutes, not 30 days, and the indexes order records by when Redis stored them, so
the "24 h window" is the slice of the load that holds 1/30 of the records (what a day is of the
default 30-day retention), taken from the middle of the load.

    python bench/audit_bench.py [--records 1000000] [--writers 3] [--queries 40]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker.audit import AuditLog, AuditRecord, rfc3339, sha256_hex
from broker.auditquery import AuditReader, Query
from broker.signing import parse_signing_key

PREFIX = "tb:"
ISSUER = "https://container.googleapis.com/v1/projects/p/locations/europe-west1/clusters/prod"
N_NAMESPACES, N_SAS_PER_NS, N_ROLES = 250, 20, 200
SEED_KEY = "YmJiYmJiYmJiYmJiYmJiYmJiYmJiYmJiYmJiYmJiYmI="  # base64 of 32 x "b"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Workload:
    """Deterministic production-like records (the same seed gives the same stream)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        # Zipf-like: a few namespaces and service accounts do most of the calling.
        self.ns_weights = [1 / (i + 1) ** 0.8 for i in range(N_NAMESPACES)]
        self.sa_weights = [1 / (i + 1) for i in range(N_SAS_PER_NS)]
        self.n = 0

    @staticmethod
    def subject(ns: int, sa: int) -> tuple[str, str, str]:
        return f"team-{ns:03d}", f"sa-{sa:02d}", f"system:serviceaccount:team-{ns:03d}:sa-{sa:02d}"

    @staticmethod
    def role_of(ns: int, sa: int) -> int:
        return (ns * 7 + sa) % N_ROLES

    def record(self) -> AuditRecord:
        r = self.rng
        self.n += 1
        ns = r.choices(range(N_NAMESPACES), self.ns_weights)[0]
        sa = r.choices(range(N_SAS_PER_NS), self.sa_weights)[0]
        namespace, ksa, sub = self.subject(ns, sa)
        role = self.role_of(ns, sa)
        roll = r.random()
        common: dict[str, Any] = dict(
            time=rfc3339(time.time()), request_id=uuid.uuid4().hex[:16], event="token.exchange",
            client_ip=f"10.{ns % 250}.{sa}.{r.randrange(250)}",
            user_agent="gcloud-golang/0.1 google-api-go-client/0.5 fluxcd/source-controller/v1.4",
            latency_ms=round(r.uniform(0.5, 40), 3),
            subject_token_sha256=sha256_hex(f"tok-{self.n}"),
        )
        if roll < 0.01:  # garbage token: unverifiable, made-up claims
            return AuditRecord(decision="denied", reason="bad_signature", subject_verified=False,
                               issuer="https://evil.example",
                               subject=f"forged-{r.randrange(10**6)}", **common)
        claims: dict[str, Any] = dict(
            subject_verified=True, issuer=ISSUER, subject=sub, namespace=namespace,
            kubernetes_service_account=ksa,
            kubernetes_service_account_uid=str(uuid.UUID(int=ns * 100 + sa)),
            pod=f"{ksa}-7d9f8c-{r.randrange(10**5):05d}", pod_uid=str(uuid.uuid4()),
            jti=str(uuid.uuid4()),
        )
        if roll < 0.04:
            return AuditRecord(decision="denied", reason="no_role", **common, **claims)
        if roll < 0.05:
            return AuditRecord(decision="error", reason="iam_unavailable", role=f"role-{role:03d}",
                               **common, **claims)
        return AuditRecord(
            decision="issued", reason="issued", role=f"role-{role:03d}",
            service_account=f"role-{role:03d}@my-project.iam.gserviceaccount.com",
            scopes=("https://www.googleapis.com/auth/cloud-platform",), lifetime_s=3600,
            expires_at=rfc3339(time.time() + 3600), cache="hit" if r.random() < 0.98 else "miss",
            access_token_sha256=sha256_hex(f"at-{role}-{self.n // 5000}"), **common, **claims)


def make_log(url: str, *, writer: str | None = None) -> AuditLog:
    client = redis.Redis.from_url(url)
    return AuditLog(client, prefix=PREFIX, stdout=False, writer=writer,
                    signer=parse_signing_key(SEED_KEY, source="bench"), checkpoint_every=100)


def _load(args: tuple[str, int, int]) -> tuple[int, float]:
    """One writer process: append ``count`` records; returns (count, seconds spent appending)."""
    url, count, seed = args
    log = make_log(url)
    work = Workload(seed)
    done, elapsed = 0, 0.0
    while done < count:
        chunk = [work.record() for _ in range(min(10_000, count - done))]  # built untimed
        start = time.perf_counter()
        for rec in chunk:
            log.append(rec)
        elapsed += time.perf_counter() - start
        done += len(chunk)
    log.close()
    return done, elapsed


def calibrate(url: str, n: int) -> dict[str, float]:
    """Per-record append time, with and without index/counter writes, in one process."""
    work = Workload(1)
    records = [work.record() for _ in range(n)]
    out = {}
    for label in ("no_index", "indexed", "no_index_2", "indexed_2"):
        log = make_log(url, writer=f"calib-{label}")
        if label.startswith("no_index"):
            log.store.indexer.queue = lambda *a, **k: None  # type: ignore[method-assign]
        start = time.perf_counter()
        for rec in records:
            log.append(rec)
        out[label] = (time.perf_counter() - start) / n * 1e6
    client = redis.Redis.from_url(url)
    client.flushdb()
    return {"no_index": min(out["no_index"], out["no_index_2"]),
            "indexed": min(out["indexed"], out["indexed_2"])}


def memory(client: redis.Redis) -> dict[str, int]:
    """Bytes by kind of key (MEMORY USAGE of every key; this Redis holds nothing else)."""
    sizes = {"chain": 0, "index": 0, "stats": 0, "other": 0}
    for key in client.scan_iter(count=1000):
        k = key.decode()
        used = int(client.memory_usage(key, samples=0) or 0)
        kind = ("chain" if k.endswith(":chain") else "index" if ":audit:idx:" in k
                else "stats" if "{audit:stats}" in k else "other")
        sizes[kind] += used
    return sizes


def timed(fn: Any, repeat: int) -> tuple[float, float, float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.95) - 1], times[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--writers", type=int, default=3)
    ap.add_argument("--calibration", type=int, default=20_000)
    ap.add_argument("--queries", type=int, default=40)
    args = ap.parse_args()
    if not shutil.which("redis-server"):
        sys.exit("needs redis-server (Debian package redis-server)")
    tmp = Path(tempfile.mkdtemp(prefix="tb-audit-bench-"))
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--maxmemory-policy", "noeviction", "--dir", str(tmp)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis.from_url(url)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        run(args, url, client)
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace, url: str, client: redis.Redis) -> None:
    info = client.info("server")
    print(f"redis {info['redis_version']} on 127.0.0.1 (its own process); "
          f"python {sys.version.split()[0]}")

    cal = calibrate(url, args.calibration)
    print(f"\n1. append, one process, {args.calibration} records, one round trip each:")
    print(f"   with indexes and counters   {cal['indexed']:7.1f} us/record")
    print(f"   chain only (no indexes)     {cal['no_index']:7.1f} us/record")
    print(f"   index overhead              {cal['indexed'] - cal['no_index']:7.1f} us/record "
          f"({(cal['indexed'] / cal['no_index'] - 1) * 100:.0f}%)")

    base = int(client.info("memory")["used_memory"])
    per = args.records // args.writers
    jobs = [(url, per + (1 if i < args.records % args.writers else 0), 100 + i)
            for i in range(args.writers)]
    print(f"\n2. loading {args.records:,} records from {args.writers} writer processes...",
          flush=True)
    start = time.perf_counter()
    with mp.get_context("spawn").Pool(args.writers) as pool:
        results = pool.map(_load, jobs)
    wall = time.perf_counter() - start
    total = sum(c for c, _ in results)
    per_proc = statistics.mean(e / c * 1e6 for c, e in results)
    print(f"   {total:,} records in {wall:.0f} s: {total / wall:,.0f} records/s overall; "
          f"{per_proc:.0f} us per append in each writer (concurrent, 2 cores shared with Redis)")

    used = int(client.info("memory")["used_memory"]) - base
    kinds = memory(client)
    n_all = int(client.xlen(f"{PREFIX}audit:idx:all"))
    print(f"\n3. Redis memory: {used / n_all:,.0f} bytes per record "
          f"({used / 2**20:,.0f} MiB for {n_all:,} records incl. checkpoints)")
    for kind in ("chain", "index", "stats", "other"):
        print(f"   {kind:<6} {kinds[kind] / n_all:8,.0f} bytes/record")
    n_keys = sum(1 for _ in client.scan_iter(match=f"{PREFIX}audit:idx:*", count=1000))
    print(f"   index streams: {n_keys:,}")

    reader = AuditReader(make_log(url, writer="reader").store)
    first: Any = client.xrange(f"{PREFIX}audit:idx:all", count=1)
    last: Any = client.xrevrange(f"{PREFIX}audit:idx:all", count=1)
    t0, t1 = int(first[0][0].split(b"-")[0]), int(last[0][0].split(b"-")[0])
    mid, day = (t0 + t1) // 2, max(1, (t1 - t0) // 30)
    since_ms, until_ms = mid - day // 2, mid + day // 2
    typical = Workload.subject(40, 3)[2]
    busiest = Workload.subject(0, 0)[2]
    sa_typ = f"role-{Workload.role_of(40, 3):03d}@my-project.iam.gserviceaccount.com"
    sa_busy = f"role-{Workload.role_of(0, 0):03d}@my-project.iam.gserviceaccount.com"

    cases = [
        ("one subject (typical)", Query(subject=typical)),
        ("one subject (busiest)", Query(subject=busiest)),
        ("one GCP service account (typical)", Query(service_account=sa_typ)),
        ("one GCP service account (busiest)", Query(service_account=sa_busy)),
        ("24 h window (all records)", Query(since_ms=since_ms, until_ms=until_ms)),
        (
            "24 h window + one subject",
            Query(subject=typical, since_ms=since_ms, until_ms=until_ms),
        ),
        ("refused, one subject", Query(subject=busiest, decision="denied")),
        ("refused, any (newest first)", Query(decision="denied")),
        (
            "24 h window, oldest first",
            Query(order="asc", since_ms=since_ms, until_ms=until_ms),
        ),
    ]
    print(f"\n4. filtered first page: 100 records, {args.queries} runs each, ms "
          "(AuditReader.page + JSON; excludes HTTP and bearer verification)")
    print(f"   {'query':<36} {'matches':>9} {'p50':>7} {'p95':>7} {'max':>7}")
    for label, q in cases:
        keys = q.filters
        size = None
        if "subject" in keys:
            size = client.xlen(reader._keys.index("subject", keys["subject"]))
        elif "service_account" in keys:
            size = client.xlen(reader._keys.index("sa", keys["service_account"]))
        p50, p95, worst = timed(lambda q=q: orjson.dumps(reader.page(q, limit=100).to_dict()),
                                args.queries)
        page = reader.page(q, limit=100)
        shown = f"{size:,}" if size is not None else ("window" if q.since_ms else "-")
        print(f"   {label:<36} {shown:>9} {p50:7.1f} {p95:7.1f} {worst:7.1f}"
              f"   ({len(page.events)} returned)")


if __name__ == "__main__":
    main()
