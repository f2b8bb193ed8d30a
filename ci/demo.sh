#!/usr/bin/env bash
# The main job, end to end on the built-in local stack: install what is missing, start
# Apache Kafka and PostgreSQL on 127.0.0.1, produce a realistic stream of entity state
# changes (duplicates, stale events, other services' field names), apply it exactly once
# with `spr run`, and check the table against the expected final state.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
spr dev up

events=${DEMO_EVENTS:-200000}
run=$(date +%s)-$$
topic="demo.order-state-changes.$run"
table="demo_orders_${run//-/_}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== routing: the partition every client must agree on"
spr route --partitions 12 order:1001 order:1002 payment:77

echo "== produce $events events to $topic"
spr produce --topic "$topic" --count "$events" --entities 20000 --partitions 12 \
  --duplicates 0.05 --stale 0.02 --aliases 0.2 --seed 7 --manifest "$work/expected.json"

echo "== apply them exactly once into table $table"
start=$(date +%s.%N)
spr run --topic "$topic" --group "demo-$run" --table "$table" --auto-create-schema \
  --idle-exit 3 --stats "$work/stats.json"
end=$(date +%s.%N)

echo "== verify the table against the expected state"
python - "$work/expected.json" "$table" "$work/stats.json" "$start" "$end" <<'PY'
import json, sys
from spr.bench.verify import compare, fetch_rows
from spr.config.defaults import DEFAULT_DSN

expected = json.load(open(sys.argv[1]))["entities"]
stats = json.load(open(sys.argv[3]))
result = compare(expected, fetch_rows(DEFAULT_DSN, sys.argv[2]))
seconds = float(sys.argv[5]) - float(sys.argv[4])
print(f"entities {result.expected_entities}, rows {result.rows}: lost {result.lost}, "
      f"wrong {result.wrong}, duplicated {result.duplicated}")
print(f"engine: {json.dumps(stats)}")
print(f"spr run took {seconds:.1f} s including start-up and the 3 s idle wait")
sys.exit(0 if result.ok else 1)
PY
echo "demo: ok (table $table is left in place: psql $(spr dev status --json | python -c 'import json,sys; print(json.load(sys.stdin)["postgres"]["dsn"])'))"
