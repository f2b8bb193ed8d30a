"""The routing stage (design §10, ``spr transform``): any producer's events re-keyed
into a canonical, correctly partitioned topic, exactly once with Kafka transactions.

It sits in front of ``spr run``: services that key or partition an entity their own way
(sarama's FNV-1a, librdkafka's CRC32, other field names, no sequence) write their
topics; the transform reads them, decodes each event with the canonical decoder, drops
duplicates, and writes the canonical event keyed by its partition key to
``partition_for(key, N)`` of the output topic, with the design's headers. One Kafka
transaction per batch holds the output records, the batch's dead letters and the
consumed offsets, so they commit or abort together; ``spr run`` reads the output with
``isolation.level=read_committed`` and never applies aborted output.

:class:`Transformer` is the loop ``spr transform`` runs; :class:`TransformPipeline` is
the stage, for a confluent-kafka loop of your own.
"""

from __future__ import annotations

from spr.transform.pipeline import TransformPipeline, TransformStats
from spr.transform.processor import Transformer

__all__ = ["TransformPipeline", "TransformStats", "Transformer"]
