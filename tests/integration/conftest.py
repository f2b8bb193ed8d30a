"""Fixtures for tests against the real local Kafka broker and PostgreSQL server.

The stack is brought up (``spr dev up``) when it is not running. Pointing
``SPR_BOOTSTRAP`` / ``SPR_DSN`` elsewhere uses those servers instead. These tests never
skip: a stack that cannot start is a failure.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from spr.dev.stack import DEFAULT_BOOTSTRAP, DEFAULT_DSN, DevStack


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.path):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def stack() -> DevStack:
    devstack = DevStack()
    if "SPR_BOOTSTRAP" not in os.environ and "SPR_DSN" not in os.environ:
        devstack.up()
    return devstack


@pytest.fixture(scope="session")
def bootstrap(stack: DevStack) -> str:
    return os.environ.get("SPR_BOOTSTRAP", DEFAULT_BOOTSTRAP)


@pytest.fixture(scope="session")
def dsn(stack: DevStack) -> str:
    return os.environ.get("SPR_DSN", DEFAULT_DSN)


@pytest.fixture(scope="session")
def admin(bootstrap: str) -> AdminClient:
    return AdminClient({"bootstrap.servers": bootstrap})


@pytest.fixture
def make_topic(admin: AdminClient) -> Iterator[Callable[..., str]]:
    """Create uniquely named topics for one test; they are deleted afterwards."""
    created: list[str] = []

    def _make(partitions: int = 3, prefix: str = "t", config: dict[str, str] | None = None) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        futures = admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1, config=config or {})],
            operation_timeout=30,
        )
        futures[name].result(timeout=30)
        created.append(name)
        # Wait (bounded) until metadata shows every partition with a leader.
        deadline = time.monotonic() + 30
        while True:
            md = admin.list_topics(name, timeout=5).topics[name]
            if (
                md.error is None
                and len(md.partitions) == partitions
                and all(p.leader >= 0 for p in md.partitions.values())
            ):
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"topic {name} has no leader for every partition after 30 s")
            time.sleep(0.05)
        return name

    yield _make
    if created:
        for future in admin.delete_topics(created, operation_timeout=30).values():
            # Deleting is cleanup; a failure must not hide the test's own result.
            with contextlib.suppress(Exception):
                future.result(timeout=30)


@pytest.fixture
def pg(dsn: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture
def unique_name() -> Callable[[str], str]:
    return lambda prefix: f"{prefix}_{uuid.uuid4().hex[:10]}"
