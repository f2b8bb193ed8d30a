#!/usr/bin/env bash
# The release artefacts in dist/ (bash ci/build_dist.sh) installed as a user installs
# them, each in a fresh virtualenv outside the source tree, and run against the local
# stack, which must be up (spr dev up):
#   wheel   the repaired wheel with spr[binary], where no compiler can be found: PATH
#           holds no cc or gcc, and CC and CXX name a command that fails;
#   python  the same virtualenv with SPR_NO_EXTENSIONS=1 (the pure-Python twin);
#   sdist   the sdist with spr[c], which pip builds from scratch with the compiler.
# Each must report its version and core in `spr --version`, then `spr produce` a small
# stream (duplicates, stale events, aliases) and `spr run` it into a table that must
# match the produced state exactly. Everything created is dropped on the way out.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
start=$(date +%s)
wheel=$(echo "$root"/dist/spr-*.whl)
sdist=$(echo "$root"/dist/spr-*.tar.gz)
if [ ! -f "$wheel" ] || [ ! -f "$sdist" ]; then
  echo "ci/install_test: no wheel and sdist in dist/: run bash ci/build_dist.sh first" >&2
  exit 1
fi
version=$(basename "$sdist" .tar.gz)
version=${version#spr-}

run=$(date +%H%M%S)_$$
work=$(mktemp -d)
created=()  # "topic:NAME", "group:NAME" and "table:NAME", dropped by clean_up
clean_up() {
  if [ ${#created[@]} -gt 0 ]; then
    "$root/.venv/bin/python" - "${created[@]}" <<'PY' || true
import contextlib
import sys

import psycopg
from confluent_kafka.admin import AdminClient
from psycopg import sql

from spr.config.defaults import default_bootstrap, default_dsn

names: dict[str, list[str]] = {"topic": [], "group": [], "table": []}
for item in sys.argv[1:]:
    kind, name = item.split(":", 1)
    names[kind].append(name)
with psycopg.connect(default_dsn(), autocommit=True) as conn:
    for table in names["table"]:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))
admin = AdminClient({"bootstrap.servers": default_bootstrap()})
# check() names a topic, a group and tables together, so no list here is empty.
for topic, future in admin.delete_topics(names["topic"], operation_timeout=30).items():
    try:
        future.result(timeout=30)
    except Exception as exc:
        print(f"ci/install_test: could not delete topic {topic}: {exc}", file=sys.stderr)
for future in admin.delete_consumer_groups(names["group"], request_timeout=10).values():
    with contextlib.suppress(Exception):  # a group that never committed does not exist
        future.result(timeout=10)
PY
  fi
  rm -rf "$work"
}
trap clean_up EXIT

# A compiler that is not there: the only cc and gcc are in /usr/bin, which the
# compiler-less PATH leaves out; CC and CXX name a command that fails loudly.
mkdir "$work/no-compiler"
cat >"$work/no-compiler/cc" <<'SH'
#!/bin/sh
echo "ci/install_test: no compiler on this machine (called as: $0 $*)" >&2
exit 1
SH
chmod +x "$work/no-compiler/cc"

# The interpreter CI tests with (the one behind .venv), in fresh virtualenvs.
new_venv() {
  "$root/.venv/bin/python" -m venv "$1"
}

# check VARIANT VENV CORE PSYCOPG [VAR=VALUE...]: the live spr core and psycopg
# implementation, then an exact table.
check() {
  local variant=$1 venv=$2 core=$3 psycopg=$4
  shift 4
  local env=(env "$@")
  if [ "$variant" = sdist ]; then
    env+=("PATH=$venv/bin:$PATH")
  else
    env+=("PATH=$venv/bin" "CC=$work/no-compiler/cc" "CXX=$work/no-compiler/cc")
  fi
  local name="spr_install_${run}_${variant}" dir="$work/$variant"
  mkdir "$dir"
  cd "$dir"  # away from src/, so that only the installed spr can be imported
  echo "== $variant: spr --version, then $name"
  local said
  said=$("${env[@]}" spr --version)
  echo "$said"
  if [ "$said" != "spr $version ($core)" ]; then
    echo "ci/install_test: $variant: want \"spr $version ($core)\"" >&2
    exit 1
  fi
  "${env[@]}" python - "$venv" "$version" "$psycopg" <<'PY'
import importlib.metadata
import sys

import psycopg

import spr

venv, version, implementation = sys.argv[1:]
assert spr.__file__.startswith(venv), f"spr imported from {spr.__file__}, not from {venv}"
assert spr.__version__ == importlib.metadata.version("spr") == version, spr.__version__
assert psycopg.pq.__impl__ == implementation, f"psycopg {psycopg.pq.__impl__}"
print(f"spr {spr.__version__} from {spr.__file__}, core {spr.IMPL}, psycopg {psycopg.pq.__impl__}")
PY
  created+=("topic:$name" "group:$name" "table:$name" "table:${name}_offsets"
    "table:${name}_offsets_gaps")
  printf '[table]\nname = "%s"\noffsets_table = "%s_offsets"\n' "$name" "$name" >"$dir/spr.toml"
  "${env[@]}" spr produce --topic "$name" --count 3000 --entities 500 --partitions 4 \
    --duplicates 0.05 --stale 0.02 --aliases 0.2 --seed 19 --manifest "$dir/expected.json"
  "${env[@]}" spr run --config "$dir/spr.toml" --topic "$name" --group "$name" \
    --auto-create-schema --idle-exit 2
  "${env[@]}" python - "$dir/expected.json" "$name" <<'PY'
import json
import sys

from spr.bench.verify import compare, fetch_rows
from spr.config.defaults import default_dsn

expected = json.load(open(sys.argv[1]))["entities"]
result = compare(expected, fetch_rows(default_dsn(), sys.argv[2]))
print(f"entities {result.expected_entities}, rows {result.rows}: lost {result.lost}, "
      f"wrong {result.wrong}, duplicated {result.duplicated}")
sys.exit(0 if result.ok else 1)
PY
  cd "$root"
}

echo "== the wheel, in a virtualenv with no compiler: $(basename "$wheel")"
new_venv "$work/venv-wheel"
if env PATH="$work/venv-wheel/bin" /bin/sh -c 'command -v cc || command -v gcc'; then
  echo "ci/install_test: a compiler is still on the compiler-less PATH" >&2
  exit 1
fi
env PATH="$work/venv-wheel/bin" CC="$work/no-compiler/cc" CXX="$work/no-compiler/cc" \
  "$work/venv-wheel/bin/python" -m pip install -q "$wheel[binary]"
check wheel "$work/venv-wheel" compiled binary
check python "$work/venv-wheel" python binary SPR_NO_EXTENSIONS=1

echo "== the sdist, built by pip in a virtualenv with the compiler: $(basename "$sdist")"
new_venv "$work/venv-sdist"
# pip keeps the wheels it builds from a file named like a release, and would install
# the one built from an earlier sdist of this version instead of building this one.
"$work/venv-sdist/bin/python" -m pip cache remove -qq spr
"$work/venv-sdist/bin/python" -m pip install -q "$sdist[c]"
"$work/venv-sdist/bin/python" -m pip cache remove -qq spr
check sdist "$work/venv-sdist" compiled c

echo "ci/install_test: ok in $(( $(date +%s) - start )) s"
