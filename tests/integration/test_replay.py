"""``spr replay`` against the real broker and database.

Rewinding: the offsets table and Kafka's group offsets move back together, in one
transaction, and never while the group has members. Determinism: a replay from the
start into an empty table rebuilds the same table (entity, sequence, state, payload)
although the topic holds duplicates and stale events.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
from confluent_kafka import Consumer, Producer
from psycopg import sql

from spr.kafka.admin import KafkaAdmin
from spr.producer import Producer as SprProducer

Pg = psycopg.Connection[tuple[Any, ...]]


def _spr(
    *args: str, bootstrap: str, dsn: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spr", *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "SPR_BOOTSTRAP": bootstrap, "SPR_DSN": dsn}, check=False,
    )  # fmt: skip


def _stored(pg: Pg, group: str, topic: str) -> dict[int, int]:
    rows = pg.execute(
        "SELECT partition, next_offset FROM spr_offsets WHERE group_id = %s AND topic = %s",
        (group, topic),
    ).fetchall()
    return {int(p): int(o) for p, o in rows}


def _kafka(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    return {
        p: o
        for (t, p), o in KafkaAdmin.for_bootstrap(bootstrap).group_offsets(group).items()
        if t == topic
    }


def _fill(bootstrap: str, topic: str, partitions: int, per_partition: int, base_ms: int) -> None:
    producer = Producer({"bootstrap.servers": bootstrap})
    for partition in range(partitions):
        for i in range(per_partition):
            producer.produce(topic, b"{}", partition=partition, timestamp=base_ms + i * 1000)
    assert producer.flush(30) == 0


def _ensure_offsets_table(pg: Pg) -> None:
    pg.execute(
        "CREATE TABLE IF NOT EXISTS spr_offsets (group_id text NOT NULL, topic text NOT NULL, "
        "partition integer NOT NULL, next_offset bigint NOT NULL, "
        "updated_at timestamptz DEFAULT now(), PRIMARY KEY (group_id, topic, partition))"
    )


def _set_positions(pg: Pg, bootstrap: str, group: str, topic: str, offsets: dict[int, int]) -> None:
    """What a running engine leaves behind: offsets in the table and in Kafka."""
    for partition, offset in offsets.items():
        pg.execute(
            "INSERT INTO spr_offsets (group_id, topic, partition, next_offset) "
            "VALUES (%s, %s, %s, %s)",
            (group, topic, partition, offset),
        )
    KafkaAdmin.for_bootstrap(bootstrap).commit_group_offsets(
        group, {(topic, p): o for p, o in offsets.items()}
    )


def test_rewind_moves_database_and_kafka_offsets_back_together(
    bootstrap: str, dsn: str, pg: Pg, make_topic: Callable[..., str]
) -> None:
    topic = make_topic(partitions=2, prefix="replay")
    base = int(time.time() * 1000) - 600_000
    _fill(bootstrap, topic, 2, 20, base)
    group = f"replay-{uuid.uuid4().hex[:8]}"
    _ensure_offsets_table(pg)
    _set_positions(pg, bootstrap, group, topic, {0: 20, 1: 20})

    # A dry run changes nothing.
    out = _spr("replay", "--group", group, "--to-offset", "5", "--dry-run",
               bootstrap=bootstrap, dsn=dsn)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert f"would set {group} {topic}[0]: 20 -> 5" in out.stdout
    assert _stored(pg, group, topic) == {0: 20, 1: 20}
    assert _kafka(bootstrap, group, topic) == {0: 20, 1: 20}

    # --to-offset: every partition of the group's topics, backwards past GREATEST.
    out = _spr("replay", "--group", group, "--to-offset", "5", bootstrap=bootstrap, dsn=dsn)
    assert out.returncode == 0, out.stderr
    assert f"set {group} {topic}[1]: 20 -> 5" in out.stdout
    assert _stored(pg, group, topic) == {0: 5, 1: 5}
    assert _kafka(bootstrap, group, topic) == {0: 5, 1: 5}

    # --to-timestamp on one partition: the first message at or after base + 10.5 s is 11.
    out = _spr("replay", "--group", group, "--topic", topic, "--partition", "1",
               "--to-timestamp", str(base + 10_500), bootstrap=bootstrap, dsn=dsn)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert _stored(pg, group, topic) == {0: 5, 1: 11}
    assert _kafka(bootstrap, group, topic) == {0: 5, 1: 11}

    # Out of range: one sentence, exit 2, nothing changed.
    out = _spr("replay", "--group", group, "--to-offset", "21", bootstrap=bootstrap, dsn=dsn)
    assert out.returncode == 2
    assert out.stderr == (
        f"spr replay: offset 21 is outside {topic}[0], which holds offsets 0..20 (log start..end)\n"
    )
    assert _stored(pg, group, topic) == {0: 5, 1: 11}


def test_rewind_refuses_a_running_group(
    bootstrap: str, dsn: str, pg: Pg, make_topic: Callable[..., str]
) -> None:
    topic = make_topic(partitions=1, prefix="replay")
    _fill(bootstrap, topic, 1, 10, int(time.time() * 1000))
    group = f"replay-{uuid.uuid4().hex[:8]}"
    _ensure_offsets_table(pg)
    _set_positions(pg, bootstrap, group, topic, {0: 10})
    member = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                       "enable.auto.commit": False, "session.timeout.ms": 6000})  # fmt: skip
    try:
        member.subscribe([topic])
        deadline = time.monotonic() + 30
        while not member.assignment() and time.monotonic() < deadline:
            member.poll(0.2)
        assert member.assignment(), "the member never joined"
        out = _spr("replay", "--group", group, "--to-offset", "0", bootstrap=bootstrap, dsn=dsn)
    finally:
        member.close()
    assert out.returncode == 2
    assert "has 1 running member(s); stop its consumers first" in out.stderr
    assert _stored(pg, group, topic) == {0: 10}
    assert _kafka(bootstrap, group, topic) == {0: 10}


def _state(pg: Pg, table: str) -> list[tuple[Any, ...]]:
    return pg.execute(
        sql.SQL(
            "SELECT entity_type, entity_id, sequence, state, payload FROM {} "
            "ORDER BY entity_type, entity_id"
        ).format(sql.Identifier(table))
    ).fetchall()


def _checksum(pg: Pg, table: str) -> str:
    row = pg.execute(
        sql.SQL(
            "SELECT md5(string_agg(concat_ws('|', entity_type, entity_id, sequence, state, "
            "payload::text), E'\\n' ORDER BY entity_type, entity_id)) FROM {}"
        ).format(sql.Identifier(table))
    ).fetchone()
    assert row is not None and row[0] is not None
    return str(row[0])


def test_replay_into_a_fresh_table_is_deterministic(
    bootstrap: str,
    dsn: str,
    pg: Pg,
    make_topic: Callable[..., str],
    unique_name: Callable[[str], str],
) -> None:
    topic = make_topic(partitions=3, prefix="determinism")
    table = unique_name("spr_state")
    copy = unique_name("spr_rebuilt")
    group = unique_name("determinism")
    # 40 entities x 5 sequences, then every third event again (duplicates), then
    # older sequences with other content (stale: the guard must ignore them).
    events: list[dict[str, Any]] = []
    for sequence in range(5):
        for n in range(40):
            kind = "order" if n % 2 else "invoice"
            events.append({
                "event_id": f"{kind}-{n}-{sequence}", "entity_type": kind, "entity_id": f"e{n}",
                "sequence": sequence, "state": f"s{sequence}", "amount": n * 10 + sequence,
            })  # fmt: skip
    duplicates = events[::3]
    stale = [
        {**e, "event_id": e["event_id"] + "-late", "state": "late", "amount": -1}
        for e in events
        if e["sequence"] < 3 and int(e["entity_id"][1:]) % 4 == 0
    ]
    with SprProducer(bootstrap=bootstrap, topic=topic) as producer:
        producer.send_many(events)
        producer.send_many(duplicates)
        producer.send_many(stale)
        producer.flush()
    total = len(events) + len(duplicates) + len(stale)

    init = _spr("db", "init", "--table", table, bootstrap=bootstrap, dsn=dsn)
    assert init.returncode == 0, init.stderr
    run = _spr("run", "--topic", topic, "--group", group, "--table", table, "--idle-exit", "2",
               bootstrap=bootstrap, dsn=dsn, timeout=90)  # fmt: skip
    assert run.returncode == 0, run.stderr
    newest = {(e["entity_type"], e["entity_id"]): e for e in events if e["sequence"] == 4}
    original = _state(pg, table)
    assert [(r[0], r[1], r[2], r[3]) for r in original] == [
        (k[0], k[1], 4, "s4") for k in sorted(newest)
    ]
    assert all(r[4]["amount"] == newest[(r[0], r[1])]["amount"] for r in original)
    assert _stored(pg, group, topic) and sum(_stored(pg, group, topic).values()) == total

    out = _spr("replay", "--group", group, "--to-offset", "0", "--table", table, "--into", copy,
               bootstrap=bootstrap, dsn=dsn)  # fmt: skip
    assert out.returncode == 0, out.stderr
    command = re.search(r"^then run: (spr run .*)$", out.stdout, re.MULTILINE)
    assert command, out.stdout
    argv = shlex.split(command.group(1))
    assert argv[argv.index("--group") + 1] == f"{group}.replay.{copy}"
    assert argv[argv.index("--table") + 1] == copy
    assert _state(pg, copy) == []  # created empty, like the original
    assert set(_stored(pg, f"{group}.replay.{copy}", topic).values()) == {0}

    replay = _spr(*argv[1:], bootstrap=bootstrap, dsn=dsn, timeout=90)
    assert replay.returncode == 0, replay.stderr
    assert _checksum(pg, copy) == _checksum(pg, table)
    assert _state(pg, copy) == original
    # The original group and table were not touched by the replay.
    assert sum(_stored(pg, group, topic).values()) == total
    for name in (table, copy):
        pg.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(name)))
