"""bench/run.py's measuring helpers (the benchmark itself runs by hand: README, Benchmarks)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest

from bench.run import broker_secrets, cpu_seconds, signing_key, worker_rss_mb, write_config

# A parent (standing in for a gunicorn master) whose child burns 0.5 s of CPU, then idles.
_BURN = (
    "import time\n"
    "end = time.process_time() + 0.5\n"
    "while time.process_time() < end: pass\n"
    "time.sleep(30)"
)
_PARENT = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {_BURN!r}])"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")
def test_cpu_and_rss_count_a_root_and_its_children_only() -> None:
    parent = subprocess.Popen([sys.executable, "-c", _PARENT])
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        deadline = time.monotonic() + 20
        spent = 0.0
        while time.monotonic() < deadline and spent < 0.5:
            time.sleep(0.1)
            spent = cpu_seconds([parent.pid])
        assert spent >= 0.5  # the child's burn, counted through its parent
        assert len(worker_rss_mb(parent.pid)) == 1  # its one child, like a worker
        assert worker_rss_mb(parent.pid)[0] > 1.0
        assert cpu_seconds([idle.pid]) < 0.3  # another root: only its own start-up
        assert cpu_seconds([]) == 0.0
    finally:
        children = subprocess.run(
            ["pgrep", "-P", str(parent.pid)], capture_output=True, text=True, check=False
        ).stdout.split()
        for pid in children:
            os.kill(int(pid), 9)
        for p in (parent, idle):
            p.kill()
            p.wait()


def test_signing_key_is_the_key_write_config_published(tmp_path: Path) -> None:
    write_config(
        tmp_path, "redis://127.0.0.1:1/0", "http://127.0.0.1:1", "127.0.0.1:1", 0,
        workers=1, threads=1,
    )
    key, kid = signing_key(tmp_path)
    published = json.loads((tmp_path / "jwks.json").read_text())["keys"][0]
    assert kid == published["kid"]
    mine = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    assert (mine["n"], mine["e"]) == (published["n"], published["e"])


def test_broker_secrets_are_fresh_keys_of_the_right_size() -> None:
    first, second = broker_secrets(), broker_secrets()
    assert first.keys() == {"BROKER_CACHE_KEYS", "BROKER_AUDIT_SIGNING_KEY"}
    for name, value in first.items():
        assert len(base64.b64decode(value)) == 32  # AES-256 key, Ed25519 seed
        assert second[name] != value
