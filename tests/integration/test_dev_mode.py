"""The README's run command from a fresh clone: dev mode works as printed."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import stop, wait_http
from tests.support import REPO, free_port

pytestmark = pytest.mark.integration


def _fresh_clone(tmp_path: Path) -> Path:
    """A clone of HEAD plus the working tree's changes (so uncommitted work is tested too)."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    diff = subprocess.run(["git", "diff", "HEAD", "--binary"], cwd=REPO, capture_output=True, check=True).stdout
    if diff:
        subprocess.run(["git", "apply", "--whitespace=nowarn"], cwd=clone, input=diff, check=True)
    untracked = subprocess.run(
        ["git", "ls-files", "--others", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    for rel in untracked:
        (clone / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, clone / rel)
    return clone


@pytest.fixture(scope="module")
def dev_broker(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dev")
    clone = _fresh_clone(tmp)
    port = free_port()
    out = (tmp / "dev.out").open("wb")
    env = dict(os.environ)
    env.pop("VIRTUAL_ENV", None)
    # The README's run command, exactly (it installs into the clone's own .venv).
    proc = subprocess.Popen(
        ["scripts/dev.sh", "--bind", f"127.0.0.1:{port}"],
        cwd=clone, stdout=out, stderr=subprocess.STDOUT, env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/healthz", proc, timeout=600)
        deadline = time.monotonic() + 30
        while "GOOGLE_APPLICATION_CREDENTIALS=" not in (tmp / "dev.out").read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        yield clone, url, (tmp / "dev.out").read_text()
    finally:
        stop(proc)


def test_printed_credentials_work_with_unmodified_google_auth(dev_broker):
    clone, url, printed = dev_broker
    m = re.search(r"export GOOGLE_APPLICATION_CREDENTIALS=(\S+)", printed)
    assert m, printed
    env = dict(os.environ, GOOGLE_APPLICATION_CREDENTIALS=m.group(1))
    code = (
        "import google.auth, google.auth.transport.requests as r\n"
        "c, _ = google.auth.default(scopes=['https://www.googleapis.com/auth/cloud-platform'])\n"
        "c.refresh(r.Request())\n"
        "print(c.token)\n"
    )
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ya29.emulator.")


def test_printed_curl_works(dev_broker):
    clone, url, printed = dev_broker
    lines = printed.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("curl "))
    cmd = []
    for line in lines[start:]:
        cmd.append(line.strip().rstrip("\\"))
        if not line.rstrip().endswith("\\"):
            break
    if shutil.which("curl") is None:
        pytest.fail("curl is needed to check the printed command")
    out = subprocess.run(" ".join(cmd), shell=True, capture_output=True, text=True, timeout=30, cwd=clone)
    body = json.loads(out.stdout)
    assert body["token_type"] == "Bearer" and body["access_token"].startswith("ya29.emulator.")


def test_dev_files_are_private_and_ignored(dev_broker):
    clone, _, _ = dev_broker
    d = clone / ".token-broker-dev"
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    names = {p.name for p in d.iterdir()}
    assert {"subject-token.jwt", "credentials.json", "admin-token.jwt", "auditor-token.jwt",
            "jwks.json", "broker.yaml", "roles.yaml"} <= names
    for p in d.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    ignored = subprocess.run(["git", "check-ignore", ".token-broker-dev/credentials.json"], cwd=clone)
    assert ignored.returncode == 0


def test_token_cli_exit_codes(dev_broker):
    clone, url, _ = dev_broker
    d = clone / ".token-broker-dev"
    cli = [sys.executable, "-m", "broker.cli", "token", "--server", url]
    ok = subprocess.run([*cli, "--token-file", str(d / "subject-token.jwt")], capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0 and ok.stdout.strip().startswith("ya29.emulator.")
    js = subprocess.run([*cli, "--token-file", str(d / "subject-token.jwt"), "--output", "json"], capture_output=True, text=True, cwd=REPO)
    assert json.loads(js.stdout)["token_type"] == "Bearer"
    refused = subprocess.run([*cli, "--token-file", str(d / "admin-token.jwt")], capture_output=True, text=True, cwd=REPO)
    assert refused.returncode == 1 and "invalid_request" in refused.stderr
    missing = subprocess.run([*cli, "--token-file", str(d / "nope.jwt")], capture_output=True, text=True, cwd=REPO)
    assert missing.returncode == 2
    down = subprocess.run(
        [sys.executable, "-m", "broker.cli", "token", "--server", f"http://127.0.0.1:{free_port()}",
         "--token-file", str(d / "subject-token.jwt")], capture_output=True, text=True, cwd=REPO)
    assert down.returncode == 3 and "cannot reach" in down.stderr


def test_serve_refuses_the_dev_key(dev_broker, tmp_path):
    clone, _, _ = dev_broker
    cfg = clone / ".token-broker-dev" / "broker.yaml"
    import yaml

    data = yaml.safe_load(cfg.read_text())
    data["redis"]["url"] = "redis://127.0.0.1:6379/13"
    data["issuers"][0]["issuer"] = "https://not-dev.example"
    p = tmp_path / "b.yaml"
    p.write_text(yaml.safe_dump(data))
    out = subprocess.run([sys.executable, "-m", "broker.cli", "serve", "--config", str(p), "--check"],
                         capture_output=True, text=True, cwd=REPO, env=dict(os.environ, BROKER_CACHE_KEYS="a2tra2tra2tra2tra2tra2tra2tra2tra2tra2tra2s="))
    assert out.returncode == 2
    assert "dev issuer's key" in out.stderr
