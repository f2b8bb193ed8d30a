#!/usr/bin/env bash
# Install everything spr needs on a fresh Debian machine, then the package itself into
# ./.venv. Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v java >/dev/null || need+=(openjdk-17-jre-headless)
command -v javac >/dev/null || need+=(openjdk-17-jdk-headless)
command -v mvn >/dev/null || need+=(maven)
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)
command -v cc >/dev/null || need+=(build-essential)
command -v pg_config >/dev/null || need+=(libpq-dev)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v runuser >/dev/null || need+=(util-linux)
command -v promtool >/dev/null || need+=(prometheus)
# The interop tests build a sarama producer: Go >= 1.21 fetches the toolchain go.mod
# asks for from the Go module proxy. /usr/local/go is where the official archive goes.
# (Debian 12's golang-go is 1.19, too old to fetch one.)
if ! command -v go >/dev/null && [ ! -x /usr/local/go/bin/go ]; then
  echo "ci/setup: Go >= 1.21 is not installed; the interop tests need it (https://go.dev/dl, into /usr/local/go)" >&2
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "ci/setup: installing Debian packages: ${need[*]}"
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -c "import spr, psycopg; print(f'ci/setup: spr {spr.__version__} ({spr.IMPL}), psycopg {psycopg.pq.__impl__}')"
