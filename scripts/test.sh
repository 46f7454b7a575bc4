#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Linux machine, then run it.
# Usage: scripts/test.sh [pytest args...]      (the README's second command)
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian tools some tests use (shellcheck for bootstrap.sh, squid for the pool
# behind an HTTP cache); skipped when present.
need=()
command -v shellcheck >/dev/null 2>&1 || need+=(shellcheck)
command -v squid >/dev/null 2>&1 || [ -x /usr/sbin/squid ] || need+=(squid)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "note: ${need[*]} not installed and cannot be (not root/apt); tests needing it will say so" >&2
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# torch is pinned (CPU build) through the 'train' extra: a plain 'torch' would pull CUDA wheels.
.venv/bin/python -m pip install -q -e '.[test,train]'
exec .venv/bin/python -m pytest "$@"
