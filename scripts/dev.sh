#!/usr/bin/env bash
# Run the broker in dev mode from a fresh clone: installs the package into .venv on first use,
# then runs `token-broker dev` (embedded store, IAM emulator, local issuer). Args pass through,
# e.g. scripts/dev.sh --bind 127.0.0.1:9090
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/token-broker" ]; then
  echo "installing token-broker into $VENV (first run only)..." >&2
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$VENV/bin/python" -m pip install -q -e . >&2
fi
exec "$VENV/bin/token-broker" dev "$@"
