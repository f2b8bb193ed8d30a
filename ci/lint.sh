#!/usr/bin/env bash
# Static checks, the same locally and in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -m ruff check src tests benchmarks examples
"$PY" -m ruff format --check src tests benchmarks examples
"$PY" -m mypy --strict src
"$(dirname "$PY")/cython-lint" src/spr/_core.pyx src/spr/_core.pxd src/spr/_core/*.pxi
"$PY" -m mypy.stubtest spr._core --mypy-config-file pyproject.toml
echo "ci/lint: ok"
