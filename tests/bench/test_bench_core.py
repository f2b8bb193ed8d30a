"""Benchmarks of the hot paths; see conftest.py for the ratio summary."""

from __future__ import annotations

import itertools
import time
from typing import Any

import pytest
from benchmarks import workloads as w

COMPILED = pytest.param(
    "compiled",
    marks=pytest.mark.skipif("compiled" not in w.IMPLEMENTATIONS, reason="not built"),
)
# The pure twin runs on a tenth of the items; results are compared per item.
SIZES = {"compiled": 1.0, "python": 0.1}


def _n(base: int, impl: str) -> int:
    return max(1, int(base * SIZES.get(impl, 1.0)))


@pytest.mark.parametrize("impl", [COMPILED, "python"])
def test_routing(benchmark: Any, impl: str, record: Any) -> None:
    n = _n(200_000, impl)
    keys = w.routing_keys(n)
    core = w.IMPLEMENTATIONS[impl]
    benchmark.pedantic(core.route_many, (keys, 12), rounds=3, iterations=1)
    record(benchmark, "routing", impl, n)


@pytest.mark.parametrize("impl", [COMPILED, "python", "dict"])
def test_ring(benchmark: Any, impl: str, record: Any) -> None:
    n = {"compiled": 2_000_000, "python": 100_000, "dict": 1_000_000}[impl]
    fps = w.fingerprints(n)
    if impl == "dict":
        fps_list = fps.tolist()
        benchmark.pedantic(
            lambda: w.dict_cache_seen_or_add(fps_list, 1000, {}), rounds=3, iterations=1
        )
    else:
        ring = w.IMPLEMENTATIONS[impl].IdempotencyRing(w.RING_CAPACITY, w.RING_TTL_MS)

        def run() -> None:
            ring.clear()
            ring.seen_or_add_many(fps, 1000)

        benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    record(benchmark, "ring", impl, n)


@pytest.mark.parametrize("impl", [COMPILED, "python", "bare-msgspec"])
def test_decode(benchmark: Any, impl: str, record: Any) -> None:
    n = _n(200_000, impl)
    values = w.event_values(n)
    if impl == "bare-msgspec":
        benchmark.pedantic(w.bare_decode, (values,), rounds=5, iterations=1)
    else:
        core = w.IMPLEMENTATIONS[impl]
        offsets, stamps = list(range(n)), [0] * n
        benchmark.pedantic(core.decode_batch, (values, offsets, stamps), rounds=5, iterations=1)
    record(benchmark, "decode", impl, n)


@pytest.mark.parametrize("impl", [COMPILED, "python"])
def test_batch(benchmark: Any, impl: str, record: Any) -> None:
    # Flush-sized batches of events decoded just before, as the engine assembles them.
    n = _n(200_000, impl)
    chunk = 10_000
    values = w.event_values(n)
    core = w.IMPLEMENTATIONS[impl]
    compiled_or_twin = w.IMPLEMENTATIONS.get("compiled", core)
    chunks = [
        compiled_or_twin.decode_batch(
            values[i : i + chunk], range(i, i + chunk), [0] * len(values[i : i + chunk])
        )[0]
        for i in range(0, n, chunk)
    ]

    def run() -> None:
        for events in chunks:
            w.assemble(core, events)

    benchmark.pedantic(run, rounds=3, iterations=1)
    record(benchmark, "batch", impl, n)


@pytest.mark.parametrize("impl", [COMPILED, "python", "separate-steps"])
def test_ingest(benchmark: Any, impl: str, record: Any) -> None:
    # The fused consume() -> decode -> key check -> ring -> collapse -> COPY path, on real
    # confluent_kafka Messages of the spr bench workload; "separate-steps" is the
    # compiled core driven the way the engine did it before Batch.ingest.
    n = _n(100_000, impl)
    messages = w.consumed_messages(n)
    if impl == "separate-steps":
        core = w.IMPLEMENTATIONS.get("compiled", w.IMPLEMENTATIONS["python"])
        benchmark.pedantic(w.separate_steps, (core, messages), rounds=3, iterations=1)
    else:
        benchmark.pedantic(w.ingest, (w.IMPLEMENTATIONS[impl], messages), rounds=3, iterations=1)
    record(benchmark, "ingest", impl, n)


@pytest.mark.parametrize("impl", [COMPILED, "python"])
def test_rekey(benchmark: Any, impl: str, record: Any) -> None:
    # The routing stage (spr transform) on real Messages of the spr bench workload, each
    # on the partition its key maps to: decode, source table, ring, output records.
    n = _n(100_000, impl)
    messages = w.consumed_messages(n, by_key=True)
    with w.frozen_inputs():
        benchmark.pedantic(w.rekey, (w.IMPLEMENTATIONS[impl], messages), rounds=3, iterations=1)
    record(benchmark, "rekey", impl, n)


@pytest.mark.parametrize("impl", [COMPILED])
def test_ingest_misrouting(benchmark: Any, record_seconds: Any, impl: str) -> None:
    # Batch.ingest of the compiled core with the misrouting check (design §10) and
    # without, on messages that sit where their keys map (the check finds nothing). The
    # rounds alternate between the two, so that a busy phase of the machine hits both.
    core = w.IMPLEMENTATIONS[impl]
    messages = w.consumed_messages(100_000, by_key=True)
    best = {"compiled": float("inf"), "unchecked": float("inf")}
    variants = itertools.cycle([("compiled", {"bench": 12}), ("unchecked", None)])

    def run() -> None:
        label, partitions = next(variants)
        start = time.perf_counter()
        w.ingest(core, messages, partitions=partitions)
        best[label] = min(best[label], time.perf_counter() - start)

    benchmark.pedantic(run, rounds=10, iterations=1)
    for label, seconds in best.items():
        record_seconds(benchmark, "misrouting", label, seconds / len(messages))
