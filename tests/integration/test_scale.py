"""Scale without stampedes (DESIGN.md §6), end to end: real Redis, gunicorn, the IAM emulator.

Two ``token-broker serve`` processes (2 gunicorn workers each) share one key prefix: two
replicas. Assertions count — IAM calls on the emulator, responses, audit records — rather
than time anything. Emulator latency only keeps a mint in flight while the test does something
else; two checks rest on an ordering that it makes wide: /healthz answers within the bulkhead's
2 s grace while a 4.5 s mint is pending, and 61 cold requests finish within the circuit's 5 s
cool-down (one probe is allowed for anyway).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
import yaml

from broker.cache import CacheKeys, TokenCache, cache_key
from broker.circuit import CircuitPolicy
from broker.model import AccessToken, MintRequest
from tests.integration.conftest import Emulator, RunningBroker, run_broker
from tests.support import CACHE_KEY, SA_DOMAIN, LocalIssuer, broker_config, exchange_form

pytestmark = pytest.mark.integration

ROLE_SCOPE = "https://www.googleapis.com/auth/devstorage.read_only"
CLOUD = "https://www.googleapis.com/auth/cloud-platform"
FLUX_REQ = MintRequest(f"flux-source@{SA_DOMAIN}", (ROLE_SCOPE,), 3600)
THRESHOLD = CircuitPolicy().failure_threshold


@pytest.fixture
def prefix(redis_client: redis.Redis) -> Iterator[str]:
    """A key prefix of this test's own (DB 13); its keys are deleted afterwards."""
    p = f"tbt-scale-{uuid.uuid4().hex[:8]}:"
    yield p
    for name in list(redis_client.scan_iter(match=f"{p}*", count=1000)):
        redis_client.delete(name)


@pytest.fixture(autouse=True)
def _calm_emulator(emulator: Emulator) -> Iterator[None]:
    yield
    emulator.reset()  # no latency or faults leak into other tests


def write_config(
    tmp_path: Path,
    issuer: LocalIssuer,
    redis_url: str,
    emulator: Emulator,
    prefix: str,
    *,
    roles: dict[str, Any] | None = None,
    rate_limit: dict[str, int] | None = None,
    trusted_proxies: list[str] | None = None,
) -> Path:
    path = broker_config(
        tmp_path,
        issuer,
        redis_url=redis_url,
        iam_endpoint=emulator.url,
        prefix=prefix,
        roles=roles,
        rate_limit=rate_limit,
    )
    if trusted_proxies is not None:
        cfg = yaml.safe_load(path.read_text())
        cfg["server"]["trusted_proxies"] = trusted_proxies
        path.write_text(yaml.safe_dump(cfg))
    return path


@contextlib.contextmanager
def replicas(config: Path, n: int = 2) -> Iterator[list[RunningBroker]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(run_broker(config)) for _ in range(n)]


def audit_records(brokers: list[RunningBroker]) -> list[dict[str, Any]]:
    """Token-exchange audit records from the brokers' stdout witness."""
    out = []
    for b in brokers:
        for line in b.stdout_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                rec = json.loads(line).get("audit")
                if isinstance(rec, dict) and rec.get("event") == "token.exchange":
                    out.append(rec)
    return out


def wait_for(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Poll ``check`` until true; bounded so a broken build fails instead of hanging."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.1)


def post(url: str, form: dict[str, str], **kw: Any) -> requests.Response:
    return requests.post(f"{url}/v1/token", data=form, timeout=60, **kw)


def fire(jobs: list[Callable[[], requests.Response]]) -> list[requests.Response]:
    """Run every job at once (one thread each) and return the responses in order."""
    start = threading.Barrier(len(jobs))

    def run(job: Callable[[], requests.Response]) -> requests.Response:
        start.wait(60)
        return job()

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        return list(pool.map(run, jobs))


def seed(redis_url: str, prefix: str, role: str, request: MintRequest, token: AccessToken) -> None:
    """Put ``token`` in the brokers' cache, as if minted earlier (min_remaining 0 to allow it)."""
    cache = TokenCache(
        redis.Redis.from_url(redis_url),
        CacheKeys.parse(CACHE_KEY),
        prefix=prefix,
        min_remaining_s=0,
    )
    cache.put(cache_key(role, request), token)


def quiet_minute() -> None:
    """Rate limits count in fixed minutes: do not start a counted burst in a minute's last 10 s."""
    left = 60 - time.time() % 60
    if left < 10:
        time.sleep(left + 0.1)


def scale_roles(n: int) -> dict[str, Any]:
    return {
        "roles": [
            {
                "name": f"scale-{i}",
                "subjects": [
                    {
                        "issuer": "test",
                        "namespace": "flux-system",
                        "service_account": "source-controller",
                    }
                ],
                "service_account": f"scale-{i}@{SA_DOMAIN}",
                "scopes": [CLOUD],
                "lifetime": "1h",
            }
            for i in range(n)
        ]
    }


# -- single flight --------------------------------------------------------------------------------


def test_200_concurrent_requests_for_one_cold_key_make_one_iam_call(
    tmp_path, issuer, redis_url, emulator, prefix
):
    config = write_config(tmp_path, issuer, redis_url, emulator, prefix)
    with replicas(config) as brokers:
        emulator.faults(latency_ms=300)  # keeps the one mint in flight while all 200 arrive
        form = exchange_form(issuer.token())
        responses = fire([lambda u=brokers[i % 2].url: post(u, form) for i in range(200)])
        assert [r.status_code for r in responses] == [200] * 200, {r.text for r in responses}
        assert emulator.calls() == 1
        tokens = {r.json()["access_token"] for r in responses}
        assert len(tokens) == 1
        assert emulator.token_info(tokens.pop())["service_account"] == f"flux-source@{SA_DOMAIN}"
        issued = [r for r in audit_records(brokers) if r["decision"] == "issued"]
        assert Counter(r["cache"] for r in issued) == {"miss": 1, "hit": 199}


def test_ten_cold_keys_at_once_make_exactly_ten_iam_calls(
    tmp_path, issuer, redis_url, emulator, prefix
):
    config = write_config(tmp_path, issuer, redis_url, emulator, prefix, roles=scale_roles(10))
    with replicas(config) as brokers:
        emulator.faults(latency_ms=300)
        subject = issuer.token()
        jobs = [
            lambda u=brokers[i % 2].url, role=f"scale-{i % 10}": post(
                u, exchange_form(subject, audience=role)
            )
            for i in range(200)
        ]
        responses = fire(jobs)
        assert [r.status_code for r in responses] == [200] * 200, {r.text for r in responses}
        assert emulator.calls() == 10
        by_role: dict[str, set[str]] = {}
        for i, r in enumerate(responses):
            by_role.setdefault(f"scale-{i % 10}", set()).add(r.json()["access_token"])
        assert all(len(tokens) == 1 for tokens in by_role.values())  # one token per role
        assert len({t for tokens in by_role.values() for t in tokens}) == 10
        for role, (token,) in by_role.items():
            assert emulator.token_info(token)["service_account"] == f"{role}@{SA_DOMAIN}"


# -- refresh ahead --------------------------------------------------------------------------------


def test_hot_key_is_reminted_before_expiry_while_callers_get_hits(
    tmp_path, issuer, redis_url, emulator, prefix
):
    config = write_config(tmp_path, issuer, redis_url, emulator, prefix)
    # 10 minutes left of a 1 h token: past its refresh point (0.8 x 1 h) but still served.
    seeded = AccessToken(f"ya29.seeded-{uuid.uuid4().hex}", time.time() + 600)
    seed(redis_url, prefix, "flux-source-reader", FLUX_REQ, seeded)
    with replicas(config) as brokers:
        emulator.faults(latency_ms=3000)  # the refresh mint stays in flight for a while
        form = exchange_form(issuer.token())
        served: list[str] = []

        def ask(i: int) -> str:
            resp = post(brokers[i % 2].url, form)
            assert resp.status_code == 200, resp.text
            served.append(resp.json()["access_token"])
            return served[-1]

        # Callers use the key; a background refresher picks it up and calls IAM.
        wait_for(lambda: ask(len(served)) == seeded.token and emulator.calls() == 1, "a refresh")
        # The refresh is in flight: callers are not waiting for it, they get the cached token.
        in_flight = [ask(i) for i in range(4)]
        assert in_flight == [seeded.token] * 4
        wait_for(lambda: ask(len(served)) != seeded.token, "the refreshed token")
        fresh = served[-1]
        assert emulator.calls() == 1  # once, across 2 replicas x 2 workers
        assert emulator.token_info(fresh)["service_account"] == f"flux-source@{SA_DOMAIN}"
        resp = post(brokers[0].url, form).json()
        assert resp["access_token"] == fresh and resp["expires_in"] > 3000
        issued = [r for r in audit_records(brokers) if r["decision"] == "issued"]
        assert len(issued) == len(served) + 1
        assert {r["cache"] for r in issued} == {"hit"}  # nobody ever waited for IAM


# -- IAM failing ---------------------------------------------------------------------------------


def test_iam_down_serves_cached_tokens_trips_the_circuit_and_recovers(
    tmp_path, issuer, redis_url, emulator, prefix
):
    config = write_config(tmp_path, issuer, redis_url, emulator, prefix)
    seeded = AccessToken(f"ya29.seeded-{uuid.uuid4().hex}", time.time() + 600)  # due, still valid
    seed(redis_url, prefix, "flux-source-reader", FLUX_REQ, seeded)
    emulator.faults(fail_next=100_000, status=503)
    with replicas(config) as brokers:
        hot = exchange_form(issuer.token())
        cold = exchange_form(issuer.token("team-x", "runner"), audience="batch-b")
        other_cold = exchange_form(issuer.token("team-x", "runner"), audience="batch-a")

        def hot_token(i: int = 0) -> str:
            resp = post(brokers[i % 2].url, hot)
            assert resp.status_code == 200, resp.text
            return str(resp.json()["access_token"])

        # The hot key's background refresh fails until the circuit opens; callers never notice.
        wait_for(
            lambda: hot_token() == seeded.token and emulator.calls() >= THRESHOLD, "the circuit"
        )
        assert [hot_token(i) for i in range(6)] == [seeded.token] * 6
        tripped = emulator.calls()
        assert tripped == THRESHOLD  # the circuit opened: nothing more reaches IAM

        # No valid cached token: 503 with Retry-After, at once, without asking IAM.
        resp = post(brokers[0].url, cold)
        assert resp.status_code == 503, resp.text
        assert resp.json()["error"] == "temporarily_unavailable"
        assert int(resp.headers["Retry-After"]) >= 1
        flood = fire(
            [
                lambda u=brokers[i % 2].url, f=(cold, other_cold)[i % 2]: post(u, f)
                for i in range(60)
            ]
        )
        assert {r.status_code for r in flood} == {503}
        assert all(int(r.headers["Retry-After"]) >= 1 for r in flood)
        # 61 cold requests while IAM is down cost at most one probe (if a cool-down ended).
        assert emulator.calls() <= tripped + 1
        assert hot_token() == seeded.token

        # IAM is back: no restart; the circuit's probe gets through, then everything works.
        emulator.faults(fail_next=0)
        healed_at = emulator.calls()

        def cold_ok() -> bool:
            return post(brokers[0].url, cold).status_code == 200

        wait_for(cold_ok, "recovery of cold requests")
        wait_for(lambda: hot_token() != seeded.token, "the hot key's refresh to recover")
        assert emulator.calls() - healed_at == 2  # one mint for batch-b, one refresh
        records = audit_records(brokers)
        reasons = Counter(r["reason"] for r in records if r["decision"] == "error")
        assert reasons["iam_circuit_open"] >= 61 - 1
        assert set(reasons) <= {"iam_circuit_open", "iam_unavailable"}


# -- health under load ------------------------------------------------------------------------------


def test_health_answers_while_token_requests_wait_on_iam(
    tmp_path, issuer, redis_url, emulator, prefix
):
    config = write_config(tmp_path, issuer, redis_url, emulator, prefix)
    with run_broker(config) as broker:  # 2 workers x 8 threads
        emulator.faults(latency_ms=4500)  # below the 5 s attempt timeout: the mint succeeds
        form = exchange_form(issuer.token())
        finished: list[int] = []
        lock = threading.Lock()

        def ask() -> requests.Response:
            resp = post(broker.url, form)
            with lock:
                finished.append(resp.status_code)
            return resp

        with ThreadPoolExecutor(max_workers=120) as pool:
            futures = [pool.submit(ask) for _ in range(120)]
            wait_for(lambda: emulator.calls() == 1, "the mint to reach IAM")
            health = requests.get(f"{broker.url}/healthz", timeout=60)
            with lock:
                issued_before_health = finished.count(200)
            responses = [f.result() for f in futures]
        assert health.status_code == 200
        assert issued_before_health == 0  # health answered while the mint was still in flight
        codes = Counter(r.status_code for r in responses)
        assert set(codes) <= {200, 503} and codes[200] >= 1 and codes[503] >= 1, codes
        for r in responses:
            if r.status_code == 503:
                assert r.json()["error"] == "temporarily_unavailable"
                assert r.headers["Retry-After"] == "1"
        assert len({r.json()["access_token"] for r in responses if r.status_code == 200}) == 1
        assert emulator.calls() == 1
        # Those turned away come back and get the token from the cache.
        assert post(broker.url, form).status_code == 200
        assert emulator.calls() == 1


# -- rate limits ---------------------------------------------------------------------------------


def test_garbage_flood_from_one_ip_is_cut_off_before_verification_and_folded(
    tmp_path, issuer, redis_url, emulator, prefix
):
    limit, flood = 20, 300
    config = write_config(
        tmp_path,
        issuer,
        redis_url,
        emulator,
        prefix,
        rate_limit={"per_client_ip_per_minute": limit, "per_subject_per_minute": 0},
        trusted_proxies=["127.0.0.1/32"],  # the test plays the proxy in front of the brokers
    )
    attacker, neighbour = {"X-Forwarded-For": "127.0.0.7"}, {"X-Forwarded-For": "127.0.0.8"}
    garbage = exchange_form("not-a-jwt-" + "A" * 64)
    with replicas(config) as brokers:
        quiet_minute()
        responses = fire(
            [lambda u=brokers[i % 2].url: post(u, garbage, headers=attacker) for i in range(flood)]
        )
        codes = Counter(r.status_code for r in responses)
        assert codes == {400: limit, 429: flood - limit}  # shared by both replicas
        assert all(int(r.headers["Retry-After"]) >= 1 for r in responses if r.status_code == 429)
        # Cut off before verification: even a valid token from that address is refused now.
        assert (
            post(brokers[0].url, exchange_form(issuer.token()), headers=attacker).status_code == 429
        )
        # Other clients behind the same proxy are unaffected.
        assert (
            post(brokers[1].url, exchange_form(issuer.token()), headers=neighbour).status_code
            == 200
        )
        assert emulator.calls() == 1

        def from_attacker() -> list[dict[str, Any]]:
            return [r for r in audit_records(brokers) if r["client_ip"] == "127.0.0.7"]

        # Every request is accounted for, folded into far fewer records.
        wait_for(lambda: sum(r["count"] for r in from_attacker()) == flood + 1, "folded counts")
        records = from_attacker()
        assert len(records) <= flood // 5
        assert {r["reason"] for r in records if r["reason"].startswith("rate_limited")} == {
            "rate_limited_client_ip"
        }
        assert sum(r["count"] for r in records if r["reason"] == "rate_limited_client_ip") == (
            flood - limit + 1
        )
        assert all(r["subject_verified"] is False for r in records)


def test_runaway_caller_gets_429_while_others_are_unaffected(
    tmp_path, issuer, redis_url, emulator, prefix
):
    limit = 20
    config = write_config(
        tmp_path,
        issuer,
        redis_url,
        emulator,
        prefix,
        rate_limit={"per_client_ip_per_minute": 0, "per_subject_per_minute": limit},
    )
    runaway = exchange_form(issuer.token())
    other = exchange_form(issuer.token("team-x", "runner"), audience="batch-b")
    with replicas(config) as brokers:
        quiet_minute()
        responses = fire([lambda u=brokers[i % 2].url: post(u, runaway) for i in range(2 * limit)])
        codes = Counter(r.status_code for r in responses)
        assert codes == {200: limit, 429: limit}
        for r in responses:
            if r.status_code == 429:
                assert r.json()["error"] == "slow_down"
                assert int(r.headers["Retry-After"]) >= 1
        assert [post(b.url, other).status_code for b in brokers] == [200, 200]
        reasons = Counter(r["reason"] for r in audit_records(brokers) if r["decision"] == "denied")
        assert set(reasons) == {"rate_limited_subject"}
