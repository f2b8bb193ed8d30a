#!/usr/bin/env bash
# The main job, end to end on the built-in local stack: set up, start Apache Kafka and
# PostgreSQL on 127.0.0.1, then run the demo pipeline against them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
spr dev up
python ci/demo.py "$@"
