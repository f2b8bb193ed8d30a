"""Issue 11, data risks 2 and 3, on the real broker and database.

* A dead-letter topic that the run consumes (``--dlq-topic`` equal to the source topic,
  through ``{topic}``, or another source topic) loops forever: one bad message became
  2,048 copies in 8 s. ``spr run`` must refuse it with one sentence, exit 2, and produce
  and commit nothing.
* Several consumer groups reading one topic each dead-letter its invalid events into one
  ``<topic>.dlq``. Each letter must say which group wrote it (``spr-group``), and
  ``spr dlq redrive`` must re-produce each source position once, also across runs.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator

import psycopg
import pytest
from confluent_kafka import OFFSET_INVALID, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from helpers import end_offsets, expected_for, produce_load, spr_run_argv, state_rows
from psycopg import sql

from spr.cli import main as spr_main
from spr.dev.loadgen import LoadSpec

Names = Callable[[str], str]
Raw = tuple[int, int, bytes | None, dict[str, bytes | None]]  # partition, offset, key, headers

# Invalid events of every shape, each pinned to a partition of a 3-partition topic.
INVALID = [
    b"not json",
    b'{"entity_type": "order"}',
    b"[1, 2]",
    b"",
    b'{"entity_type": "order", "entity_id": "x"}',
    b"\xff\xfe",
    b"null",
    b'{"entity_id": "y", "state": "s"}',
    b"{",
    b"42",
    b'"a string"',
]


def produce_invalid(bootstrap: str, topic: str) -> set[tuple[str, int, int]]:
    """Produce :data:`INVALID` across partitions 0..2; returns their source positions."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    positions: set[tuple[str, int, int]] = set()
    errors: list[object] = []

    def delivered(error: object, message: object) -> None:
        if error is not None:
            errors.append(error)
        else:
            positions.add((topic, message.partition(), message.offset()))  # type: ignore[attr-defined]

    for i, value in enumerate(INVALID):
        producer.produce(topic, key=f"bad-{i}".encode(), value=value, partition=i % 3,
                         on_delivery=delivered)  # fmt: skip
    assert producer.flush(30) == 0 and not errors
    assert len(positions) == len(INVALID)
    return positions


def read_all(
    bootstrap: str, topic: str, since: dict[tuple[str, int], int] | None = None
) -> list[Raw]:
    """Every message of ``topic`` (from ``since``, else from the start) up to its end now."""
    ends = end_offsets(bootstrap, topic)
    starts = {k: (since or {}).get(k, 0) for k in ends}
    wanted = {k[1]: v for k, v in ends.items() if v > starts[k]}
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"read-{uuid.uuid4().hex[:8]}",
                         "enable.auto.commit": False})  # fmt: skip
    found: list[Raw] = []
    try:
        consumer.assign([TopicPartition(topic, p, starts[(topic, p)]) for p in wanted])
        deadline = time.monotonic() + 30
        done = {p: False for p in wanted}
        while not all(done.values()):
            assert time.monotonic() < deadline, f"could not read {topic} to its end"
            for message in consumer.consume(500, 0.5):
                assert message.error() is None, message.error()
                p, o = message.partition(), message.offset()
                assert p is not None and o is not None
                found.append((p, o, message.key(), dict(message.headers() or [])))
                done[p] = done[p] or o + 1 >= wanted[p]
    finally:
        consumer.close()
    return sorted(found, key=lambda raw: (raw[0], raw[1]))


def committed_in_kafka(bootstrap: str, group: str, topic: str) -> list[int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        tps = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
        return [tp.offset for tp in tps if tp.offset != OFFSET_INVALID]
    finally:
        consumer.close()


def offsets_rows(dsn: str, group: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        if conn.execute("SELECT to_regclass('spr_offsets')").fetchone() == (None,):
            return 0
        row = conn.execute("SELECT count(*) FROM spr_offsets WHERE group_id = %s", (group,))
        return int(row.fetchone()[0])  # type: ignore[index]


@pytest.fixture
def cleanup(admin: AdminClient, dsn: str) -> Iterator[tuple[list[str], list[str]]]:
    """Topics the run or a test creates by itself, and tables; dropped afterwards."""
    topics: list[str] = []
    tables: list[str] = []
    yield topics, tables
    if topics:
        for future in admin.delete_topics(topics, operation_timeout=30).values():
            # Cleanup must not hide the test's own result.
            with contextlib.suppress(Exception):
                future.result(timeout=30)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for table in tables:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))


def test_a_dead_letter_topic_the_run_consumes_is_refused_and_nothing_is_written(
    bootstrap: str, dsn: str, make_topic: Callable[..., str], unique_name: Names,
    cleanup: tuple[list[str], list[str]],
) -> None:  # fmt: skip
    topic, other = make_topic(partitions=3), make_topic(partitions=1)
    produce_invalid(bootstrap, topic)
    before = end_offsets(bootstrap, topic)
    cases = [
        ([topic], topic, f"the dead-letter topic of '{topic}' is '{topic}' itself"),
        ([topic], "{topic}", f"the dead-letter topic of '{topic}' is '{topic}' itself"),
        ([topic, other], other,
         f"the dead-letter topic of '{topic}' is '{other}', which this run also consumes"),
    ]  # fmt: skip
    for topics, dlq_topic, sentence in cases:
        table, group = unique_name("state"), unique_name("g")
        cleanup[1].append(table)
        argv = spr_run_argv(topics=topics, group=group, dsn=dsn, bootstrap=bootstrap,
                            table=table, extra=["--idle-exit", "2", "--dlq-topic", dlq_topic])  # fmt: skip
        started = time.monotonic()
        # Before the fix this never ended: each dead letter was consumed and dead-lettered
        # again, so the run was never idle.
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, (dlq_topic, done.stderr[-2000:])
        assert done.stderr.startswith(f"spr run: {sentence}"), done.stderr[-2000:]
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
        assert time.monotonic() - started < 15
        # Nothing produced to the source topic, nothing committed anywhere, no table made.
        assert end_offsets(bootstrap, topic) == before
        assert offsets_rows(dsn, group) == 0
        assert committed_in_kafka(bootstrap, group, topic) == []
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.execute("SELECT to_regclass(%s)", (table,)).fetchone() == (None,)


def _run_two_groups(
    bootstrap: str, dsn: str, topic: str, groups: list[str], tables: list[str]
) -> None:
    """Two consumer groups read the topic at the same time, each into its own table."""
    procs = [
        subprocess.Popen(
            spr_run_argv(
                topics=[topic],
                group=group,
                dsn=dsn,
                bootstrap=bootstrap,
                table=table,
                extra=["--idle-exit", "1"],
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for group, table in zip(groups, tables, strict=True)
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out[-3000:]


def test_two_groups_dead_letter_once_each_and_redrive_sends_each_position_once(
    bootstrap: str, dsn: str, make_topic: Callable[..., str], unique_name: Names,
    cleanup: tuple[list[str], list[str]], capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    topic = make_topic(partitions=3)
    dlq = f"{topic}.dlq"
    cleanup[0].append(dlq)
    spec = LoadSpec(count=300, entities=40, seed=11)
    produce_load(bootstrap, topic, spec)
    positions = produce_invalid(bootstrap, topic)
    n = len(positions)
    groups = [unique_name("billing"), unique_name("search")]
    tables = [unique_name("state"), unique_name("state")]
    cleanup[1].extend(tables)
    _run_two_groups(bootstrap, dsn, topic, groups, tables)
    for table in tables:  # the valid events are applied by both groups
        assert state_rows(dsn, table) == expected_for(spec)

    letters = read_all(bootstrap, dlq)
    assert len(letters) == 2 * n  # one letter per invalid event and group

    def redrive() -> str:
        code = spr_main(["dlq", "redrive", "--topic", topic, "--bootstrap", bootstrap])
        out = capsys.readouterr().out.strip()
        assert code == 0, out
        return out

    before = end_offsets(bootstrap, topic)
    first = redrive()
    after = end_offsets(bootstrap, topic)
    # Before the fix: 2N, every group's copy of every event was re-produced.
    assert sum(after.values()) - sum(before.values()) == n, first
    assert first.startswith(f"redrove {n} dead letter(s) from '{dlq}' to '{topic}' (skipped {n}")
    second = redrive()
    assert end_offsets(bootstrap, topic) == after, second  # progress stays committed
    assert second.startswith("redrove 0 dead letter(s)")

    # Each re-produced message comes from a distinct source position: all N of them.
    by_dlq_position = {(p, o): headers for p, o, _, headers in letters}
    redriven = read_all(bootstrap, topic, since=before)
    assert len(redriven) == n
    sources = []
    for _, _, _, headers in redriven:
        _, dlq_partition, dlq_offset = (headers["spr-redriven-from"] or b"").decode().rsplit(":", 2)
        origin = by_dlq_position[(int(dlq_partition), int(dlq_offset))]
        sources.append((
            (origin["spr-source-topic"] or b"").decode(),
            int(origin["spr-source-partition"] or b"-1"),
            int(origin["spr-source-offset"] or b"-1"),
        ))  # fmt: skip
        assert not {"spr-group", "spr-source-offset", "spr-error"} & headers.keys()
    assert sorted(sources) == sorted(positions)

    # Each letter names the group that wrote it, and each group wrote one per event.
    written_by = Counter((h.get("spr-group") or b"").decode() for *_, h in letters)
    assert written_by == {groups[0]: n, groups[1]: n}
    for group in groups:
        mine = {
            (h["spr-source-topic"], h["spr-source-partition"], h["spr-source-offset"])
            for *_, h in letters
            if h.get("spr-group") == group.encode()
        }
        assert len(mine) == n

    # spr dlq list: the summary carries the groups, and can be limited to one.
    from spr.dlq import summarize

    summary = summarize(bootstrap=bootstrap, source_topic=topic)
    assert summary.total == 2 * n and summary.by_group == {groups[0]: n, groups[1]: n}
    one = summarize(bootstrap=bootstrap, source_topic=topic, group=groups[1])
    assert one.total == n and dict(one.by_class) == {"invalid": n}
    assert one.by_group == {groups[1]: n}
    assert spr_main(["dlq", "list", "--topic", topic, "--bootstrap", bootstrap]) == 0
    listing = capsys.readouterr().out.splitlines()
    at = listing.index("by consumer group:")
    assert sorted(listing[at + 1 : at + 3]) == sorted(f"  {g:<10} {n}" for g in groups)


def test_a_late_copy_from_another_group_is_not_redriven_again(
    bootstrap: str, make_topic: Callable[..., str], cleanup: tuple[list[str], list[str]],
) -> None:  # fmt: skip
    from spr.dlq import DeadLetterWriter, SourceRecord, redrive

    topic = make_topic(partitions=2)
    dlq = f"{topic}.dlq"
    cleanup[0].append(dlq)
    records = [
        SourceRecord(topic=topic, partition=i % 2, offset=10 + i, key=f"k{i}".encode(), value=b"{")
        for i in range(4)
    ]

    def write(group: str, classes: list[str]) -> None:
        with DeadLetterWriter(bootstrap=bootstrap, group=group) as writer:
            for record, error_class in zip(records, classes, strict=True):
                writer.send(record, error_class, "bad", attempts=1)

    write("fast", ["invalid", "invalid", "data", "data"])
    start = end_offsets(bootstrap, topic)
    first = redrive(bootstrap=bootstrap, source_topic=topic)
    assert (first.redriven, first.skipped, first.duplicates) == (4, 0, 0)
    # A slower group dead-letters the same events after the redrive: nothing is re-sent.
    write("slow", ["invalid", "invalid", "data", "data"])
    late = redrive(bootstrap=bootstrap, source_topic=topic)
    assert (late.redriven, late.skipped, late.duplicates) == (0, 4, 4)
    assert sum(end_offsets(bootstrap, topic).values()) - sum(start.values()) == 4
    # --error-class still filters, with its own progress, and sends each position once.
    data = redrive(bootstrap=bootstrap, source_topic=topic, error_class="data")
    assert (data.redriven, data.skipped, data.duplicates) == (2, 6, 2)
    assert redrive(bootstrap=bootstrap, source_topic=topic, error_class="data").redriven == 0
    # A new event's letter is redriven once, its late copy skipped in the same run.
    records[:] = [SourceRecord(topic=topic, partition=1, offset=99, key=b"k99", value=b"[")]
    write("fast", ["invalid"])
    write("slow", ["invalid"])
    last = redrive(bootstrap=bootstrap, source_topic=topic)
    assert (last.redriven, last.skipped, last.duplicates) == (1, 1, 1)
    assert sum(end_offsets(bootstrap, topic).values()) - sum(start.values()) == 4 + 2 + 1
