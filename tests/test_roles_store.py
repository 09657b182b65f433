"""Tests for broker.roles_store: MAC keys, MACed versions, compare-and-set, history."""

from __future__ import annotations

import base64
import json

import fakeredis
import pytest

from broker.errors import ConfigError, PreconditionFailed, StoreUnavailable
from broker.roles_store import (
    HISTORY_LENGTH,
    MacKeys,
    NewVersion,
    RedisRoleStore,
    TableIntegrityError,
)

KEY_A = base64.b64encode(b"a" * 32).decode()
KEY_B = base64.b64encode(b"b" * 40).decode()


def table(n: int = 1) -> dict:
    return {"roles": [{"name": f"r{i}"} for i in range(n)]}


def plan(n: int = 1, by: str = "test/ops/admin", op: str = "put_table") -> NewVersion:
    return NewVersion(data=table(n), digest=f"digest-{n}", changed_by=by, operation=op)


@pytest.fixture
def client():
    return fakeredis.FakeRedis(server=fakeredis.FakeServer())


@pytest.fixture
def store(client):
    return RedisRoleStore(client, MacKeys.parse(KEY_A), prefix="t:", clock=lambda: 1000.0)


def write(store: RedisRoleStore, n: int = 1):
    return store.commit(lambda before, problem: plan(n))


# --- keys ----------------------------------------------------------------------------------------


def test_mac_keys_parse_and_hide() -> None:
    keys = MacKeys.parse(f" {KEY_A} , {KEY_B.replace('+', '-')},{KEY_A}")
    assert len(keys.keys) == 2 and len(keys.kids) == 2
    assert "aaaa" not in repr(keys) and KEY_A not in repr(keys)
    assert len(base64.b64decode(MacKeys.generate())) == 32


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("", "not set"),
        ("   ", "not set"),
        ("!!!", "entry 1: not base64"),
        (f"{KEY_A},{base64.b64encode(b'short').decode()}", "entry 2: 5 bytes"),
    ],
)
def test_mac_keys_refuse_bad_values(value: str, needle: str) -> None:
    with pytest.raises(ConfigError) as ei:
        MacKeys.parse(value, env_var="MY_ENV")
    assert ei.value.source == "MY_ENV"
    assert any(needle in p for p in ei.value.problems)
    assert all(KEY_A not in p for p in ei.value.problems)


# --- versions ------------------------------------------------------------------------------------


def test_empty_store(store) -> None:
    assert store.read() is None and store.revision() == 0 and store.history() == []


def test_commit_read_round_trip(store, client) -> None:
    before, after = write(store, 2)
    assert before is None and after is not None
    assert (after.revision, after.digest, after.changed_by, after.previous) == (
        1,
        "digest-2",
        "test/ops/admin",
        None,
    )
    read = store.read()
    assert read == after
    assert store.revision() == 1
    _, second = write(store, 3)
    assert second.revision == 2 and second.previous == "digest-2"
    assert [v.revision for v in store.history()] == [2, 1]
    # keys share one hash tag (one slot on Redis Cluster)
    assert {k.decode() for k in client.keys("t:*")} == {
        "t:{roles}:current",
        "t:{roles}:revision",
        "t:{roles}:history",
    }


def test_build_may_decline_or_refuse(store) -> None:
    write(store)
    before, after = store.commit(lambda b, p: None)
    assert before is not None and after is None and store.revision() == 1

    def refuse(b, p):
        raise PreconditionFailed("stale")

    with pytest.raises(PreconditionFailed):
        store.commit(refuse)
    assert store.revision() == 1


def test_concurrent_commit_reruns_build_on_the_new_version(store, client) -> None:
    write(store)
    other = RedisRoleStore(client, MacKeys.parse(KEY_A), prefix="t:")
    seen = []

    def build(before, problem):
        seen.append(before.revision)
        if len(seen) == 1:
            write(other, 5)  # lands between this build's read and its commit
        return plan(9)

    _, after = store.commit(build)
    assert seen == [1, 2]  # the first attempt was discarded, the second saw revision 2
    assert after.revision == 3 and after.previous == "digest-5"


def test_history_is_bounded(store) -> None:
    for n in range(HISTORY_LENGTH + 5):
        write(store, n)
    history = store.history(HISTORY_LENGTH + 10)
    assert len(history) == HISTORY_LENGTH
    assert history[0].revision == HISTORY_LENGTH + 5


# --- integrity -----------------------------------------------------------------------------------


def tamper(client, edit) -> None:
    env = json.loads(client.get("t:{roles}:current"))
    edit(env)
    client.set("t:{roles}:current", json.dumps(env))


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda e: e["table"]["roles"].append({"name": "evil"}), "bad_mac"),
        (lambda e: e.update(changed_by="someone-else"), "bad_mac"),
        (lambda e: e.update(revision=99), "bad_mac"),
        (lambda e: e.update(kid="deadbeef"), "unknown_key"),
        (lambda e: e.pop("mac"), "malformed"),
        (lambda e: e.update(mac="é"), "malformed"),  # compare_digest refuses non-ASCII
        (lambda e: e.update(mac="g" * 64), "malformed"),
        (lambda e: e.update(v=2), "malformed"),
    ],
)
def test_edits_behind_the_brokers_back_are_refused(store, client, edit, reason) -> None:
    write(store)
    tamper(client, edit)
    with pytest.raises(TableIntegrityError) as ei:
        store.read()
    assert ei.value.reason == reason and len(ei.value.fingerprint) == 64


@pytest.mark.parametrize("raw", [b"\xff not json", b"[" * 100_000, b"[" * 100_000 + b"]" * 100_000])
def test_garbage_is_refused(store, client, raw) -> None:
    client.set("t:{roles}:current", raw)
    with pytest.raises(TableIntegrityError) as ei:
        store.read()
    assert ei.value.reason == "malformed"


def test_garbage_revision_makes_readers_look(store, client) -> None:
    client.set("t:{roles}:revision", "abc")
    assert store.revision() == -1


def test_a_version_from_another_prefix_does_not_verify(store, client) -> None:
    write(store)
    other = RedisRoleStore(client, MacKeys.parse(KEY_A), prefix="u:")
    client.set(other.current_key, client.get(store.current_key))
    with pytest.raises(TableIntegrityError) as ei:
        other.read()
    assert ei.value.reason == "bad_mac"


def test_key_rotation_old_versions_still_verify(client) -> None:
    old = RedisRoleStore(client, MacKeys.parse(KEY_A), prefix="t:")
    write(old)
    rotated = RedisRoleStore(client, MacKeys.parse(f"{KEY_B},{KEY_A}"), prefix="t:")
    assert rotated.read().revision == 1
    write(rotated, 2)
    assert old.history()[0].__class__ is TableIntegrityError  # signed with the new key
    assert rotated.read().revision == 2


def test_commit_over_a_tampered_version_sees_the_problem(store, client) -> None:
    write(store)
    tamper(client, lambda e: e.update(changed_by="x"))
    seen = []

    def build(before, problem):
        seen.append((before, problem.reason if problem else None))
        return plan(4)

    _, after = store.commit(build)
    assert seen == [(None, "bad_mac")]
    assert after.revision == 2 and store.read().revision == 2  # the counter still counts up


def test_redis_down_is_store_unavailable() -> None:
    server = fakeredis.FakeServer()
    server.connected = False
    s = RedisRoleStore(fakeredis.FakeRedis(server=server), MacKeys.parse(KEY_A))
    with pytest.raises(StoreUnavailable):
        s.revision()
    with pytest.raises(StoreUnavailable):
        s.commit(lambda b, p: plan())
