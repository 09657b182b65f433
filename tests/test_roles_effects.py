"""Tests for broker.roles_effects (reload reports, purge of changed roles) and the cache's
purge indexes (broker.cache.TokenCache.index / purge_role / purge_service_account)."""

from __future__ import annotations

import base64
import io
from typing import Any

import fakeredis
import pytest

from broker.audit import AuditLog
from broker.cache import CacheKeys, TokenCache, role_cache_key
from broker.model import AccessToken
from broker.policy import Problem, RoleRules, RoleTable, check_role_table
from broker.roles_effects import RELOADS, RoleEffects, problem_text
from broker.roles_source import Reload
from tests.support import FakeClock

SA_DOMAIN = "p.iam.gserviceaccount.com"
RULES = RoleRules(issuers={"prod": "kubernetes"}, allowed_service_accounts=(f"*@{SA_DOMAIN}",))


def role(name: str, **over: Any) -> dict[str, Any]:
    r: dict[str, Any] = {
        "name": name,
        "subjects": [{"issuer": "prod", "namespace": "ns", "service_account": name}],
        "service_account": f"{name}@{SA_DOMAIN}",
        "scopes": ["https://www.googleapis.com/auth/cloud-platform"],
        "lifetime": "1h",
    }
    r.update(over)
    return r


def table(*roles: dict[str, Any]) -> RoleTable:
    return check_role_table({"roles": list(roles)}, source="t", rules=RULES).table_or_raise()


Clock = FakeClock


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def client():
    return fakeredis.FakeRedis(server=fakeredis.FakeServer())


@pytest.fixture
def cache(client, clock) -> TokenCache:
    keys = CacheKeys.parse(base64.b64encode(b"c" * 32).decode())
    return TokenCache(client, keys, prefix="t:", clock=clock)


@pytest.fixture
def audit(client, clock) -> AuditLog:
    return AuditLog(client, prefix="t:", out=io.StringIO(), clock=clock)


def cached(cache: TokenCache, t: RoleTable, name: str, clock: Clock) -> str:
    key = role_cache_key(t.get(name))
    cache.put(key, AccessToken(token=f"ya29.{name}", expires_at=clock.now + 3600))
    return key


# --- cache indexes -------------------------------------------------------------------------------


def test_purge_by_role_and_service_account_through_the_index(cache, clock) -> None:
    t = table(role("a"), role("b", service_account=f"a@{SA_DOMAIN}"), role("c"))
    keys = {n: cached(cache, t, n, clock) for n in "abc"}
    for r in t.roles:
        cache.index(role_cache_key(r), role=r.name, service_account=r.service_account, keep_s=600)
    assert cache.purge_role("a") == 1
    assert cache.get(keys["a"]) is None and cache.get(keys["b"]) is not None
    assert cache.purge_service_account(f"a@{SA_DOMAIN}") == 1  # b: the same GCP account
    assert cache.get(keys["b"]) is None and cache.get(keys["c"]) is not None
    assert cache.purge_role("nothing-here") == 0


def test_purge_covers_keys_given_directly_and_old_definitions(cache, clock) -> None:
    old, new = table(role("a")), table(role("a", lifetime="30m"))
    k_old, k_new = cached(cache, old, "a", clock), cached(cache, new, "a", clock)
    assert k_old != k_new
    r = old.get("a")
    cache.index(k_old, role="a", service_account=r.service_account, keep_s=600)
    assert cache.purge_role("a", also=[k_new]) == 2


def test_index_entries_expire_once_no_token_can_remain(cache, client, clock) -> None:
    r = table(role("a")).get("a")
    cache.index("k1", role="a", service_account=r.service_account, keep_s=60)
    clock.now += 61
    cache.index("k2", role="a", service_account=r.service_account, keep_s=60)
    members = client.zrange("t:cache-index:role:a", 0, -1)
    assert members == [b"k2"]
    assert 0 < client.ttl("t:cache-index:role:a") <= 13 * 3600


# --- reload effects ------------------------------------------------------------------------------


def records(audit: AuditLog, event: str) -> list[dict[str, Any]]:
    return [r for r in audit.recent(100) if r["event"] == event]


def effects(audit, cache, clock, *, applied: bool = True) -> RoleEffects:
    return RoleEffects(audit=audit, cache=cache, audit_applied_reloads=applied, clock=clock)


def test_applied_file_reload_purges_changed_roles_and_is_audited(audit, cache, clock) -> None:
    before = table(role("a"), role("b"), role("gone"))
    after = table(role("a"), role("b", lifetime="30m"), role("new"))
    keys = {n: cached(cache, before, n, clock) for n in ("a", "b", "gone")}
    fx = effects(audit, cache, clock)
    fx.on_reload(Reload("file", "/etc/roles.yaml", True, "reloaded", before, after))
    assert cache.get(keys["a"]) is not None  # unchanged role keeps its token
    assert cache.get(keys["b"]) is None and cache.get(keys["gone"]) is None
    [reload] = records(audit, "roles.reloaded")
    assert reload["decision"] == "issued" and reload["reason"] == "reloaded"
    d = reload["details"]
    assert (d["outcome"], d["version"], d["previous_version"]) == (
        "applied",
        after.digest,
        before.digest,
    )
    assert d["purged"] == 2 and d["location"] == "/etc/roles.yaml"
    assert '~ b: lifetime "1h" -> "30m"' in d["diff"] and "- gone" in d["diff"]
    purges = records(audit, "cache.purged")
    assert sorted(p["role"] for p in purges) == ["b", "gone"]
    assert all(p["reason"] == "role_changed" and p["details"]["purged"] == 1 for p in purges)


def test_refused_reload_is_audited_with_its_problems(audit, cache, clock) -> None:
    before = table(role("a"))
    problem = Problem(("roles", 0, "lifetime"), "roles[0] (a).lifetime: 5m is below", line=7)
    fx = effects(audit, cache, clock)
    counter = RELOADS.labels("file", "refused", "invalid_table")
    start = counter._value.get()
    fx.on_reload(Reload("file", "r.yaml", False, "invalid_table", before, problems=(problem,)))
    [rec] = records(audit, "roles.reloaded")
    assert rec["decision"] == "denied" and rec["reason"] == "invalid_table"
    assert rec["details"]["problems"] == ["line 7: roles[0] (a).lifetime: 5m is below"]
    assert rec["details"]["version"] is None and rec["details"]["previous_version"] == before.digest
    assert counter._value.get() == start + 1


def test_integrity_refusal_is_an_error_record(audit, cache, clock, caplog) -> None:
    fx = effects(audit, cache, clock, applied=False)
    problem = Problem((), "the stored role table's MAC does not verify")
    with caplog.at_level("CRITICAL"):
        fx.on_reload(Reload("redis", "t:{roles}:current", False, "bad_mac", table(), problems=(problem,)))
    [rec] = records(audit, "roles.reloaded")
    assert rec["decision"] == "error" and rec["reason"] == "bad_mac"
    assert any("ALARM" in r.message for r in caplog.records)


def test_redis_mode_does_not_audit_applied_reloads(audit, cache, clock) -> None:
    fx = effects(audit, cache, clock, applied=False)
    fx.on_reload(Reload("redis", "k", True, "reloaded", None, table(role("a")), revision=3))
    assert records(audit, "roles.reloaded") == []


def test_problem_text() -> None:
    assert problem_text(Problem((), "x", 3)) == "line 3: x"
    assert problem_text(Problem((), "x")) == "x"
