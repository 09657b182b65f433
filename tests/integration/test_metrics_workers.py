"""/metrics aggregates every gunicorn worker's counts (multiprocess mode)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import run_broker
from tests.support import broker_config, exchange_form


def totals(url):
    text = requests.get(f"{url}/metrics", timeout=5).text
    out = {}
    for fam in text_string_to_metric_families(text):
        if fam.name == "token_broker_token_requests":
            for s in fam.samples:
                if s.name.endswith("_total"):
                    key = (s.labels["decision"], s.labels["reason"])
                    out[key] = out.get(key, 0) + s.value
    return out


def writers(logs):
    """Distinct audit writers (one per worker process) that stored an issued record."""
    out = set()
    for line in logs.splitlines():
        if line.startswith('{"audit"'):
            rec = json.loads(line)["audit"]
            if rec.get("decision") == "issued":
                out.add(rec["writer"])
    return out


def test_counts_are_exact_across_two_workers(tmp_path, issuer, redis_url, emulator):
    config = broker_config(tmp_path, issuer, redis_url=redis_url, iam_endpoint=emulator.url)
    tokens = [issuer.token() for _ in range(40)]

    def one(token):
        with requests.Session() as s:  # a new connection each: workers race to accept it
            a = s.post(f"{broker.url}/v1/token", data=exchange_form(token), timeout=10)
            b = s.post(f"{broker.url}/v1/token", data=exchange_form("garbage"), timeout=10)
            return a.status_code, b.status_code

    with run_broker(config) as broker:
        sent = 0
        for _ in range(5):  # bounded: until both workers have served some requests
            with ThreadPoolExecutor(8) as pool:
                assert set(pool.map(one, tokens)) == {(200, 400)}
            sent += len(tokens)
            if len(writers(broker.logs())) == 2:
                break
        assert len(writers(broker.logs())) == 2
        counts = totals(broker.url)
        assert sum(v for (d, _), v in counts.items() if d == "issued") == sent
        assert counts[("denied", "token_malformed")] == sent
