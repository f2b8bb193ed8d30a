"""Sources and independent checks for the ``spr transform`` tests (design §2, §3, §10).

What the source producers reported they sent (topic, partition, offset and bytes of
every message, with what the test meant it to be: valid, invalid, unorderable, a
duplicate) goes in; the output topic, the dead-letter topics and ``spr run``'s table
are read back and compared with expectations computed here from those reports alone:
the field aliases are resolved by this module's own table, not spr's decoder, and a
missing sequence is the source offset the broker reported.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from confluent_kafka import IsolationLevel, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec
from helpers import (
    Record,
    assert_exact,
    delete_topics,
    drop_state,
    read_records,
    spr_run_argv,
)

from spr.routing import partition_for, partition_key

INTEROP = Path(__file__).resolve().parents[1] / "interop"
OUTPUT_HEADERS = (
    "idempotency-key",
    "schema-version",
    "spr-source-topic",
    "spr-source-partition",
    "spr-source-offset",
)
Kind = Literal["valid", "invalid", "unorderable", "duplicate"]
Position = tuple[str, int, int]

# Design §2's aliases, resolved here independently of spr's decoder. The test data uses
# at most one alias per field, so their precedence never matters.
ALIASES = {
    "event_id": ("event_id", "eventId", "id"),
    "entity_type": ("entity_type", "entityType", "type", "event_type"),
    "entity_id": ("entity_id", "entityId"),
    "state": ("state", "status"),
    "sequence": ("sequence", "seq"),
    "timestamp": ("timestamp", "ts"),
}


def foreign() -> ModuleType:
    """``tests/interop/foreign.py`` (the sarama, librdkafka and kafkajs producers)."""
    if str(INTEROP) not in sys.path:
        sys.path.insert(0, str(INTEROP))
    return importlib.import_module("foreign")


@dataclass(frozen=True)
class Sent:
    """One source message as its producer reported it, and what it is meant to be."""

    topic: str
    partition: int
    offset: int
    value: bytes
    kind: Kind = "valid"
    producer: str = "test"

    @property
    def position(self) -> Position:
        return (self.topic, self.partition, self.offset)

    def expected(self) -> dict[str, Any]:
        """The canonical event this message must become (a valid one)."""
        raw = json.loads(self.value)
        out: dict[str, Any] = {}
        for name, keys in ALIASES.items():
            present = [k for k in keys if k in raw]
            assert len(present) <= 1, f"test data has two aliases of {name}: {raw}"
            out[name] = raw[present[0]] if present else None
        if out["sequence"] is None:
            out["sequence"] = self.offset  # design §2: the Kafka offset
        if out["event_id"] is None:
            out["event_id"] = f"{out['entity_type']}:{out['entity_id']}:{out['sequence']}"
        out["routing_key"] = f"{out['entity_type']}:{out['entity_id']}"
        return out


def from_foreign(records: Iterable[Any]) -> list[Sent]:
    """:class:`Sent` of the foreign producers' reports (all valid)."""
    return [Sent(r.topic, r.partition, r.offset, r.value, "valid", r.producer) for r in records]


def send(
    bootstrap: str, topic: str, items: Sequence[tuple[int, bytes, bytes]], kind: Kind
) -> list[Sent]:
    """Produce ``(partition, key, value)`` items in order, each to its explicit partition;
    returns what the broker reported, as ``kind``."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    reports: dict[int, tuple[int, int]] = {}
    failures: list[str] = []

    def _report(index: int) -> Any:
        def _done(error: KafkaError | None, message: Any) -> None:
            if error is not None:
                failures.append(str(error))
            else:
                reports[index] = (message.partition(), message.offset())

        return _done

    for index, (partition, key, value) in enumerate(items):
        producer.produce(topic, value, key, partition=partition, on_delivery=_report(index))
    assert producer.flush(30) == 0 and not failures, failures
    return [
        Sent(topic, *reports[i], items[i][2], kind, "test") for i in range(len(items))
    ]  # fmt: skip


def sarama_shaped(entity_type: str, entity_id: str, state: str, ts: int) -> bytes:
    """An event shaped like the field report's Go producer: no sequence, ``event_type``."""
    return json.dumps(
        {"event_type": entity_type, "entity_id": entity_id, "state": state, "timestamp": ts}
    ).encode()


INVALID_VALUES = (
    b'{"entity_type": "order", "entity_id": "bad-json"',  # truncated: not JSON
    b'{"entity_type": "order", "entity_id": "no-state"}',  # missing state
    b'{"entity_type": "order", "entity_id": "", "state": "created"}',  # empty entity_id
    b'{"type": "order", "entityId": "neg", "status": "created", "seq": -1}',  # sequence < 0
    b"[1, 2, 3]",  # not an object
)


class SourceStream:
    """A steady stream of events in the three foreign shapes, produced on a thread at
    ``rate`` events/s with librdkafka's default partitioner (CRC32 of the key):

    * sarama's: ``event_type``/``entity_id``/``state``/``timestamp``, no sequence,
      keyed by the plain ``type:id``;
    * librdkafka's: ``id``/``type``/``entity_id``/``seq``/``status``/``ts``;
    * kafkajs 2's: ``eventId``/``entityType``/``entityId``/``seq``/``status``/``ts``;

    each shape on its own entity type (so that an entity's events either all have a
    sequence or none has), every ``invalid_every``-th message one of
    :data:`INVALID_VALUES`. ``sent`` holds the delivery reports. The producer outlives a
    broker restart (idempotent, two-minute message timeout)."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        count: int,
        *,
        rate: float,
        entities: int = 40,
        seed: int = 0,
        invalid_every: int = 150,
    ) -> None:
        self.bootstrap, self.topic, self.count, self.rate = bootstrap, topic, count, rate
        self.entities, self.invalid_every = entities, invalid_every
        self.rng = random.Random(seed)
        self.sent: list[Sent] = []
        self.errors: list[str] = []
        self._sequences: dict[str, int] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._lock = threading.Lock()

    def start(self) -> SourceStream:
        self._thread.start()
        return self

    def join(self, timeout_s: float = 120.0) -> list[Sent]:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), f"the source stream did not finish in {timeout_s} s"
        assert not self.errors, self.errors[:5]
        assert len(self.sent) == self.count, (len(self.sent), self.count)
        return sorted(self.sent, key=lambda s: s.position)

    @property
    def delivered(self) -> int:
        with self._lock:
            return len(self.sent)

    def message(self, index: int) -> tuple[bytes, bytes, Kind, str]:
        """Key, value, kind and shape of the ``index``-th message."""
        rng = self.rng
        if self.invalid_every and index % self.invalid_every == self.invalid_every - 1:
            return f"bad-{index}".encode(), rng.choice(INVALID_VALUES), "invalid", "invalid"
        shape = ("sarama", "librdkafka", "kafkajs")[index % 3]
        entity_type = {"sarama": "order", "librdkafka": "payment", "kafkajs": "shipment"}[shape]
        entity_id = f"{shape[:2]}-{rng.randrange(self.entities)}"
        routing_key = f"{entity_type}:{entity_id}"
        state = rng.choice(("created", "authorized", "captured", "shipped", "closed"))
        ts = 1_700_000_000_000 + index
        if shape == "sarama":
            return (
                routing_key.encode(),
                sarama_shaped(entity_type, entity_id, state, ts),
                "valid",
                shape,
            )
        self._sequences[routing_key] = sequence = self._sequences.get(routing_key, 0) + 1
        if shape == "librdkafka":
            event = {"id": f"s-{index}", "type": entity_type, "entity_id": entity_id,
                     "seq": sequence, "status": state, "ts": ts}  # fmt: skip
        else:
            event = {"eventId": f"s-{index}", "entityType": entity_type, "entityId": entity_id,
                     "seq": sequence, "status": state, "ts": ts}  # fmt: skip
        key = partition_key(routing_key).encode()
        return key, json.dumps(event).encode(), "valid", shape

    def _run(self) -> None:
        producer = Producer(
            {
                "bootstrap.servers": self.bootstrap,
                "enable.idempotence": True,
                "linger.ms": 5,
                "message.timeout.ms": 120_000,
            }
        )
        started = time.monotonic()

        def _report(value: bytes, kind: Kind, shape: str) -> Any:
            def _done(error: KafkaError | None, message: Any) -> None:
                if error is not None:
                    self.errors.append(str(error))
                    return
                sent = Sent(self.topic, message.partition(), message.offset(), value, kind, shape)
                with self._lock:
                    self.sent.append(sent)

            return _done

        try:
            for index in range(self.count):
                delay = started + index / self.rate - time.monotonic()
                if delay > 0:
                    producer.poll(delay)
                key, value, kind, shape = self.message(index)
                while True:
                    try:
                        producer.produce(self.topic, value, key,
                                         on_delivery=_report(value, kind, shape))  # fmt: skip
                        break
                    except BufferError:
                        producer.poll(0.1)
                producer.poll(0)
            left = producer.flush(150)
            if left:
                self.errors.append(f"{left} messages not delivered")
        except BaseException as exc:
            self.errors.append(repr(exc))


# Reading back and checking.


def admin_for(bootstrap: str) -> AdminClient:
    """A new admin client for one check. Never cached: after a broker restart a client
    that lost every broker can hang in its group coordinator requests (librdkafka
    issues #5456, #5511), which the tests must not share with the code under test."""
    return AdminClient({"bootstrap.servers": bootstrap, "log_level": 5})


def open_transaction_ranges(bootstrap: str, topic: str) -> dict[int, tuple[int, int]]:
    """Per partition with an open transaction: ``(last stable offset, high watermark)``."""
    admin = admin_for(bootstrap)
    partitions = admin.list_topics(topic, timeout=10).topics[topic].partitions
    ends = {}
    for isolation in (IsolationLevel.READ_COMMITTED, IsolationLevel.READ_UNCOMMITTED):
        futures = admin.list_offsets(
            {TopicPartition(topic, p): OffsetSpec.latest() for p in partitions},
            isolation_level=isolation,
            request_timeout=10,
        )
        ends[isolation] = {tp.partition: f.result(timeout=10).offset for tp, f in futures.items()}
    stable, high = ends[IsolationLevel.READ_COMMITTED], ends[IsolationLevel.READ_UNCOMMITTED]
    return {p: (stable[p], high[p]) for p in partitions if stable[p] < high[p]}


def wait_no_open_transaction(bootstrap: str, topic: str, timeout_s: float = 30.0) -> None:
    """Wait until no transaction is open on ``topic`` (a transform's transaction
    timeout is 10 s, so a dead worker's is aborted by then)."""
    deadline = time.monotonic() + timeout_s
    while open_transaction_ranges(bootstrap, topic):
        assert time.monotonic() < deadline, f"a transaction stayed open on {topic}"
        time.sleep(0.2)


def committed_offsets(bootstrap: str, group: str) -> dict[tuple[str, int], int]:
    """The group's committed offsets in Kafka (retried for up to a minute while the broker
    does not answer or still loads its coordinator state, as after a restart)."""
    from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException

    deadline = time.monotonic() + 60
    while True:
        request = [ConsumerGroupTopicPartitions(group)]
        admin = admin_for(bootstrap)  # kept alive until its answer arrived
        try:
            result = admin.list_consumer_group_offsets(request)[group]
            return {
                (tp.topic, tp.partition): tp.offset
                for tp in result.result(timeout=10).topic_partitions or []
                if tp.offset >= 0
            }
        except (KafkaException, TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _source(record: Record) -> Position:
    topic = record.header("spr-source-topic")
    partition = record.header("spr-source-partition")
    offset = record.header("spr-source-offset")
    assert topic is not None and partition is not None and offset is not None, record
    return (topic.decode(), int(partition), int(offset))


@dataclass
class Outcome:
    """What the checks found: records visible under read_committed, records only a
    read_uncommitted reader sees (aborted transactions), dead letters, and the state
    ``spr run`` must reach (``helpers.assert_exact``'s shape)."""

    committed: int = 0
    aborted: int = 0
    dead_letters: int = 0
    model: dict[str, dict[str, Any]] = field(default_factory=dict)


def check_output(
    bootstrap: str,
    sent: Sequence[Sent],
    *,
    output: str,
    group: str,
    partitions: int,
    dlq_topics: Sequence[str] | None = None,
) -> Outcome:
    """Check ``output`` and the dead-letter topics against ``sent``; see the module doc.

    Asserts: every valid message exactly once under read_committed (by its source
    position header) and nothing else; each record's key is the partition key of its
    entity, its partition ``partition_for(key, partitions)``, its headers and canonical
    value right (a missing sequence is the source offset); per entity, output order is
    source order; what only read_uncommitted sees is output of valid messages that is
    visible again; the dead-letter topics hold exactly the invalid (class ``invalid``)
    and unorderable (class ``unorderable``) messages, once each, with their bytes and
    ``spr-group``; duplicates are in neither."""
    wait_no_open_transaction(bootstrap, output)
    by_position = {s.position: s for s in sent}
    assert len(by_position) == len(sent), "two reports for one source position"
    valid = {p: s for p, s in by_position.items() if s.kind == "valid"}
    expected = {p: s.expected() for p, s in valid.items()}
    committed = read_records(bootstrap, output, committed=True)
    uncommitted = read_records(bootstrap, output, committed=False)

    # Exactly once, by source position.
    seen: dict[Position, Record] = {}
    twice: list[Position] = []
    for record in committed:
        assert {k for k, _ in record.headers} == set(OUTPUT_HEADERS), record.headers
        position = _source(record)
        if position in seen:
            twice.append(position)
        seen[position] = record
    missing = sorted(valid.keys() - seen.keys())
    extra = sorted(seen.keys() - valid.keys())
    assert not twice and not missing and not extra, (
        f"{len(twice)} twice, {len(missing)} missing, {len(extra)} not valid "
        f"({[by_position.get(p) for p in extra[:3]]}); e.g. {twice[:3]} {missing[:3]}"
    )

    # Key, partition, headers and value of each record.
    by_entity: dict[str, list[Record]] = defaultdict(list)
    for position, record in seen.items():
        want = expected[position]
        key = partition_key(want["routing_key"]).encode()
        assert record.key == key, (position, record.key, want)
        assert record.partition == partition_for(key.decode(), partitions), (position, record)
        assert record.header("schema-version") == b"v2", record
        idempotency_key = f"{want['routing_key']}:{want['sequence']}".encode()
        assert record.header("idempotency-key") == idempotency_key, (record, want)
        assert record.value is not None
        value = json.loads(record.value)
        for name in ("event_id", "entity_type", "entity_id", "sequence", "state"):
            assert value[name] == want[name], (name, value, want)
        if want["timestamp"] is not None:
            assert value["timestamp"] == want["timestamp"], (value, want)
        assert value["payload"] == json.loads(valid[position].value), value
        by_entity[want["routing_key"]].append(record)

    # Per entity: output order is source order.
    for routing_key, records in by_entity.items():
        records.sort(key=lambda r: (r.partition, r.offset))
        assert len({r.partition for r in records}) == 1, routing_key
        sources = [_source(r) for r in records]
        assert len({(t, p) for t, p, _ in sources}) == 1, (routing_key, sources[:5])
        offsets = [o for _, _, o in sources]
        assert offsets == sorted(offsets), (routing_key, offsets)
        sequences = [expected[s]["sequence"] for s in sources]
        assert len(set(sequences)) == len(sequences), (routing_key, sequences)  # no repeats

    # Aborted output: only a read_uncommitted reader sees it, and it is output of valid
    # messages, each of which is visible once under read_committed.
    visible = {(r.partition, r.offset) for r in committed}
    uncommitted_at = {(r.partition, r.offset): r for r in uncommitted}
    assert visible <= uncommitted_at.keys()
    aborted = [r for k, r in uncommitted_at.items() if k not in visible]
    assert all(_source(r) in seen for r in aborted), "aborted output of no valid message"

    # Dead letters: exactly the invalid and unorderable messages, once each.
    topics = sorted({s.topic for s in sent})
    letters: dict[Position, Record] = {}
    for dlq in dlq_topics if dlq_topics is not None else [f"{t}.dlq" for t in topics]:
        for letter in read_records(bootstrap, dlq, committed=True):
            position = _source(letter)
            assert position not in letters, f"{position} dead-lettered twice"
            letters[position] = letter
    wanted = {p: s for p, s in by_position.items() if s.kind in ("invalid", "unorderable")}
    assert letters.keys() == wanted.keys(), (
        f"dead letters: {len(letters.keys() - wanted.keys())} unexpected "
        f"{[by_position.get(p) for p in sorted(letters.keys() - wanted.keys())[:3]]}, "
        f"{len(wanted.keys() - letters.keys())} missing {sorted(wanted.keys() - letters.keys())[:3]}"
    )
    for position, letter in letters.items():
        source = wanted[position]
        assert letter.header("spr-error-class") == source.kind.encode(), (letter, source)
        assert letter.header("spr-group") == group.encode(), letter
        assert letter.value == source.value, (letter, source)
        assert letter.header("spr-error"), letter

    # The state spr run must reach: the newest sequence of each entity.
    model: dict[str, dict[str, Any]] = {}
    for want in expected.values():
        current = model.get(want["routing_key"])
        if current is None or want["sequence"] > current["sequence"]:
            model[want["routing_key"]] = {
                "sequence": want["sequence"],
                "state": want["state"],
                "event_id": want["event_id"],
            }
    return Outcome(
        committed=len(committed), aborted=len(aborted), dead_letters=len(letters), model=model
    )


# Running the processes, and cleaning up after them.


class Scratch:
    """What one test creates: processes (killed at cleanup when still running, only
    these PIDs), topics the transform creates (dead-letter topics, an output topic),
    state tables and consumer groups."""

    def __init__(self, bootstrap: str, dsn: str) -> None:
        self.bootstrap, self.dsn = bootstrap, dsn
        self.processes: list[subprocess.Popen[bytes]] = []
        self.topics: list[str] = []
        self.tables: list[str] = []
        self.groups: list[str] = []

    def start(
        self, argv: list[str], log: Path, *, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with log.open("ab") as handle:
            proc = subprocess.Popen(
                argv, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
            )
        self.processes.append(proc)
        return proc

    def cleanup(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.kill()  # also ends a stopped (SIGSTOP) process
            proc.wait(30)
        delete_topics(self.bootstrap, self.topics)
        for table in self.tables:
            drop_state(self.dsn, table, self.groups)
        if self.groups:
            admin = AdminClient({"bootstrap.servers": self.bootstrap})
            for future in admin.delete_consumer_groups(self.groups, request_timeout=10).values():
                with contextlib.suppress(Exception):
                    future.result(timeout=15)


def apply_with_spr_run(
    scratch: Scratch,
    *,
    output: str,
    model: dict[str, dict[str, Any]],
    log: Path,
    env: dict[str, str] | None = None,
    idle_exit_s: float = 2.0,
    bound_s: float = 90.0,
    group: str | None = None,
) -> float:
    """``spr run --topic output`` into a new table with ``--idle-exit`` (as ``group``, by
    default a new one); asserts it exits 0 within ``bound_s``, the table equals ``model``
    and the stored offsets equal the high watermarks (``helpers.assert_exact``), which
    on a transactional topic lie past the last commit marker. Returns how long it ran."""
    table = f"state_{uuid.uuid4().hex[:10]}"
    group = group or f"g-run-{uuid.uuid4().hex[:10]}"
    scratch.tables.append(table)
    scratch.groups.append(group)
    scratch.topics.append(f"{output}.dlq")
    argv = spr_run_argv(topics=[output], group=group, dsn=scratch.dsn, bootstrap=scratch.bootstrap,
                        table=table, extra=["--idle-exit", str(idle_exit_s)])  # fmt: skip
    started = time.monotonic()
    proc = scratch.start(argv, log, env=env)
    try:
        code = proc.wait(bound_s)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"spr run did not exit within {bound_s} s: {tail(log)}") from None
    elapsed = time.monotonic() - started
    assert code == 0, tail(log)
    assert_exact(dsn=scratch.dsn, bootstrap=scratch.bootstrap, table=table, group=group,
                 topics=[output], expected=model)  # fmt: skip
    return elapsed


def tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else ""
