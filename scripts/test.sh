#!/usr/bin/env bash
# The whole test suite from a fresh clone: installs what it needs, starts Redis if it is not
# running, then runs ruff, mypy --strict and pytest (unit + integration). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
"$VENV/bin/python" -m pip install -q -e '.[test]'

if ! command -v redis-server >/dev/null 2>&1; then
  echo "redis-server not found; installing it (Debian package redis-server)" >&2
  (apt-get update -qq && apt-get install -y -qq redis-server) >/dev/null
fi
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "starting redis-server on 127.0.0.1:6379" >&2
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --logfile "$(pwd)/.redis-test.log"
  for _ in $(seq 50); do redis-cli ping >/dev/null 2>&1 && break; sleep 0.1; done
fi
# tests/test_deploy.py validates docker-compose.yml with the compose CLI (no Docker engine needed).
if ! command -v docker-compose >/dev/null 2>&1 && ! docker compose version >/dev/null 2>&1; then
  echo "docker compose not found; installing docker-compose (Debian package) for the config check" >&2
  (apt-get update -qq && apt-get install -y -qq docker-compose) >/dev/null 2>&1 \
    || echo "could not install docker-compose; its config check will be skipped" >&2
fi
export TB_REQUIRE_REDIS=1  # integration tests fail (not skip) when Redis is missing

"$VENV/bin/ruff" check broker tests bench
"$VENV/bin/mypy" --strict broker bench
"$VENV/bin/python" -m pytest "$@"
