"""asv benchmarks: each hot path, parametrized by implementation.

``asv run --quick --python=same`` runs them; ``asv compare`` then shows compiled vs
python side by side. ``python -m benchmarks.ratios`` prints the ratios directly.
"""

from __future__ import annotations

from array import array
from typing import Any, ClassVar

from benchmarks import workloads as w

IMPLEMENTATIONS = list(w.IMPLEMENTATIONS)


class Routing:
    params: ClassVar[list[str]] = IMPLEMENTATIONS
    param_names: ClassVar[list[str]] = ["impl"]

    def setup(self, impl: str) -> None:
        self.core = w.IMPLEMENTATIONS[impl]
        self.keys = w.routing_keys(20_000)

    def time_route_many(self, impl: str) -> None:
        self.core.route_many(self.keys, 12)


class Ring:
    params: ClassVar[list[str]] = [*IMPLEMENTATIONS, "dict"]
    param_names: ClassVar[list[str]] = ["impl"]

    def setup(self, impl: str) -> None:
        self.fps: array[int] = w.fingerprints(200_000)
        self.fps_list = self.fps.tolist()
        if impl != "dict":
            self.ring = w.IMPLEMENTATIONS[impl].IdempotencyRing(1 << 18, w.RING_TTL_MS)

    def time_seen_or_add_many(self, impl: str) -> None:
        if impl == "dict":
            w.dict_cache_seen_or_add(self.fps_list, 1000, {})
        else:
            self.ring.clear()
            self.ring.seen_or_add_many(self.fps, 1000)


class Decode:
    params: ClassVar[list[str]] = [*IMPLEMENTATIONS, "bare-msgspec"]
    param_names: ClassVar[list[str]] = ["impl"]

    def setup(self, impl: str) -> None:
        self.values = w.event_values(20_000)
        self.offsets = list(range(len(self.values)))
        self.stamps = [0] * len(self.values)

    def time_decode_batch(self, impl: str) -> Any:
        if impl == "bare-msgspec":
            return w.bare_decode(self.values)
        return w.IMPLEMENTATIONS[impl].decode_batch(self.values, self.offsets, self.stamps)


class BatchAssembly:
    params: ClassVar[list[str]] = IMPLEMENTATIONS
    param_names: ClassVar[list[str]] = ["impl"]

    def setup(self, impl: str) -> None:
        self.events = w.decoded_events(10_000)

    def time_add_and_copy_data(self, impl: str) -> None:
        w.assemble(w.IMPLEMENTATIONS[impl], self.events)


class Ingest:
    """Batch.ingest on real Messages of the spr bench workload, and the old separate
    steps (decode_batch, fingerprints, ring, Batch.add) on the compiled core."""

    params: ClassVar[list[str]] = [*IMPLEMENTATIONS, "separate-steps"]
    param_names: ClassVar[list[str]] = ["impl"]

    def setup(self, impl: str) -> None:
        self.messages = w.consumed_messages(20_000)

    def time_ingest(self, impl: str) -> Any:
        if impl == "separate-steps":
            core = w.IMPLEMENTATIONS.get("compiled", w.IMPLEMENTATIONS["python"])
            return w.separate_steps(core, self.messages)
        return w.ingest(w.IMPLEMENTATIONS[impl], self.messages)


class Rekey:
    """rekey (the routing stage, ``spr transform``) on real Messages of the spr bench
    workload, each on the partition its key maps to."""

    params: ClassVar[list[str]] = IMPLEMENTATIONS
    param_names: ClassVar[list[str]] = ["impl"]

    def setup(self, impl: str) -> None:
        self.messages = w.consumed_messages(20_000, by_key=True)

    def time_rekey(self, impl: str) -> int:
        return w.rekey(w.IMPLEMENTATIONS[impl], self.messages)


class IngestMisrouting:
    """Batch.ingest with the misrouting check (``partitions`` given) and without."""

    params: ClassVar[list[str]] = ["checked", "unchecked"]
    param_names: ClassVar[list[str]] = ["check"]

    def setup(self, check: str) -> None:
        self.messages = w.consumed_messages(20_000, by_key=True)
        self.partitions = {"bench": 12} if check == "checked" else None
        self.core = w.IMPLEMENTATIONS.get("compiled", w.IMPLEMENTATIONS["python"])

    def time_ingest(self, check: str) -> Any:
        return w.ingest(self.core, self.messages, partitions=self.partitions)
