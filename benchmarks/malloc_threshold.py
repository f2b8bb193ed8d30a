"""What pinning glibc's mmap threshold (spr.memory) costs the engine's allocations.

Run: ``.venv/bin/python -m benchmarks.malloc_threshold [--rounds R]``.

The engine's allocation pattern, in one process: a new Batch per flush, 40,000 rows
ingested in consume()-sized chunks, the COPY stream rendered in 1 MB pieces. The
threshold alternates between 128 KiB (what ``spr run`` pins) and 32 MiB (where glibc's
dynamic threshold ends up), R rounds each, so that a noisy machine slows both alike.
Prints the best and the median time per 40k-row batch. Linux with glibc only.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

from benchmarks import workloads as w

ROWS = 40_000
BATCHES = 5
MODES = (("pinned 128 KiB", 128 * 1024), ("raised 32 MiB", 32 * 2**20))


def _one_pass(core: object, messages: list[object]) -> None:
    ring = core.IdempotencyRing(w.RING_CAPACITY, w.RING_TTL_MS)  # type: ignore[attr-defined]
    for b in range(BATCHES):
        batch = core.Batch()  # type: ignore[attr-defined]
        part = messages[b * ROWS : (b + 1) * ROWS]
        for start in range(0, len(part), 2_000):
            batch.ingest(part[start : start + 2_000], ring, 1000)
        for _chunk in batch.copy_chunks():
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    core = w.IMPLEMENTATIONS.get("compiled", w.IMPLEMENTATIONS["python"])
    mallopt = ctypes.CDLL(None).mallopt
    messages = w.consumed_messages(ROWS * BATCHES)
    times: dict[str, list[float]] = {name: [] for name, _ in MODES}
    for _ in range(args.rounds):
        for name, threshold in MODES:
            mallopt(-3, threshold)  # M_MMAP_THRESHOLD
            started = time.perf_counter()
            _one_pass(core, messages)
            times[name].append((time.perf_counter() - started) / BATCHES)
    for name, samples in times.items():
        print(
            f"{name}: best {min(samples) * 1e3:.2f} ms, "
            f"median {statistics.median(samples) * 1e3:.2f} ms per {ROWS:,}-row batch"
        )


if __name__ == "__main__":
    main()
