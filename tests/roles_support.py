"""Helpers for the role-mapping tests: broker configs with admins, auditors and a role source,
admin/auditor tokens, and unit brokers built like tests.conftest.make_broker."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import fakeredis
import yaml

from broker.app import create_app
from broker.settings import load_settings
from tests.conftest import BrokerUnderTest, FakeMinter
from tests.support import (
    ADMIN_AUDIENCE,
    AUDIT_SIGNING_KEY,
    CACHE_KEY,
    SA_DOMAIN,
    LocalIssuer,
    broker_config,
)

MAC_KEY = base64.b64encode(b"m" * 32).decode()
ADMIN = ("ops", "admin")  # namespace, service account: principal test/ops/admin
AUDITOR = ("sec", "auditor")
NOBODY = ("ops", "intern")
ENV = {
    "BROKER_CACHE_KEYS": CACHE_KEY,
    "BROKER_AUDIT_SIGNING_KEY": AUDIT_SIGNING_KEY,
    "BROKER_ROLES_MAC_KEY": MAC_KEY,
}


def role(name: str, ns: str = "flux-system", sa: str = "source-controller", **over: Any) -> dict[str, Any]:
    r: dict[str, Any] = {
        "name": name,
        "subjects": [{"issuer": "test", "namespace": ns, "service_account": sa}],
        "service_account": f"{name}@{SA_DOMAIN}",
        "scopes": ["https://www.googleapis.com/auth/cloud-platform"],
        "lifetime": "1h",
    }
    r.update(over)
    return r


def roles_config(
    tmp: Path,
    issuer: LocalIssuer,
    *,
    source: str = "file",
    roles: dict[str, Any] | None = None,
    roles_file: Path | None = None,
    **kw: Any,
) -> Path:
    """broker_config plus admins/auditors and ``roles.source`` (``roles_file``: watch that
    path instead); returns broker.yaml."""
    path = broker_config(tmp, issuer, roles=roles, **kw)
    cfg = yaml.safe_load(path.read_text())
    cfg["access"]["admins"] = [f"test/{ADMIN[0]}/{ADMIN[1]}"]
    cfg["access"]["auditors"] = [f"test/{AUDITOR[0]}/{AUDITOR[1]}"]
    if source == "redis":
        cfg["roles"] = {"source": "redis"}
    elif roles_file is not None:
        cfg["roles"]["file"] = str(roles_file)
    path.write_text(yaml.safe_dump(cfg))
    return path


def make_roles_broker(
    tmp: Path, issuer: LocalIssuer, *, source: str = "file", **kw: Any
) -> BrokerUnderTest:
    """A unit broker (fakeredis, FakeMinter) with admins, auditors and the given source."""
    settings = load_settings(roles_config(tmp, issuer, source=source, **kw))
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    minter = FakeMinter()
    out = io.StringIO()
    return BrokerUnderTest(roles_app(settings, client, minter, out), settings, client, minter,
                           out, issuer)


def roles_app(settings: Any, client: Any, minter: FakeMinter, out: io.StringIO) -> Any:
    """A broker app on ``client`` (fakeredis) whose role poller is stopped: tests drive
    refresh() themselves. Two on one client are two replicas."""
    app = create_app(settings, redis_client=client, minter=minter, env=ENV, audit_out=out)
    app.extensions["broker"].role_admin.source.close()
    return app


def bearer(issuer: LocalIssuer, who: tuple[str, str] = ADMIN) -> dict[str, str]:
    return {"Authorization": f"Bearer {issuer.token(*who, audience=ADMIN_AUDIENCE)}"}


def audit_lines(logs: str, event: str) -> list[dict[str, Any]]:
    """Audit records of ``event`` from a broker's stdout (the off-Redis witness)."""
    import json

    out = []
    for line in logs.splitlines():
        if not line.startswith("{"):
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        rec = rec.get("audit", rec) if isinstance(rec, dict) else None
        if isinstance(rec, dict) and rec.get("event") == event:
            out.append(rec)
    return out


def wait_until(check: Any, what: str, attempts: int = 200, pause: float = 0.1) -> Any:
    """Poll ``check()`` until truthy, a bounded number of times; fail naming ``what``."""
    import time

    for _ in range(attempts):
        value = check()
        if value:
            return value
        time.sleep(pause)
    raise AssertionError(f"gave up waiting: {what}")


def metric(url: str, name: str) -> dict[tuple[str, ...], float]:
    """Samples of ``name`` from a broker's /metrics, keyed by their label values (sorted by
    label name), summed."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"{url}/metrics", timeout=5).text
    out: dict[tuple[str, ...], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                key = tuple(s.labels[k] for k in sorted(s.labels))
                out[key] = out.get(key, 0) + s.value
    return out


def workers_loaded(url: str) -> list[tuple[str, ...]]:
    """Worker processes (pid label) that have a role table in effect (the master's is 0)."""
    return [k for k, v in metric(url, "token_broker_roles_loaded_seconds").items() if v > 0]


def worker_revisions(url: str) -> list[float]:
    """The Redis role-table revision in effect in each worker that has loaded one."""
    return [v for v in metric(url, "token_broker_roles_revision").values() if v > 0]
