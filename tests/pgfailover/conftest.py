"""The PostgreSQL failover suite's own servers: a primary and a streaming standby per
test (:mod:`spr.dev.standby`), on ports and in folders of their own, so that the stack
the other suites use (and its database) is never touched.

- PostgreSQL: the primary on ``$SPR_DEV_PG_PORT + 200`` and the standby on the next
  port (``$SPR_PGFAILOVER_PG_PORT`` overrides the first); as root the data lives beside
  ``$SPR_PG_DATA`` (``<it>-pgfailover/``), otherwise under ``$SPR_DEV_DIR``.
- Kafka: the main stack's (``$SPR_BOOTSTRAP`` or the default bootstrap), brought up with
  ``spr dev up`` when nothing answers there.

Every cluster a test starts is stopped through its own data directory (``pg_ctl -D``)
or by its postmaster's PID, never by name. Each test writes its measurements (time from
the failure to the first commit on the new primary, events consumed twice) to
``build/pgfailover/results.json`` (``$SPR_PGFAILOVER_OUT``). These tests never skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "integration"))

from pg_pair import Pair  # noqa: E402

from spr.config.defaults import DEV_PG_PORT, default_bootstrap  # noqa: E402
from spr.dev.stack import DevStack, _port_open  # noqa: E402

OUT = Path(os.environ.get("SPR_PGFAILOVER_OUT") or REPO / "build" / "pgfailover")
RESULTS: dict[str, dict[str, Any]] = {}


def _base_port() -> int:
    return int(os.environ.get("SPR_PGFAILOVER_PG_PORT") or DEV_PG_PORT + 200)


def _data_root() -> Path:
    if os.geteuid() == 0:  # the clusters run as 'postgres', which cannot reach root's home
        base = Path(os.environ.get("SPR_PG_DATA", "/var/lib/postgresql/spr-dev"))
        return base.parent / (base.name + "-pgfailover")
    state = Path(os.environ.get("SPR_DEV_DIR") or REPO / ".pgfailover-state")
    return state / "pgfailover"


@pytest.fixture(scope="session")
def bootstrap() -> str:
    address = default_bootstrap()
    host, _, port = address.split(",")[0].rpartition(":")
    if not _port_open(host or "127.0.0.1", int(port)) and "SPR_BOOTSTRAP" not in os.environ:
        DevStack().up()
    return address


@pytest.fixture(scope="session")
def admin(bootstrap: str) -> AdminClient:
    return AdminClient({"bootstrap.servers": bootstrap})


@pytest.fixture
def make_topic(admin: AdminClient) -> Iterator[Callable[..., str]]:
    created: list[str] = []

    def _make(partitions: int = 3) -> str:
        name = f"pgf-{uuid.uuid4().hex[:10]}"
        futures = admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1)]
        )
        for future in futures.values():
            future.result(timeout=30)
        created.append(name)
        return name

    yield _make
    if created:
        for future in admin.delete_topics(created).values():
            with contextlib.suppress(Exception):
                future.result(timeout=30)


@pytest.fixture
def pair_factory() -> Iterator[Callable[..., Pair]]:
    """Builds the test's primary + standby (``synchronous``: the primary waits for the
    standby on every commit); both are stopped and removed afterwards."""
    root = _data_root()
    made: list[Pair] = []

    def _make(*, synchronous: bool = False) -> Pair:
        pair = Pair(root / uuid.uuid4().hex[:8], _base_port())
        # Leftovers of an interrupted run on these ports: stopped by their data folder.
        for stale in root.glob("*") if root.exists() else []:
            Pair(stale, _base_port()).teardown()
        root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(root, "postgres", "postgres")
        made.append(pair)
        pair.setup(synchronous=synchronous)
        return pair

    yield _make
    for pair in made:
        pair.teardown()
    with contextlib.suppress(OSError):
        root.rmdir()


@pytest.fixture
def record() -> Callable[[str, dict[str, Any]], None]:
    """Print one test's measurements and add them to ``results.json``."""

    def _record(name: str, values: dict[str, Any]) -> None:
        RESULTS[name] = values
        print(f"\npgfailover {name}: " + json.dumps(values), file=sys.stderr)
        OUT.mkdir(parents=True, exist_ok=True)
        path = OUT / "results.json"
        existing: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            existing = json.loads(path.read_text())
        existing.update(RESULTS)
        path.write_text(json.dumps(existing, indent=2, sort_keys=True) + "\n")

    return _record
