"""Quix Streams' exactly-once mode doing spr transform's job, for the transform scenario.

:data:`SCRIPT` runs in the Quix venv that :func:`spr.bench.quix.ensure_venv` builds and
caches (``python SCRIPT ARGS.json OUT.json``; self-contained, no spr). It is what a user
would write with Quix Streams for the routing stage: an ``Application`` with
``processing_guarantee="exactly-once"`` and otherwise its defaults (5 s commit
interval: one Kafka transaction per checkpoint; Quix forces
``partition.assignment.strategy=range``), the source read as JSON, a ``.apply`` that
maps design §2's alias names to the canonical ones (a missing sequence becomes the
source offset, a missing event id ``type:id:sequence``, the original value goes into
``payload``), and ``.to_topic`` keyed by spr's partition key (first 8 bytes of SHA-256
of ``entity_type:entity_id`` as 16 lowercase hex characters), with librdkafka's
``murmur2_random`` partitioner so that the record lands on ``partition_for(key, n)``
like spr's. It validates nothing, keeps no duplicate ring and writes no headers: less
work than spr does. It stops itself after ``total`` messages (the final checkpoint
commits the last transaction).
"""

from __future__ import annotations

from spr.bench.quix import SCRIPT_END

__all__ = ["SCRIPT"]

SCRIPT = (
    r"""
import hashlib, json, os, resource, sys, threading, time, traceback

args = json.load(open(sys.argv[1]))
out = sys.argv[2]
result = {}
try:
    from quixstreams import Application, message_context

    first = [None]
    done = [0]
    total = args["total"]
    app = Application(
        broker_address=args["bootstrap"],
        consumer_group=args["group"],
        auto_offset_reset="earliest",
        processing_guarantee="exactly-once",
        producer_extra_config={"partitioner": "murmur2_random"},
        state_dir=args["state_dir"],
        loglevel="WARNING",
    )
    source = app.topic(args["source"], value_deserializer="json", key_deserializer="bytes")
    output = app.topic(args["output"], value_serializer="json", key_serializer="str")

    def pick(value, *names):
        for name in names:
            found = value.get(name)
            if found is not None:
                return found
        return None

    def normalise(value, key, timestamp, headers):
        if first[0] is None:
            first[0] = time.time()
        entity_type = pick(value, "entity_type", "entityType", "type", "event_type")
        entity_id = pick(value, "entity_id", "entityId")
        sequence = pick(value, "sequence", "seq")
        if sequence is None:
            sequence = message_context().offset
        stamp = pick(value, "timestamp", "ts")
        event_id = pick(value, "event_id", "eventId", "id")
        return {
            "event_id": event_id or f"{entity_type}:{entity_id}:{sequence}",
            "entity_type": entity_type,
            "entity_id": entity_id,
            "sequence": sequence,
            "state": pick(value, "state", "status"),
            "timestamp": timestamp if stamp is None else stamp,
            "payload": value,
        }

    def partition_key(value):
        routing_key = f"{value['entity_type']}:{value['entity_id']}"
        return hashlib.sha256(routing_key.encode()).digest()[:8].hex()

    def counted(value):
        done[0] += 1
        if done[0] >= total:
            app.stop()

    sdf = app.dataframe(source)
    sdf = sdf.apply(normalise, metadata=True)
    sdf = sdf.to_topic(output, key=partition_key)
    sdf = sdf.update(counted)
    timer = threading.Timer(args["timeout_s"], app.stop)
    timer.daemon = True
    timer.start()
    app.run()
    timer.cancel()
    import quixstreams
    result = {"first_s": first[0], "timeline": [], "events": done[0],
              "quixstreams": quixstreams.__version__,
              "commit_interval_s": app.config.commit_interval}
    code = 0
"""
    + SCRIPT_END
)
