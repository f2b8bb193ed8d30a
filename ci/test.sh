#!/usr/bin/env bash
# The test command: lint, bring up the real local stack, run the unit and integration
# suites against it, the micro-benchmarks once each, and check the wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash ci/setup.sh
PY=.venv/bin/python
export PATH="$PWD/.venv/bin:$PATH"

bash ci/lint.sh
spr dev up
"$PY" -m pytest tests/unit tests/integration -p no:cacheprovider "$@"
"$PY" -m pytest tests/bench -q -p no:cacheprovider --benchmark-disable
"$PY" ci/check_wheel.py
