"""Tests for broker.roles_source: the watched file (incl. ConfigMap symlink swaps) and the
MACed Redis table, each refusing anything invalid whole and keeping the last good table."""

from __future__ import annotations

import base64
import json
import os
import threading
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import yaml

from broker.errors import ConfigError
from broker.policy import RoleRules, check_role_table
from broker.roles_source import FileRoleSource, RedisRoleSource, Reload
from broker.roles_store import MacKeys, NewVersion, RedisRoleStore

SA_DOMAIN = "p.iam.gserviceaccount.com"
RULES = RoleRules(issuers={"prod": "kubernetes"}, allowed_service_accounts=(f"*@{SA_DOMAIN}",))
KEY = MacKeys.parse(base64.b64encode(b"k" * 32).decode())


def role(name: str, **over: Any) -> dict[str, Any]:
    r: dict[str, Any] = {
        "name": name,
        "subjects": [{"issuer": "prod", "namespace": "flux-system", "service_account": name}],
        "service_account": f"{name}@{SA_DOMAIN}",
        "scopes": ["https://www.googleapis.com/auth/cloud-platform"],
        "lifetime": "1h",
    }
    r.update(over)
    return r


def dump(*roles: dict[str, Any]) -> str:
    return yaml.safe_dump({"roles": list(roles)})


class Events(list[Reload]):
    def __call__(self, event: Reload) -> None:
        self.append(event)


# --- file ----------------------------------------------------------------------------------------


@pytest.fixture
def roles_file(tmp_path: Path) -> Path:
    path = tmp_path / "roles.yaml"
    path.write_text(dump(role("a")))
    return path


def file_source(path: Path, events: Events | None = None) -> FileRoleSource:
    return FileRoleSource(path, RULES, on_reload=events)


def rewrite(path: Path, text: str) -> None:
    """Write and make sure the stat changes even on coarse-mtime filesystems."""
    old = os.stat(path).st_mtime_ns if path.exists() else 0
    path.write_text(text)
    os.utime(path, ns=(old + 1_000_000_000, old + 1_000_000_000))


def test_file_loads_at_start_and_refuses_an_invalid_start(roles_file: Path) -> None:
    source = file_source(roles_file)
    assert [r.name for r in source.current().roles] == ["a"]
    assert source.kind == "file" and not source.writable and source.revision is None
    roles_file.write_text("roles: [")
    with pytest.raises(ConfigError):
        file_source(roles_file)


def test_valid_edit_is_swapped_in(roles_file: Path) -> None:
    events = Events()
    source = file_source(roles_file, events)
    old = source.current()
    assert source.refresh() is None  # nothing changed
    rewrite(roles_file, dump(role("a", lifetime="30m"), role("b")))
    event = source.refresh()
    assert event is not None and event.applied and event.reason == "reloaded"
    assert event.before is old and event.after is source.current()
    assert {r.name for r in source.current().roles} == {"a", "b"}
    assert source.current().get("a").lifetime_s == 1800
    assert events == [event] and source.reloads["applied"] == 1
    assert source.refresh() is None


def test_comment_only_edit_is_not_a_change(roles_file: Path) -> None:
    source = file_source(roles_file)
    rewrite(roles_file, "# reviewed\n" + roles_file.read_text())
    assert source.refresh() is None and source.reloads["applied"] == 0


def configmap_dir(tmp_path: Path, text: str) -> Path:
    """Kubernetes' ConfigMap volume layout: roles.yaml -> ..data/roles.yaml, ..data -> ..ts1."""
    mount = tmp_path / "mount"
    (mount / "..ts1").mkdir(parents=True)
    (mount / "..ts1" / "roles.yaml").write_text(text)
    os.symlink("..ts1", mount / "..data")
    os.symlink("..data/roles.yaml", mount / "roles.yaml")
    return mount


def swap(mount: Path, name: str, text: str, *, like: Path | None = None) -> None:
    """What the kubelet does: write a new timestamped dir, then rename a new ..data over the
    old one (one atomic rename); the file itself is never written in place."""
    new = mount / name
    new.mkdir()
    (new / "roles.yaml").write_text(text)
    if like is not None:  # same times as the old file: only the symlink target changed
        st = os.stat(like)
        os.utime(new / "roles.yaml", ns=(st.st_atime_ns, st.st_mtime_ns))
    os.symlink(name, mount / "..data_tmp")
    os.replace(mount / "..data_tmp", mount / "..data")


def test_configmap_symlink_swap_is_seen(tmp_path: Path) -> None:
    mount = configmap_dir(tmp_path, dump(role("a")))
    source = file_source(mount / "roles.yaml")
    # Same length and the same mtime as the old file: only the resolved path tells.
    swap(mount, "..ts2", dump(role("b")), like=mount / "..ts1" / "roles.yaml")
    event = source.refresh()
    assert event is not None and event.applied
    assert [r.name for r in source.current().roles] == ["b"]
    # an invalid ConfigMap update is refused like an invalid edit
    swap(mount, "..ts3", dump(role("c", lifetime="5m")))
    event = source.refresh()
    assert event is not None and not event.applied and event.reason == "invalid_table"
    assert [r.name for r in source.current().roles] == ["b"]


INVALID_EDITS = {
    "yaml syntax": ("roles: [\n  - name: a\n", "not valid YAML"),
    "unknown key": (dump(role("a", lifetme="1h")), "roles[0] (a).lifetme: unknown key"),
    "outside allowed service accounts": (
        dump(role("a", service_account="a@other.iam.gserviceaccount.com")),
        "roles[0] (a).service_account",
    ),
    "lifetime out of range": (dump(role("a", lifetime="13h")), "roles[0] (a).lifetime"),
    "unknown issuer": (
        dump(role("a", subjects=[{"issuer": "staging", "namespace": "x", "service_account": "y"}])),
        "roles[0] (a).subjects[0].issuer: unknown issuer",
    ),
    "duplicate name": (dump(role("a"), role("a")), "roles[1] (a).name: duplicate"),
    "bare star namespace": (
        dump(role("a", subjects=[{"issuer": "prod", "namespace": "*", "service_account": "*"}])),
        "roles[0] (a).subjects[0].namespace",
    ),
    "bad scope": (dump(role("a", scopes=["cloud-platform"])), "roles[0] (a).scopes[0]"),
    "not a mapping": ("- just a list\n", "(top level)"),
    "not utf-8": (None, "not UTF-8"),
}


@pytest.mark.parametrize("kind", sorted(INVALID_EDITS))
def test_each_invalid_edit_changes_nothing_and_is_reported_once(roles_file: Path, kind: str) -> None:
    events = Events()
    source = file_source(roles_file, events)
    good = source.current()
    text, needle = INVALID_EDITS[kind]
    if text is None:
        roles_file.write_bytes(b"roles: \xff\xfe\n")
        os.utime(roles_file, ns=(1, 1))
    else:
        rewrite(roles_file, text)
    event = source.refresh()
    assert event is not None and not event.applied
    assert event.reason in ("invalid_table", "unreadable")
    assert event.location == str(roles_file)
    assert any(needle in p.message for p in event.problems), event.problems
    assert source.current() is good  # the old table stays, whole
    assert source.refresh() is None  # reported once, not on every poll
    assert events == [event] and source.reloads["refused"] == 1
    # fixing the file is picked up
    rewrite(roles_file, dump(role("a"), role("z")))
    fixed = source.refresh()
    assert fixed is not None and fixed.applied and fixed.before is good


def test_missing_file_keeps_the_table(roles_file: Path) -> None:
    source = file_source(roles_file)
    good = source.current()
    roles_file.unlink()
    event = source.refresh()
    assert event is not None and event.reason == "unreadable" and not event.applied
    assert source.refresh() is None and source.current() is good
    rewrite(roles_file, dump(role("a"), role("b")))
    assert source.refresh().applied


def test_invalid_problems_carry_lines(roles_file: Path) -> None:
    source = file_source(roles_file)
    rewrite(roles_file, dump(role("a", lifetime="5m")))
    event = source.refresh()
    [problem] = event.problems
    assert problem.line is not None and "lifetime" in problem.message


def test_watcher_thread_picks_up_an_edit(roles_file: Path) -> None:
    seen = threading.Event()
    events = Events()

    def report(event: Reload) -> None:
        events(event)
        seen.set()

    source = FileRoleSource(roles_file, RULES, on_reload=report, poll_s=0.05)
    source.start()
    try:
        rewrite(roles_file, dump(role("a"), role("b")))
        assert seen.wait(10), "the watcher never reported the edit"
        assert events[0].applied and len(source.current().roles) == 2
    finally:
        source.close()


def test_a_failing_reporter_does_not_undo_the_reload(roles_file: Path) -> None:
    def broken(event: Reload) -> None:
        raise RuntimeError("reporting failed")

    source = FileRoleSource(roles_file, RULES, on_reload=broken)
    rewrite(roles_file, dump(role("a"), role("b")))
    assert source.refresh().applied and len(source.current().roles) == 2


# --- redis ---------------------------------------------------------------------------------------


@pytest.fixture
def redis_client():
    return fakeredis.FakeRedis(server=fakeredis.FakeServer())


@pytest.fixture
def store(redis_client) -> RedisRoleStore:
    return RedisRoleStore(redis_client, KEY, prefix="t:")


def put(store: RedisRoleStore, *roles: dict[str, Any], by: str = "test/ops/admin") -> None:
    table = check_role_table({"roles": list(roles)}, source="t", rules=RULES).table_or_raise()
    store.commit(
        lambda b, p: NewVersion(table.to_data(), table.digest, changed_by=by, operation="put")
    )


def redis_source(store: RedisRoleStore, events: Events | None = None) -> RedisRoleSource:
    return RedisRoleSource(store, RULES, on_reload=events, full_check_every=1000)


def test_redis_starts_empty_and_denies(store) -> None:
    source = redis_source(store)
    assert source.current().roles == () and source.revision == 0 and source.writable


def test_redis_change_is_seen_through_the_revision_counter(store) -> None:
    events = Events()
    source = redis_source(store, events)
    put(store, role("a"))
    assert [r.name for r in source.current().roles] == ["a"]  # first use loads
    put(store, role("a"), role("b"), by="test/ops/other")
    event = source.refresh()
    assert event is not None and event.applied and event.revision == 2
    assert event.changed_by == "test/ops/other"
    assert [r.name for r in source.current().roles] == ["a", "b"]
    assert source.version.revision == 2 and source.refresh() is None


def tamper(client, edit) -> None:
    env = json.loads(client.get("t:{roles}:current"))
    edit(env)
    client.set("t:{roles}:current", json.dumps(env))


def test_redis_table_edited_behind_the_brokers_back_is_refused(store, redis_client) -> None:
    events = Events()
    source = redis_source(store, events)
    put(store, role("a"))
    good = source.current()
    evil = role("a", service_account=f"owner@{SA_DOMAIN}")
    tamper(redis_client, lambda e: e["table"].update(roles=[evil]))
    redis_client.incr("t:{roles}:revision")
    event = source.refresh()
    assert event is not None and not event.applied and event.reason == "bad_mac"
    assert event.integrity
    assert source.current() is good and source.refresh() is None  # alarmed once
    # an honest write replaces it and is accepted again
    put(store, role("a"), role("b"))
    assert source.refresh().applied and len(source.current().roles) == 2


def test_redis_tampering_without_a_revision_bump_is_found_by_the_full_check(
    store, redis_client
) -> None:
    source = redis_source(store)
    put(store, role("a"))
    good = source.current()
    tamper(redis_client, lambda e: e.update(changed_by="x"))
    assert source.refresh() is None  # the cheap check sees the same revision
    event = source.refresh(full=True)
    assert event is not None and event.reason == "bad_mac" and source.current() is good


def test_redis_periodic_full_check(store, redis_client) -> None:
    source = RedisRoleSource(store, RULES, full_check_every=3)
    put(store, role("a"))
    source.current()
    tamper(redis_client, lambda e: e.update(changed_by="x"))
    outcomes = [source.refresh() for _ in range(3)]
    assert [e.reason if e else None for e in outcomes].count("bad_mac") == 1


def test_redis_rollback_to_an_old_version_is_refused(store, redis_client) -> None:
    put(store, role("a"))
    old = redis_client.get("t:{roles}:current")
    put(store, role("b"))
    source = redis_source(store)
    assert [r.name for r in source.current().roles] == ["b"]
    redis_client.set("t:{roles}:current", old)  # validly MACed, but revision 1 < 2
    event = source.refresh(full=True)
    assert event is not None and event.reason == "rollback" and not event.applied
    assert [r.name for r in source.current().roles] == ["b"]


def test_redis_vanished_table_is_refused(store, redis_client) -> None:
    put(store, role("a"))
    source = redis_source(store)
    good = source.current()
    redis_client.delete("t:{roles}:current")
    event = source.refresh(full=True)
    assert event is not None and event.reason == "vanished" and source.current() is good


def test_redis_version_invalid_under_current_rules_is_refused(store) -> None:
    put(store, role("a"), role("b"))
    narrower = RoleRules(issuers={"prod": "kubernetes"}, allowed_service_accounts=(f"a@{SA_DOMAIN}",))
    events = Events()
    source = RedisRoleSource(store, narrower, on_reload=events)
    assert source.current().roles == ()  # nothing good to keep: fail closed
    [event] = events
    assert event.reason == "invalid_table" and "roles[1] (b).service_account" in event.problems[0].message


def test_tampered_store_at_start_fails_closed(store, redis_client) -> None:
    put(store, role("a"))
    tamper(redis_client, lambda e: e.update(changed_by="x"))
    events = Events()
    source = redis_source(store, events)
    assert source.current().roles == ()
    assert [e.reason for e in events] == ["bad_mac"]


def test_concurrent_refreshes_report_in_the_order_they_applied(store) -> None:
    """The poller and an admin read may refresh at once: a reload that is slow to report
    (purging, auditing) is still reported before a later one, so the revision gauge and the
    audit never step back."""
    reported: list[int | None] = []
    first_reporting, release = threading.Event(), threading.Event()

    def on_reload(event: Reload) -> None:
        if event.revision == 2:
            first_reporting.set()
            release.wait(5)
        reported.append(event.revision)

    source = RedisRoleSource(store, RULES, on_reload=on_reload, full_check_every=1000)
    put(store, role("a"))
    source.current()
    put(store, role("a"), role("b"))
    slow = threading.Thread(target=source.refresh)
    slow.start()
    assert first_reporting.wait(5)  # revision 2 applied, its report under way
    put(store, role("a"), role("b"), role("c"))
    later = threading.Thread(target=source.refresh)
    later.start()
    later.join(0.3)
    assert later.is_alive()  # waits for revision 2's report
    release.set()
    slow.join(5)
    later.join(5)
    assert reported == [1, 2, 3]
    assert [r.name for r in source.current().roles] == ["a", "b", "c"]
