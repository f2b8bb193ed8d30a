"""The failover suite's own stack: ``spr dev up --brokers 3`` in its own state folder, on
its own ports, with its own PostgreSQL, so that it never touches the single-node stack
the other suites use (which may stay up beside it).

- Kafka: nodes on ``$SPR_DEV_KAFKA_PORT + 100`` (and the five ports after it); override
  with ``$SPR_FAILOVER_KAFKA_PORT``.
- PostgreSQL: ``$SPR_DEV_PG_PORT + 100`` (``$SPR_FAILOVER_PG_PORT``); as root its data
  lives in ``$SPR_PG_DATA-failover``.
- State: ``$SPR_DEV_DIR/failover`` (``$SPR_FAILOVER_DIR``).

A session starts with a freshly formatted cluster (leftovers of an interrupted run are
stopped by their recorded PIDs first) and ends with ``spr dev down``, which stops only
what this stack started. Results (``results.json`` and ``failover.png``) go to
``build/failover`` (``$SPR_FAILOVER_OUT``). These tests never skip.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from failover_tools import Cluster, write_results

from spr.dev.stack import state_dir

REPO = Path(__file__).resolve().parents[2]


def _stack_env() -> tuple[dict[str, str], Path, int, int]:
    kafka_port = int(
        os.environ.get("SPR_FAILOVER_KAFKA_PORT")
        or int(os.environ.get("SPR_DEV_KAFKA_PORT", "9092")) + 100
    )
    pg_port = int(
        os.environ.get("SPR_FAILOVER_PG_PORT")
        or int(os.environ.get("SPR_DEV_PG_PORT", "55432")) + 100
    )
    root = Path(os.environ.get("SPR_FAILOVER_DIR") or state_dir() / "failover")
    env = {k: v for k, v in os.environ.items() if k not in ("SPR_BOOTSTRAP", "SPR_DSN")}
    env.update(
        SPR_DEV_DIR=str(root),
        SPR_DEV_KAFKA_PORT=str(kafka_port),
        SPR_DEV_PG_PORT=str(pg_port),
        SPR_PG_DATA=os.environ.get("SPR_PG_DATA", "/var/lib/postgresql/spr-dev") + "-failover",
    )
    return env, root, kafka_port, pg_port


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    env, root, kafka_port, pg_port = _stack_env()
    bootstrap = ",".join(f"127.0.0.1:{kafka_port + 2 * i}" for i in range(3))
    stack = Cluster(env=env, bootstrap=bootstrap, dsn=f"postgresql://spr@127.0.0.1:{pg_port}/spr")
    stack.dev("down")
    shutil.rmtree(root / "kafka-3", ignore_errors=True)
    try:
        out = stack.dev("up", "--brokers", "3")
        assert stack.status()["kafka"]["bootstrap"] == bootstrap, out
        stack.wait_healthy()
        yield stack
    finally:
        stack.dev("down")


@pytest.fixture(scope="session")
def results() -> Iterator[list[dict[str, Any]]]:
    """Every fault's measurements; written to results.json and drawn at the end."""
    runs: list[dict[str, Any]] = []
    yield runs
    write_results(runs, Path(os.environ.get("SPR_FAILOVER_OUT") or REPO / "build" / "failover"))
