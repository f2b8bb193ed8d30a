"""Print compiled / pure-twin speed ratios for each hot path.

Run: ``python -m benchmarks.ratios [--scale 1.0]``. At scale 1 the compiled core runs
the sizes of the targets (1M keys, 10M ring operations, 1M events, 1M events); the slow
baselines (the twin, the dict cache) run on a slice and are compared per item.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from functools import partial

from benchmarks import workloads as w


def per_item(fn: Callable[[], object], n: int, repeat: int = 3) -> float:
    """Best seconds per item over ``repeat`` runs."""
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best / n


def alternating(fns: dict[str, Callable[[], object]], n: int, repeat: int = 7) -> dict[str, float]:
    """Best seconds per item of each function, their runs interleaved, so that a slow
    phase of a shared machine hits all of them alike."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeat):
        for label, fn in fns.items():
            gc.collect()
            start = time.perf_counter()
            fn()
            best[label] = min(best[label], time.perf_counter() - start)
    return {label: seconds / n for label, seconds in best.items()}


def print_medians(header: str, rates: dict[str, list[float]], *, width: int = 10) -> None:
    """Print ``header``, then each mode's best and median rate (events/s) and its median
    against the first mode's, the baseline of an alternating comparison."""
    baseline = statistics.median(next(iter(rates.values())))
    print(header)
    for name, found in rates.items():
        median = statistics.median(found)
        print(
            f"{name:18} best {max(found):>{width},.0f} ev/s  median {median:>{width},.0f} ev/s  "
            f"median vs off {100 * (median / baseline - 1):+6.2f}%"
        )


def report(name: str, target: str, fast: float, slow: dict[str, float]) -> None:
    print(f"{name}: compiled {fast * 1e9:8.1f} ns/item")
    for label, seconds in slow.items():
        print(f"    {label:<28} {seconds * 1e9:8.1f} ns/item  ratio {seconds / fast:6.1f}x")
    print(f"    target: {target}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=float, default=1.0)
    scale = parser.parse_args().scale
    c, p = w.IMPLEMENTATIONS["compiled"], w.IMPLEMENTATIONS["python"]

    n = int(1_000_000 * scale)
    keys = w.routing_keys(n)
    small = keys[: max(1, n // 10)]
    report(
        f"routing route_many, {n} keys",
        "compiled >= 5x twin",
        per_item(lambda: c.route_many(keys, 12), n),
        {"twin": per_item(lambda: p.route_many(small, 12), len(small), 1)},
    )

    n = int(10_000_000 * scale)
    fps = w.fingerprints(n)
    slice_ = fps[: max(1, n // 50)]

    def ring_compiled() -> None:
        c.IdempotencyRing(w.RING_CAPACITY, w.RING_TTL_MS).seen_or_add_many(fps, 1000)

    def ring_twin() -> None:
        p.IdempotencyRing(w.RING_CAPACITY, w.RING_TTL_MS).seen_or_add_many(slice_, 1000)

    fps_list = fps.tolist()

    def ring_dict() -> None:
        w.dict_cache_seen_or_add(fps_list, 1000, {})

    ring = c.IdempotencyRing(w.RING_CAPACITY, w.RING_TTL_MS)

    def ring_single_calls() -> None:
        seen_or_add = ring.seen_or_add
        for fp in slice_:
            seen_or_add(fp, 1000)

    report(
        f"ring seen_or_add_many, {n} fingerprints, capacity {w.RING_CAPACITY}",
        "compiled >= 20x twin and >= 10x dict cache",
        per_item(ring_compiled, n, 2),
        {
            "twin": per_item(ring_twin, len(slice_), 1),
            "dict-of-timestamps cache": per_item(ring_dict, n, 1),
            "compiled, one call per fp": per_item(ring_single_calls, len(slice_), 1),
        },
    )

    n = int(1_000_000 * scale)
    offsets = list(range(n))
    stamps = [0] * n
    for alias_every, mix in ((4, "1 in 4 with aliases"), (0, "canonical spellings only")):
        values = w.event_values(n, alias_every)
        size = sum(map(len, values)) / n
        fast = per_item(partial(c.decode_batch, values, offsets, stamps), n)
        bare = per_item(partial(w.bare_decode, values), n)
        print(f"decode+normalize, {n} events of {size:.0f} bytes, {mix}:")
        print(f"    compiled                     {fast * 1e9:8.1f} ns/item")
        print(
            f"    bare msgspec decode          {bare * 1e9:8.1f} ns/item  speed {bare / fast:.3f}x"
        )
        sl = max(1, n // 10)
        twin = per_item(partial(p.decode_batch, values[:sl], offsets[:sl], stamps[:sl]), sl, 1)
        print(
            f"    twin                         {twin * 1e9:8.1f} ns/item  ratio {twin / fast:6.1f}x"
        )
    print("    target: compiled speed >= 0.7x bare msgspec decode")

    events = w.decoded_events(n)
    sl_events = events[: max(1, n // 10)]
    report(
        f"batch assembly (add + copy_data), {len(events)} events",
        "compiled >= 5x twin",
        per_item(lambda: w.assemble(c, events), len(events)),
        {"twin": per_item(lambda: w.assemble(p, sl_events), len(sl_events), 1)},
    )

    n = int(200_000 * scale)
    messages = w.consumed_messages(n, by_key=True)
    sl = messages[: max(1, n // 10)]
    unfrozen = per_item(lambda: w.rekey(c, messages), n)
    with w.frozen_inputs():
        report(
            f"rekey (spr transform's core), {n} messages, inputs frozen out of the GC",
            "compiled >= 5x twin",
            per_item(lambda: w.rekey(c, messages), n),
            {
                "twin": per_item(lambda: w.rekey(p, sl), len(sl), 1),
                "compiled, inputs not frozen": unfrozen,
            },
        )

    times = alternating(
        {
            "checked": lambda: w.ingest(c, messages, partitions={"bench": 12}),
            "unchecked": lambda: w.ingest(c, messages),
        },
        n,
    )
    checked, unchecked = times["checked"], times["unchecked"]
    print(f"ingest (Batch.ingest + copy_data), {n} messages on their keys' partitions:")
    print(f"    partitions given (checked)   {checked * 1e9:8.1f} ns/item")
    print(
        f"    partitions=None              {unchecked * 1e9:8.1f} ns/item"
        f"  check costs {checked / unchecked - 1:+.1%}"
    )
    print("    target: the misrouting check costs nothing measurable (within noise)")


if __name__ == "__main__":
    main()
