"""``spr run`` end to end with and without ``--otel`` (sampler off), alternating (issue 17).

Run against the local stack: ``.venv/bin/python -m benchmarks.tracing_e2e [--events N]
[--rounds R]``. One topic of N events (``spr produce``, not traced) is applied R times
per mode into a fresh table by ``spr run --idle-exit 1``, the modes alternating: no
``--otel``, and ``--otel`` with ``OTEL_TRACES_SAMPLER=always_off``. The rate is the
run's own active rate (first message to last commit, from ``--stats``). Tables, offsets
rows and the topic are removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import psycopg

from benchmarks.ratios import print_medians

BOOTSTRAP = os.environ.get("SPR_BOOTSTRAP", "127.0.0.1:9092")
DSN = os.environ.get("SPR_DSN", "postgresql://spr@127.0.0.1:55432/spr")


def _spr(argv: list[str], env: dict[str, str]) -> None:
    subprocess.run([sys.executable, "-m", "spr", *argv], env=env, check=True, timeout=600,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    tag = uuid.uuid4().hex[:8]
    topic = f"tracing-e2e-{tag}"
    env = {**os.environ}
    _spr(["produce", "--topic", topic, "--count", str(args.events), "--entities", "100000",
          "--partitions", "6", "--bootstrap", BOOTSTRAP], env)  # fmt: skip
    modes = {
        "off": ([], env),
        "otel, sampler off": (["--otel"], {**env, "OTEL_TRACES_SAMPLER": "always_off"}),
    }
    rates: dict[str, list[float]] = {name: [] for name in modes}
    made: list[tuple[str, str]] = []
    try:
        with tempfile.TemporaryDirectory() as folder:
            for round_number in range(args.rounds):
                for index, (name, (flags, mode_env)) in enumerate(modes.items()):
                    table = f"tracing_e2e_{tag}_{round_number}_{index}"
                    group = f"{table}-g"
                    made.append((table, group))
                    stats = Path(folder) / f"{table}.json"
                    _spr(["run", *flags, "--topic", topic, "--group", group, "--dsn", DSN,
                          "--bootstrap", BOOTSTRAP, "--table", table, "--auto-create-schema",
                          "--idle-exit", "1", "--stats", str(stats)], mode_env)  # fmt: skip
                    rates[name].append(float(json.loads(stats.read_text())["events_per_s"]))
    finally:
        with psycopg.connect(DSN, autocommit=True) as conn:
            for table, group in made:
                conn.execute(f'DROP TABLE IF EXISTS "{table}"')
                conn.execute("DELETE FROM spr_offsets WHERE group_id = %s", (group,))
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
        admin.delete_topics([topic])[topic].result(30)
    print_medians(
        f"{args.events:,} events, {args.rounds} rounds alternating, spr run --idle-exit 1", rates
    )


if __name__ == "__main__":
    main()
