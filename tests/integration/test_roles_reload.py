"""Hot reload of roles.yaml under gunicorn (2 workers, real Redis): a valid edit, also by a
ConfigMap-style symlink swap, takes effect on every worker; each kind of invalid edit changes
nothing and is reported (log, metric, audit)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests.integration.conftest import run_broker
from tests.roles_support import (
    AUDITOR,
    audit_lines,
    bearer,
    metric,
    role,
    roles_config,
    wait_until,
    workers_loaded,
)
from tests.support import ROLES, SA_DOMAIN, exchange_form

pytestmark = pytest.mark.integration

WORKERS = 2


@pytest.fixture
def prefix(redis_client) -> Iterator[str]:
    p = f"tbroles-{uuid.uuid4().hex[:8]}:"
    yield p
    for key in redis_client.scan_iter(match=f"{p}*", count=1000):
        redis_client.delete(key)


def dump(*roles: dict[str, Any]) -> str:
    return yaml.safe_dump({"roles": list(roles)}, sort_keys=False)


class ConfigMap:
    """A ConfigMap volume: roles.yaml -> ..data/roles.yaml; ..data -> ..<n>; updates swap
    ..data with one rename, as the kubelet does."""

    def __init__(self, root: Path, text: str) -> None:
        self.root, self.n = root, 0
        root.mkdir()
        self._write(text)
        os.symlink(f"..{self.n}", root / "..data")
        os.symlink("..data/roles.yaml", root / "roles.yaml")

    def _write(self, text: str) -> None:
        self.n += 1
        (self.root / f"..{self.n}").mkdir()
        (self.root / f"..{self.n}" / "roles.yaml").write_text(text)

    def update(self, text: str) -> None:
        self._write(text)
        os.symlink(f"..{self.n}", self.root / "..tmp")
        os.replace(self.root / "..tmp", self.root / "..data")

    @property
    def path(self) -> Path:
        return self.root / "roles.yaml"


def reloads(logs: str, outcome: str) -> list[dict[str, Any]]:
    return [r for r in audit_lines(logs, "roles.reloaded") if r["details"]["outcome"] == outcome]


def wait_reloads(broker, outcome: str, total: int) -> list[dict[str, Any]]:
    """Until ``total`` reloads with ``outcome`` are audited; each edit yields one per worker."""
    return wait_until(
        lambda: (found := reloads(broker.logs(), outcome)) and len(found) >= total and found,
        f"{total} {outcome} reloads",
    )


def exchange(broker, ns: str, sa: str, issuer) -> requests.Response:
    return broker.token(exchange_form(issuer.token(ns, sa)))


def test_valid_and_invalid_edits_on_every_worker(tmp_path, issuer, redis_url, emulator, prefix) -> None:
    cm = ConfigMap(tmp_path / "cm", dump(*ROLES["roles"]))
    config = roles_config(
        tmp_path, issuer, redis_url=redis_url, iam_endpoint=emulator.url, prefix=prefix,
        roles_file=cm.path, workers=WORKERS,
    )
    with run_broker(config) as broker:
        # every worker has loaded the table (a worker still booting would load the edit itself)
        wait_until(lambda: len(workers_loaded(broker.url)) == WORKERS, "every worker up")

        def version() -> str:
            return requests.get(f"{broker.url}/v1/roles", headers=bearer(issuer, AUDITOR), timeout=5).json()["version"]

        # team-x/runner is admitted by batch-a (glob) and batch-b: ambiguous, refused
        assert exchange(broker, "team-x", "runner", issuer).json()["error"] == "invalid_target"

        # 1. a ConfigMap update (symlink swap) removes batch-b
        cm.update(dump(*ROLES["roles"][:2]))
        applied = wait_reloads(broker, "applied", WORKERS)
        assert len({r["writer"] for r in applied}) == WORKERS  # every worker, once each
        new_version = applied[0]["details"]["version"]
        assert {r["details"]["version"] for r in applied} == {new_version}
        assert applied[0]["details"]["diff"] == ["- batch-b"]
        for _ in range(10):  # whichever worker answers, the new table is in effect
            resp = exchange(broker, "team-x", "runner", issuer)
            assert resp.status_code == 200, resp.json()
            assert emulator.token_info(resp.json()["access_token"])["service_account"] == f"batch-a@{SA_DOMAIN}"
            assert version() == new_version

        # 2. each kind of invalid edit is refused by every worker; nothing changes
        invalid = {
            "yaml": "roles: [\n  - name: a\n",
            "unknown key": dump(role("flux-source-reader", lifetme="1h")),
            "outside allowed": dump(role("flux-source-reader", service_account="x@other.iam.gserviceaccount.com")),
            "lifetime": dump(role("flux-source-reader", lifetime="13h")),
            "unknown issuer": dump(role("flux-source-reader", subjects=[{"issuer": "nope", "namespace": "a", "service_account": "b"}])),
            "duplicate": dump(role("a"), role("a")),
            "bare star": dump(role("a", subjects=[{"issuer": "test", "namespace": "*", "service_account": "*"}])),
        }
        for n, (kind, text) in enumerate(invalid.items(), start=1):
            cm.update(text)
            refused = wait_reloads(broker, "refused", WORKERS * n)[-WORKERS:]
            assert len({r["writer"] for r in refused}) == WORKERS, kind
            assert all(r["decision"] == "denied" and r["details"]["problems"] for r in refused), kind
            assert all(r["details"]["location"] == str(cm.path) for r in refused)
            assert version() == new_version, kind
        assert len(reloads(broker.logs(), "applied")) == WORKERS  # no invalid edit applied
        resp = exchange(broker, "team-x", "runner", issuer)
        assert resp.status_code == 200
        problems = [p for r in reloads(broker.logs(), "refused") for p in r["details"]["problems"]]
        assert any("roles[0] (flux-source-reader).lifetme: unknown key" in p for p in problems)
        assert any("gcp.allowed_service_accounts" in p for p in problems)
        assert any(p.startswith("line ") for p in problems)
        assert "refused (the table in effect stays)" in broker.logs()
        refused_metric = metric(broker.url, "token_broker_roles_reloads_total")
        assert sum(v for k, v in refused_metric.items() if "refused" in k) == WORKERS * len(invalid)

        # 3. an in-place edit of the file (no symlink swap) is picked up as well
        target = cm.root / f"..{cm.n}" / "roles.yaml"
        target.write_text(dump(*ROLES["roles"]))
        applied = wait_reloads(broker, "applied", 2 * WORKERS)
        assert applied[-1]["details"]["diff"] == ["+ batch-b (service_account batch-b@test-project.iam.gserviceaccount.com; lifetime 30m; subjects test/team-x/runner)"]
        wait_until(lambda: version() != new_version, "the restored table")
        assert exchange(broker, "team-x", "runner", issuer).json()["error"] == "invalid_target"
