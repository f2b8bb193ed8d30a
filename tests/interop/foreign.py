"""Foreign producers for the ``spr transform`` tests: build them, run them, read back.

Three producers of the field report write one source topic, each the way its client
does by default (design §1, issue 14):

* ``sarama``: ``sarama/main.go``, github.com/IBM/sarama with its default hash
  partitioner (FNV-1a, :func:`sarama_partition`), events ``{event_type, entity_id, state,
  timestamp}`` with no sequence, keyed by the plain ``entity_type:entity_id``, with the
  report's ``idempotency-key: entity_type:entity_id`` header;
* ``librdkafka``: ``librdkafka_producer.py``, confluent-kafka with librdkafka's default
  ``consistent_random`` partitioner (CRC32, :func:`librdkafka_partition`), canonical and
  alias field names alternately, with a sequence, keyed by spr's partition key;
* ``kafkajs``: ``kafkajs_producer.js``, kafkajs 2.x with its DefaultPartitioner (murmur2,
  the same as spr's ``partition_for``), alias field names only, with a sequence, keyed by
  spr's partition key.

:func:`produce_mixed` writes all three into one topic and returns a :class:`ForeignRecord`
for every message, with the partition and offset the broker assigned, which is all a
test needs to compute the source order on its own. The Go program is built once per
content (``go build``, modules from the Go module proxy, pinned by ``sarama/go.sum``),
into a cache directory; kafkajs is installed with ``npm ci`` from ``package-lock.json``
when missing. Every subprocess has a bounded timeout, and a missing ``go``, ``node`` or
``npm`` raises :class:`ToolError` with one sentence. Import it with ``tests/interop`` on
``sys.path``. ``python tests/interop/check_foreign.py`` runs the producers against the
broker and checks where their events landed.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import random
import shutil
import subprocess
import time
import uuid
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from librdkafka_producer import produce as librdkafka_produce

__all__ = [
    "INTEROP",
    "PRODUCERS",
    "ForeignRecord",
    "StoredRecord",
    "ToolError",
    "fnv1a_32",
    "kafkajs_events",
    "kafkajs_ready",
    "librdkafka_events",
    "librdkafka_partition",
    "placement_problems",
    "produce_mixed",
    "read_topic",
    "run_kafkajs",
    "run_librdkafka",
    "run_sarama",
    "sarama_binary",
    "sarama_events",
    "sarama_partition",
]

INTEROP = Path(__file__).resolve().parent
SARAMA_DIR = INTEROP / "sarama"
PRODUCERS = ("sarama", "librdkafka", "kafkajs")
BUILD_TIMEOUT_S = 600.0
INSTALL_TIMEOUT_S = 300.0
START_MS = 1_700_000_000_000


class ToolError(RuntimeError):
    """A foreign producer could not be built, installed or run."""


@dataclass(frozen=True)
class ForeignRecord:
    """One message a foreign producer sent, where the broker put it, and its bytes.

    ``index`` is the position in that producer's input; within one producer and one
    partition, offsets grow with it.
    """

    producer: str
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]
    index: int

    def event(self) -> dict[str, Any]:
        """The JSON value, decoded."""
        decoded: dict[str, Any] = json.loads(self.value)
        return decoded


@dataclass(frozen=True)
class StoredRecord:
    """A message as a consumer reads it back from the topic."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]


# Placement of each client's default partitioner, written from its source.


def fnv1a_32(data: bytes) -> int:
    """32-bit FNV-1a, Go's ``hash/fnv.New32a`` (unsigned)."""
    h = 0x811C9DC5
    for byte in data:
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h


def sarama_partition(key: bytes, num_partitions: int) -> int:
    """sarama's default ``NewHashPartitioner`` for a non-nil key.

    ``partition = int32(fnv1a) % n`` with Go's truncated remainder (it takes the sign of
    the hash), then negated when negative: ``abs(int32(h)) % n``. That is not Java's
    ``(h & 0x7fffffff) % n`` (sarama's ``NewReferenceHashPartitioner``) when the hash is
    negative, nor the unsigned ``h % n`` of ``WithHashUnsigned``.
    """
    signed = fnv1a_32(key)
    if signed >= 0x80000000:
        signed -= 0x1_0000_0000
    remainder = abs(signed) % num_partitions  # Go: sign(h) * (|h| % n), then negated if < 0
    return remainder


def librdkafka_partition(key: bytes, num_partitions: int) -> int:
    """librdkafka's default ``consistent_random`` for a non-empty key: unsigned CRC32
    (IEEE, what ``zlib.crc32`` computes) modulo the partition count. An empty or null key
    goes to a random partition and cannot be predicted."""
    if not key:
        raise ValueError("consistent_random places an empty key at random")
    return zlib.crc32(key) % num_partitions


# Building and installing.


def _tool(name: str, hint: str) -> str:
    path = shutil.which(name)
    if path is None and name == "go" and os.access("/usr/local/go/bin/go", os.X_OK):
        path = "/usr/local/go/bin/go"  # the official archive's place, often not on PATH
    if path is None:
        raise ToolError(f"'{name}' is not on PATH; {hint}")
    return path


def _cache_dir() -> Path:
    base = os.environ.get("SPR_INTEROP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "spr", "interop"
    )
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """An exclusive lock between processes (parallel test runs share the cache)."""
    with open(_cache_dir() / f"{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(
    command: Sequence[str],
    *,
    what: str,
    timeout_s: float,
    cwd: Path | None = None,
    stdin: str | None = None,
    env: Mapping[str, str] | None = None,
) -> str:
    try:
        out = subprocess.run(
            list(command),
            input=stdin,
            capture_output=True,
            text=True,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as expired:
        stderr = expired.stderr or b""
        tail = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr
        raise ToolError(f"{what} did not finish within {timeout_s:.0f} s: {tail[-2000:]}") from None
    if out.returncode != 0:
        raise ToolError(f"{what} failed with exit status {out.returncode}: {out.stderr[-2000:]}")
    return out.stdout


@functools.cache
def sarama_binary() -> Path:
    """The built sarama producer; builds it on first use (once per content and Go version).

    ``go build -mod=readonly`` downloads github.com/IBM/sarama and its dependencies from
    ``$GOPROXY`` (the Go module proxy by default) and checks them against ``go.sum``; it
    never rewrites ``go.mod``. With ``GOTOOLCHAIN=auto`` (Go's default) an older ``go``
    (>= 1.21) fetches the toolchain that ``go.mod`` asks for from the same proxy.
    """
    go = _tool("go", "install Go (>= 1.21; go.mod asks for 1.26, fetched automatically)")
    version = _run([go, "version"], what="go version", timeout_s=60, cwd=SARAMA_DIR)
    digest = hashlib.sha256(version.encode())
    for name in ("go.mod", "go.sum", "main.go"):
        digest.update((SARAMA_DIR / name).read_bytes())
    binary = _cache_dir() / f"sarama-producer-{digest.hexdigest()[:16]}"
    with _locked("sarama-build"):
        if not binary.exists():
            partial = binary.with_name(f"{binary.name}.{uuid.uuid4().hex[:8]}.tmp")
            command = [go, "build", "-mod=readonly", "-trimpath", "-buildvcs=false"]
            _run(
                [*command, "-o", str(partial), "."],
                what="go build of tests/interop/sarama",
                timeout_s=BUILD_TIMEOUT_S,
                cwd=SARAMA_DIR,
            )
            os.replace(partial, binary)
    return binary


@functools.cache
def kafkajs_ready() -> Path:
    """``node``, with kafkajs installed in tests/interop (``npm ci`` when missing)."""
    node = _tool("node", "install Node.js >= 18 (Debian: nodejs)")
    major = _run([node, "--version"], what="node --version", timeout_s=30).strip()
    if int(major.lstrip("v").split(".")[0]) < 18:
        raise ToolError(f"kafkajs_producer.js needs Node.js >= 18, found {major}")
    with _locked("kafkajs-install"):
        if not (INTEROP / "node_modules" / "kafkajs" / "package.json").exists():
            npm = _tool("npm", "install npm (Debian: npm)")
            _run(
                [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                what="npm ci in tests/interop",
                timeout_s=INSTALL_TIMEOUT_S,
                cwd=INTEROP,
            )
    return Path(node)


# Running the producers.


def _jsonl(events: Sequence[Mapping[str, Any]]) -> str:
    return "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in events)


def _parse_sent(
    producer: str, topic: str, stdout: str, expected: int, headers_of_key: bool
) -> list[ForeignRecord]:
    records = []
    for line in stdout.splitlines():
        sent = json.loads(line)
        key = sent["key"].encode()
        records.append(
            ForeignRecord(
                producer=producer,
                topic=topic,
                partition=int(sent["partition"]),
                offset=int(sent["offset"]),
                key=key,
                value=sent["value"].encode(),
                headers=(("idempotency-key", key),) if headers_of_key else (),
                index=int(sent["index"]),
            )
        )
    if [r.index for r in records] != list(range(expected)):
        raise ToolError(f"{producer} reported {len(records)} of {expected} messages")
    return records


def run_sarama(
    bootstrap: str, topic: str, events: Sequence[Mapping[str, Any]], *, timeout_s: float = 120.0
) -> list[ForeignRecord]:
    """Send ``events`` ({entity_type or event_type, entity_id, state, timestamp?}) with
    the sarama program; returns one record per event, in input order."""
    stdout = _run(
        [
            str(sarama_binary()),
            f"-bootstrap={bootstrap}",
            f"-topic={topic}",
            "-events=-",
            f"-timeout={int(timeout_s)}s",
        ],
        what="sarama producer",
        timeout_s=timeout_s + 30,
        stdin=_jsonl(events),
    )
    return _parse_sent("sarama", topic, stdout, len(events), headers_of_key=True)


def run_kafkajs(
    bootstrap: str,
    topic: str,
    events: Sequence[Mapping[str, Any]],
    *,
    key: Literal["partition", "routing"] = "partition",
    timeout_s: float = 120.0,
) -> list[ForeignRecord]:
    """Send ``events`` (canonical names; the script renames them to aliases) with
    kafkajs; ``key`` is ``"partition"`` (spr's partition key) or ``"routing"``."""
    node = kafkajs_ready()
    env = {**os.environ, "KAFKAJS_NO_PARTITIONER_WARNING": "1"}
    stdout = _run(
        [
            str(node),
            "kafkajs_producer.js",
            "--bootstrap",
            bootstrap,
            "--topic",
            topic,
            "--events",
            "-",
            "--key",
            key,
            "--timeout-ms",
            str(int(timeout_s * 1000)),
        ],
        what="kafkajs producer",
        timeout_s=timeout_s + 30,
        cwd=INTEROP,
        stdin=_jsonl(events),
        env=env,
    )
    return _parse_sent("kafkajs", topic, stdout, len(events), headers_of_key=False)


def run_librdkafka(
    bootstrap: str,
    topic: str,
    events: Sequence[Mapping[str, Any]],
    *,
    key: Literal["partition", "routing"] = "partition",
    timeout_s: float = 60.0,
) -> list[ForeignRecord]:
    """Send ``events`` verbatim with confluent-kafka's default partitioner."""
    try:
        delivered = librdkafka_produce(bootstrap, topic, events, key=key, timeout_s=timeout_s)
    except (RuntimeError, TimeoutError) as error:
        raise ToolError(f"librdkafka producer: {error}") from error
    return [
        ForeignRecord(
            producer="librdkafka",
            topic=d.topic,
            partition=d.partition,
            offset=d.offset,
            key=d.key,
            value=d.value,
            headers=d.headers,
            index=d.index,
        )
        for d in delivered
    ]


# Events in each producer's own shape, reproducible from a seed.


def _entity_ids(rng: random.Random, prefix: str, count: int, entities: int) -> list[str]:
    return [f"{prefix}-{rng.randrange(max(1, entities))}" for _ in range(count)]


def sarama_events(
    count: int, *, entities: int = 20, seed: int = 0, entity_type: str = "order"
) -> list[dict[str, Any]]:
    """Input for :func:`run_sarama`: the Go producer's fields, no sequence."""
    rng = random.Random(f"sarama-{seed}")
    states = ["created", "authorized", "captured", "refunded", "cancelled"]
    return [
        {
            "event_type": entity_type,
            "entity_id": entity_id,
            "state": rng.choice(states),
            "timestamp": START_MS + i,
        }
        for i, entity_id in enumerate(_entity_ids(rng, "go", count, entities))
    ]


def librdkafka_events(
    count: int, *, entities: int = 20, seed: int = 0, entity_type: str = "payment"
) -> list[dict[str, Any]]:
    """Input for :func:`run_librdkafka`, sent verbatim: canonical names and the aliases
    ``id``/``type``/``seq``/``status``/``ts`` alternately, per-entity sequences 1, 2, ..."""
    rng = random.Random(f"librdkafka-{seed}")
    states = ["pending", "authorized", "settled", "failed", "refunded"]
    sequences: dict[str, int] = {}
    events: list[dict[str, Any]] = []
    for i, entity_id in enumerate(_entity_ids(rng, "py", count, entities)):
        sequences[entity_id] = sequence = sequences.get(entity_id, 0) + 1
        state = rng.choice(states)
        event_id = f"py-{seed}-{i}"
        if i % 2 == 0:
            events.append(
                {
                    "event_id": event_id,
                    "entity_type": entity_type,
                    "entity_id": entity_id,
                    "sequence": sequence,
                    "state": state,
                    "timestamp": START_MS + i,
                }
            )
        else:
            events.append(
                {
                    "id": event_id,
                    "type": entity_type,
                    "entity_id": entity_id,
                    "seq": sequence,
                    "status": state,
                    "ts": START_MS + i,
                }
            )
    return events


def kafkajs_events(
    count: int, *, entities: int = 20, seed: int = 0, entity_type: str = "shipment"
) -> list[dict[str, Any]]:
    """Input for :func:`run_kafkajs` (canonical names; the script sends the aliases
    ``eventId``/``entityType``/``entityId``/``status``/``seq`` or ``sequence``/``ts``)."""
    rng = random.Random(f"kafkajs-{seed}")
    states = ["created", "picked", "packed", "shipped", "delivered"]
    sequences: dict[str, int] = {}
    events: list[dict[str, Any]] = []
    for i, entity_id in enumerate(_entity_ids(rng, "js", count, entities)):
        sequences[entity_id] = sequence = sequences.get(entity_id, 0) + 1
        events.append(
            {
                "event_id": f"js-{seed}-{i}",
                "entity_type": entity_type,
                "entity_id": entity_id,
                "sequence": sequence,
                "state": rng.choice(states),
                "timestamp": START_MS + i,
            }
        )
    return events


def produce_mixed(
    bootstrap: str,
    topic: str,
    *,
    count: int = 300,
    entities: int = 20,
    seed: int = 0,
    timeout_s: float = 120.0,
) -> list[ForeignRecord]:
    """Write ``count`` events from each foreign producer into ``topic``, one producer
    after the other (sarama, librdkafka, kafkajs), each on its own entity type (order,
    payment, shipment) with ``entities`` entities. Returns every record, in that order."""
    return [
        *run_sarama(
            bootstrap,
            topic,
            sarama_events(count, entities=entities, seed=seed),
            timeout_s=timeout_s,
        ),
        *run_librdkafka(
            bootstrap,
            topic,
            librdkafka_events(count, entities=entities, seed=seed),
            timeout_s=timeout_s,
        ),
        *run_kafkajs(
            bootstrap,
            topic,
            kafkajs_events(count, entities=entities, seed=seed),
            timeout_s=timeout_s,
        ),
    ]


# Reading back and checking.


def _as_bytes(data: str | bytes | None) -> bytes | None:
    return data.encode() if isinstance(data, str) else data


def _headers(
    headers: Mapping[str, str | bytes | None] | Sequence[tuple[str, str | bytes | None]] | None,
) -> tuple[tuple[str, bytes], ...]:
    pairs = headers.items() if isinstance(headers, Mapping) else headers or ()
    return tuple((k, _as_bytes(v) or b"") for k, v in pairs)


def read_topic(
    bootstrap: str, topic: str, expected: int, *, timeout_s: float = 60.0
) -> list[StoredRecord]:
    """Every message of ``topic`` from the beginning, read until ``expected`` arrived
    and every partition is at its end (so extra messages are seen too), or raises
    ``TimeoutError``."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"spr-foreign-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "fetch.queue.backoff.ms": 10,
            "isolation.level": "read_committed",
        }
    )
    stored: list[StoredRecord] = []
    try:
        partitions = sorted(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in partitions
        }
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        position = dict.fromkeys(partitions, 0)
        deadline = time.monotonic() + timeout_s
        last_arrival = time.monotonic()
        # The high watermarks bound a plain topic exactly; on a transactional one the
        # last commit marker is never delivered, so a quiet second after ``expected``
        # messages ends the read there.
        while any(position[p] < ends[p] for p in partitions):
            if len(stored) >= expected and time.monotonic() - last_arrival > 1.0:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"read {len(stored)} of {expected} messages of {topic} in time")
            for message in consumer.consume(1000, 0.2):
                if message.error() is not None:
                    raise RuntimeError(f"reading {topic}: {message.error()}")
                partition, offset = message.partition(), message.offset()
                if partition is None or offset is None:
                    raise RuntimeError(f"reading {topic}: a message without a position")
                stored.append(
                    StoredRecord(
                        partition=partition,
                        offset=offset,
                        key=_as_bytes(message.key()),
                        value=_as_bytes(message.value()) or b"",
                        headers=_headers(message.headers()),
                    )
                )
                position[partition] = offset + 1
                last_arrival = time.monotonic()
    finally:
        consumer.close()
    return stored


def placement_problems(
    records: Sequence[ForeignRecord], stored: Sequence[StoredRecord]
) -> list[str]:
    """Where the producers' reports and the topic disagree: a reported message not at
    its partition and offset with the same key, value and headers, a stored message no
    producer reported, or one producer's messages of one key out of input order."""
    problems: list[str] = []
    by_position = {(s.partition, s.offset): s for s in stored}
    reported = set()
    for r in records:
        position = (r.partition, r.offset)
        reported.add(position)
        s = by_position.get(position)
        if s is None:
            problems.append(f"{r.producer} #{r.index}: nothing stored at {position}")
        elif (s.key, s.value, s.headers) != (r.key, r.value, r.headers):
            problems.append(f"{r.producer} #{r.index}: {position} holds {s} instead")
    extra = sorted(set(by_position) - reported)
    if extra:
        problems.append(f"{len(extra)} stored messages no producer reported, e.g. {extra[:3]}")
    last: dict[tuple[str, bytes | None], ForeignRecord] = {}
    for r in sorted(records, key=lambda r: (r.producer, r.index)):
        previous = last.get((r.producer, r.key))
        if previous is not None and previous.partition != r.partition:
            problems.append(
                f"{r.producer} #{r.index}: same key as #{previous.index}, other partition"
            )
        elif previous is not None and previous.offset >= r.offset:
            problems.append(f"{r.producer} #{r.index}: stored before #{previous.index}, same key")
        last[(r.producer, r.key)] = r
    return problems
