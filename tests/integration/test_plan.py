"""``spr plan --measure``: a bounded live measurement through spr's consume-to-flush path."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import psycopg


def _plan_tables(pg: psycopg.Connection[tuple[object, ...]]) -> int:
    row = pg.execute("SELECT count(*) FROM pg_tables WHERE tablename LIKE 'spr_plan_%'").fetchone()
    assert row is not None
    return int(str(row[0]))


def test_plan_measure_is_bounded_and_consistent(
    bootstrap: str, dsn: str, pg: psycopg.Connection[tuple[object, ...]]
) -> None:
    tables_before = _plan_tables(pg)
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "spr", "plan", "--target-throughput", "500000", "--measure",
         "--headroom", "0.25", "--json"],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "SPR_BOOTSTRAP": bootstrap, "SPR_DSN": dsn},
    )  # fmt: skip
    elapsed = time.monotonic() - start
    assert out.returncode == 0, out.stderr
    assert elapsed < 20, f"--measure took {elapsed:.1f} s"
    plan = json.loads(out.stdout)
    measured = plan["measurement"]
    assert measured["events"] >= 1000
    assert measured["flushes"] >= 1
    assert 0 < measured["seconds"] < 12
    per_partition = measured["events_per_second"]
    assert per_partition == plan["partition_throughput"]
    assert per_partition == measured["events"] / measured["seconds"]
    assert plan["partitions"] == max(1, math.ceil(500_000 * 1.25 / per_partition - 1e-9))
    assert plan["minimum_partitions"] == max(1, math.ceil(500_000 / per_partition - 1e-9))
    assert "(measured)" in plan["reasoning"][0]
    assert _plan_tables(pg) == tables_before  # the measurement cleans up after itself
