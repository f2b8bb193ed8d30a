"""The load generator behind ``spr produce``: deterministic entity events onto Kafka.

:func:`generate` yields a reproducible stream of events for a :class:`LoadSpec`: the same
spec (same seed) gives the same events in the same order, byte for byte. It can inject
what real pipelines see:

- republished duplicates: an event sent again, identical, a little later;
- stale events: an entity's event ``n`` arriving after its event ``n + 1``;
- alias field names of "other services" (design §2: ``id``/``eventId``,
  ``entityType``/``type``/``event_type``, ``entityId``, ``status``, ``seq``, ``ts``).

:class:`Manifest` records the state every entity must end in (its newest sequence), so
tests and benchmarks can check the table. :func:`produce` sends a spec through
:class:`spr.Producer` and returns a :class:`ProduceReport`. ``spr bench`` and the engine
tests use these functions directly.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

from spr.errors import ConfigError, ProducerError, ServerUnavailable

__all__ = [
    "DEFAULT_PARTITIONS",
    "STATES",
    "GeneratedEvent",
    "LoadSpec",
    "Manifest",
    "ProduceReport",
    "ensure_topic",
    "expected_state",
    "generate",
    "produce",
]

DEFAULT_PARTITIONS = 12

# The life cycle every generated entity walks through, one step per sequence.
STATES: tuple[str, ...] = (
    "created",
    "pending",
    "authorized",
    "captured",
    "packed",
    "shipped",
    "delivered",
    "closed",
)

# Fixed epoch for generated timestamps: wall-clock time would make runs differ.
_BASE_TIMESTAMP_MS = 1_700_000_000_000
# How far back a republished duplicate reaches, in distinct events.
_DUPLICATE_HISTORY = 4096
_CURRENCIES = ("EUR", "USD", "GBP", "CHF", "JPY", "SEK")
_FILLER = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor " * 64

# %-templates are the cheapest way to build a few hundred thousand JSON values per
# second in Python; every inserted string is generated here and needs no escaping.
_CANONICAL_TEMPLATE = (
    '{"event_id":"%s","entity_type":"%s","entity_id":"%s","sequence":%d,'
    '"state":"%s","timestamp":%d,"payload":{"amount":%d.%02d,"currency":"%s","note":"%s"}}'
)
_ALIAS_TEMPLATES = tuple(
    "{"
    f'"{id_name}":"%s","{type_name}":"%s","entityId":"%s","seq":%d,'
    '"status":"%s","ts":%d,"payload":{"amount":%d.%02d,"currency":"%s","note":"%s"}}'
    for id_name in ("id", "eventId")
    for type_name in ("entityType", "type", "event_type")
)


@dataclass(frozen=True, kw_only=True)
class LoadSpec:
    """What to generate. Frozen and validated on construction.

    ``count`` messages in total (duplicates and stale events included) over ``entities``
    entities. ``duplicates`` and ``stale`` are the approximate fractions of messages
    that are republished duplicates and late (stale) events; ``aliases`` is the fraction
    of distinct events written with alias field names. ``value_size`` is the
    approximate JSON size in bytes. ``one_per_entity`` gives each entity exactly one
    new event, in a scrambled order (live traffic: nothing for a batch to collapse);
    it needs ``count <= entities`` and no duplicates or stale events.
    """

    count: int
    entities: int = 10_000
    seed: int = 0
    duplicates: float = 0.0
    stale: float = 0.0
    aliases: float = 0.0
    value_size: int = 200
    entity_types: tuple[str, ...] = ("order", "payment", "shipment", "invoice")
    one_per_entity: bool = False

    def __post_init__(self) -> None:
        if self.one_per_entity and (self.count > self.entities or self.duplicates or self.stale):
            raise ConfigError(
                "one event per entity needs count <= entities and no duplicates or stale "
                f"events, got count {self.count}, entities {self.entities}"
            )
        if self.count < 0:
            raise ConfigError(f"count must be >= 0, got {self.count}")
        if self.entities < 1:
            raise ConfigError(f"entities must be >= 1, got {self.entities}")
        for name in ("duplicates", "stale", "aliases"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be a fraction between 0 and 1, got {value}")
        if self.duplicates + 2 * self.stale > 1.0:
            # Each stale event travels with the newer event it arrives after.
            raise ConfigError(
                "duplicates + 2 * stale must be at most 1, got "
                f"{self.duplicates} + 2 * {self.stale}"
            )
        if self.value_size < 0:
            raise ConfigError(f"value_size must be >= 0, got {self.value_size}")
        if not self.entity_types or not all(
            t and ":" not in t and '"' not in t and "\\" not in t for t in self.entity_types
        ):
            raise ConfigError("entity_types must be non-empty names without ':', '\"' or '\\'")


def _with_filler(template: str, sample: tuple[object, ...], value_size: int) -> str:
    """``template`` with its note filled so that ``sample`` formats to ``value_size``."""
    pad = max(0, value_size - len(template % sample))
    note = _FILLER[:pad].replace("%", "%%")
    return template.replace('"note":"%s"', f'"note":"{note}"')


class GeneratedEvent(NamedTuple):
    """One generated message. ``key`` is its Kafka message key (the partition key).

    ``kind`` is ``"new"`` (first time sent), ``"duplicate"`` (an earlier message sent
    again, identical) or ``"stale"`` (sent after a newer sequence of its entity).
    """

    entity_type: str
    entity_id: str
    sequence: int
    state: str
    event_id: str
    kind: str
    key: str
    value: bytes


def generate(spec: LoadSpec) -> Iterator[GeneratedEvent]:
    """Yield ``spec.count`` messages, deterministically for a given spec.

    Pure and lazy: it keeps only a per-entity sequence counter and a short history for
    duplicates, so a million events need a few megabytes. Sequences start at 1 per
    entity and grow by 1 for every distinct event.
    """
    # Imported here so that building the ``spr`` command line stays cheap.
    from spr.routing import partition_key

    rng = random.Random(spec.seed)
    types = spec.entity_types
    entities = spec.entities
    next_sequence = [1] * entities
    keys: list[str | None] = [None] * entities
    history: list[GeneratedEvent] = []
    history_at = 0
    # Per draw: a duplicate (1 message), a stale pair (2 messages) or a new event (1).
    # Scaling by 1 / (1 - stale) turns the message fractions of the spec into per-draw
    # probabilities; validation keeps stale <= 0.5.
    duplicate_cut = spec.duplicates / (1.0 - spec.stale)
    stale_cut = duplicate_cut + spec.stale / (1.0 - spec.stale)
    aliases = spec.aliases
    value_size = spec.value_size
    id_prefix = f"evt-{spec.seed:x}-"
    distinct = 0

    # One formatting per event: the filler length is fixed per template from a sample,
    # so values are value_size bytes give or take the width of the numbers in them.
    sample = ("evt-0-000000000", max(types, key=len), "00000000", 1, "authorized",
              _BASE_TIMESTAMP_MS, 1000, 0, "EUR", "")  # fmt: skip
    canonical = _with_filler(_CANONICAL_TEMPLATE, sample, value_size)
    alias_templates = tuple(_with_filler(t, sample, value_size) for t in _ALIAS_TEMPLATES)
    alias_count = len(alias_templates)
    type_count = len(types)
    state_count = len(STATES)
    currency_count = len(_CURRENCIES)

    def make(entity: int, kind: str) -> GeneratedEvent:
        nonlocal distinct, history_at
        sequence = next_sequence[entity]
        next_sequence[entity] = sequence + 1
        entity_type = types[entity % type_count]
        entity_id = f"{entity:08d}"
        key = keys[entity]
        if key is None:
            key = keys[entity] = partition_key(f"{entity_type}:{entity_id}")
        state = STATES[(sequence - 1) % state_count]
        event_id = f"{id_prefix}{distinct:09d}"
        amount = (distinct * 7919 + entity * 104729) % 1_000_000
        template = (
            alias_templates[distinct % alias_count]
            if aliases and rng.random() < aliases
            else canonical
        )
        value = (
            template
            % (
                event_id,
                entity_type,
                entity_id,
                sequence,
                state,
                _BASE_TIMESTAMP_MS + distinct,
                amount // 100,
                amount % 100,
                _CURRENCIES[distinct % currency_count],
            )
        ).encode()
        distinct += 1
        event = GeneratedEvent(entity_type, entity_id, sequence, state, event_id, kind, key, value)
        if len(history) < _DUPLICATE_HISTORY:
            history.append(event)
        else:
            history[history_at] = event
            history_at = (history_at + 1) % _DUPLICATE_HISTORY
        return event

    emitted = 0
    if spec.one_per_entity:
        # i -> i * step mod entities visits every entity once when step is coprime to
        # it; a step near entities / golden ratio scatters neighbours far apart, so
        # keys arrive as randomly as live traffic's do.
        step = max(1, round(entities * 0.6180339887))
        while math.gcd(step, entities) != 1:
            step += 1
        while emitted < spec.count:
            yield make(emitted * step % entities, "new")
            emitted += 1
        return
    mixing = spec.duplicates > 0.0 or spec.stale > 0.0
    while emitted < spec.count:
        draw = rng.random() if mixing else 1.0
        if draw < duplicate_cut and history:
            yield history[int(rng.random() * len(history))]._replace(kind="duplicate")
            emitted += 1
            continue
        entity = int(rng.random() * entities)
        if draw < stale_cut and spec.count - emitted >= 2:
            older = make(entity, "stale")
            yield make(entity, "new")
            yield older
            emitted += 2
            continue
        yield make(entity, "new")
        emitted += 1


class Manifest:
    """The final state each entity must reach: its newest sequence, state and event id.

    Feed it every generated message with :meth:`add` (order does not matter). The JSON
    form maps ``"entity_type:entity_id"`` to ``{"sequence", "state", "event_id"}``.
    """

    def __init__(self) -> None:
        self._newest: dict[str, tuple[int, str, str]] = {}

    def add(self, event: GeneratedEvent) -> None:
        routing_key = f"{event.entity_type}:{event.entity_id}"
        current = self._newest.get(routing_key)
        if current is None or event.sequence > current[0]:
            self._newest[routing_key] = (event.sequence, event.state, event.event_id)

    def __len__(self) -> int:
        return len(self._newest)

    def entities(self) -> dict[str, dict[str, Any]]:
        """``{"type:id": {"sequence": int, "state": str, "event_id": str}}``, sorted."""
        return {
            routing_key: {"sequence": seq, "state": state, "event_id": event_id}
            for routing_key, (seq, state, event_id) in sorted(self._newest.items())
        }

    def write(self, path: Path, **context: Any) -> None:
        """Write the manifest as JSON, with ``context`` (topic, seed, ...) alongside."""
        document = {**context, "entities": self.entities()}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(document, separators=(",", ":")) + "\n")
        tmp.replace(path)


def expected_state(spec: LoadSpec) -> dict[str, dict[str, Any]]:
    """The manifest of ``spec`` without producing anything (runs the generator)."""
    manifest = Manifest()
    for event in generate(spec):
        manifest.add(event)
    return manifest.entities()


@dataclass(frozen=True, kw_only=True)
class ProduceReport:
    """What :func:`produce` did. ``errors`` counts messages that were not delivered."""

    topic: str
    partitions: int
    topic_created: bool
    events: int
    new: int
    duplicates: int
    stale: int
    aliases: int
    records: int
    errors: int
    first_error: str
    elapsed_s: float
    events_per_s: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def ensure_topic(bootstrap: str, topic: str, partitions: int, *, timeout_s: float = 30.0) -> bool:
    """Create ``topic`` with ``partitions`` partitions unless it exists.

    Returns True when it was created. Blocks until every partition has a leader (at most
    ``timeout_s``). An existing topic is left as it is, whatever its partition count.
    Raises :class:`ServerUnavailable` or :class:`ConfigError` with one sentence.
    """
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic

    if partitions < 1:
        raise ConfigError(f"partitions must be >= 1, got {partitions}")
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    try:
        existing = admin.list_topics(timeout=timeout_s).topics
    except KafkaException:
        raise ServerUnavailable(f"Kafka is not reachable at {bootstrap}") from None
    created = False
    if topic not in existing:
        futures = admin.create_topics(
            [NewTopic(topic, num_partitions=partitions, replication_factor=-1)],
            operation_timeout=timeout_s,
        )
        try:
            futures[topic].result(timeout=timeout_s)
            created = True
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if not isinstance(error, KafkaError):
                raise ConfigError(f"cannot create topic '{topic}': {exc}") from None
            # Another producer may have created it between our check and our request.
            if error.code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise ConfigError(f"cannot create topic '{topic}': {error.str()}") from None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        md = admin.list_topics(topic, timeout=5).topics.get(topic)
        if (
            md is not None
            and md.error is None
            and md.partitions
            and all(p.leader >= 0 for p in md.partitions.values())
        ):
            return created
        time.sleep(0.1)
    raise ServerUnavailable(f"topic '{topic}' has partitions without a leader after {timeout_s} s")


def produce(
    spec: LoadSpec,
    *,
    topic: str,
    bootstrap: str,
    partitions: int = DEFAULT_PARTITIONS,
    rate: float | None = None,
    producer_config: Mapping[str, Any] | None = None,
    manifest_path: Path | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    tracing: bool = False,
) -> ProduceReport:
    """Generate ``spec`` and send it to ``topic`` through :class:`spr.Producer`.

    Creates the topic with ``partitions`` partitions when it is missing. ``rate`` caps
    messages per second (None: as fast as possible). ``progress(done, total, elapsed_s)``
    is called a few times per second. Blocks until every message is acknowledged or
    failed; delivery failures are counted in the report (never dropped silently), and
    ``manifest_path`` (written either way) holds the expected final state per entity;
    a path that cannot be written is refused before anything is sent.
    Raises :class:`ServerUnavailable` when no broker answers. ``tracing`` makes a send
    span per message (see :class:`spr.Producer`).
    """
    from spr.producer import Producer

    if rate is not None and rate <= 0:
        raise ConfigError(f"rate must be > 0 events/s, got {rate}")
    if manifest_path is not None:
        _check_manifest_path(manifest_path)
    producer = Producer(bootstrap=bootstrap, config=producer_config, tracing=tracing)
    created = ensure_topic(bootstrap, topic, partitions)
    partition_count = _partition_count(producer, topic)
    manifest = Manifest() if manifest_path is not None else None
    counts = {"new": 0, "duplicate": 0, "stale": 0}
    aliases = 0
    count_aliases = spec.aliases > 0.0
    # The load generator feeds the producer's internal fast path: it already holds each
    # entity's partition key, so hashing it again per message would only cost time.
    send = producer._produce
    check_every = 1024
    if rate is not None:
        check_every = max(1, min(1024, int(rate / 50)))
    started = clock()
    last_progress = started
    done = 0
    first_error = ""
    try:
        for event in generate(spec):
            send(
                topic,
                event.key,
                event.value,
                f"{event.entity_type}:{event.entity_id}:{event.sequence}",
            )
            counts[event.kind] += 1
            if count_aliases and not event.value.startswith(b'{"event_id"'):
                aliases += 1
            if manifest is not None:
                manifest.add(event)
            done += 1
            if done % check_every == 0:
                now = clock()
                if rate is not None:
                    # poll() returns early whenever a delivery report arrives, so keep
                    # waiting until the schedule has caught up.
                    ahead = started + done / rate - now
                    while ahead > 0:
                        producer.poll(ahead)
                        now = clock()
                        ahead = started + done / rate - now
                if progress is not None and now - last_progress >= 0.2:
                    last_progress = now
                    progress(done, spec.count, now - started)
        try:
            producer.close()
        except ProducerError as exc:
            first_error = exc.first_error or str(exc)
    finally:
        if manifest is not None and manifest_path is not None:
            manifest.write(
                manifest_path, topic=topic, seed=spec.seed, count=spec.count, events=done
            )
    elapsed = max(clock() - started, 1e-9)
    if progress is not None:
        progress(done, spec.count, elapsed)
    return ProduceReport(
        topic=topic,
        partitions=partition_count,
        topic_created=created,
        events=done,
        new=counts["new"],
        duplicates=counts["duplicate"],
        stale=counts["stale"],
        aliases=aliases,
        records=producer.records,
        errors=producer.errors,
        first_error=first_error,
        elapsed_s=round(elapsed, 3),
        events_per_s=round(done / elapsed, 1),
    )


def _check_manifest_path(path: Path) -> None:
    # Checked before the first event is sent: failing after sending them would leave
    # events on the topic and no manifest to verify them against.
    if path.is_dir():
        raise ConfigError(f"cannot write the manifest {path}: it is a directory")
    if not path.parent.is_dir():
        raise ConfigError(
            f"cannot write the manifest {path}: the directory {path.parent} does not exist"
        )
    target = path if path.exists() else path.parent
    if not os.access(target, os.W_OK):
        raise ConfigError(f"cannot write the manifest {path}: permission denied")


def _partition_count(producer: Any, topic: str) -> int:
    md = producer._producer.list_topics(topic, timeout=10).topics.get(topic)
    return len(md.partitions) if md is not None else 0
