"""pytest-benchmark suite of the core: every group runs the compiled core, the pure twin
and (where the issue names one) a baseline, then the summary prints per-item ratios.

Run: ``python -m pytest tests/bench --benchmark-only -q``. Sizes are scaled down so the
suite takes well under a minute; ``python -m benchmarks.ratios`` runs the full sizes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

# (group, implementation) -> best seconds per item
RESULTS: dict[tuple[str, str], float] = {}

TARGETS = {
    "routing": [("python", 5.0)],
    "ring": [("python", 20.0), ("dict", 10.0)],
    "decode": [("bare-msgspec", 0.7)],
    "batch": [("python", 5.0)],
    # per event; 1.5 us is the budget for the whole path (printed by the summary)
    "ingest": [("python", 5.0), ("separate-steps", 1.0)],
    "rekey": [("python", 5.0)],
    # "compiled" is Batch.ingest with the misrouting check (partitions given), "unchecked"
    # the same without: a ratio near 1 (at least 0.95) means the check costs nothing.
    "misrouting": [("unchecked", 0.95)],
}


Recorder = Callable[[Any, str, str, int], None]


def _record(benchmark: Any, group: str, impl: str, items: int) -> None:
    if benchmark.stats is None:  # --benchmark-disable: the code ran once, nothing was timed
        return
    RESULTS[(group, impl)] = benchmark.stats.stats.min / items


@pytest.fixture
def record() -> Recorder:
    """``record(benchmark, group, impl, items)`` files a result for the ratio summary."""
    return _record


@pytest.fixture
def record_seconds() -> Callable[[Any, str, str, float], None]:
    """``record_seconds(benchmark, group, impl, seconds_per_item)``: a result timed by the
    test itself (e.g. two variants interleaved within one benchmark's rounds)."""

    def file(benchmark: Any, group: str, impl: str, seconds: float) -> None:
        if benchmark.stats is not None:
            RESULTS[(group, impl)] = seconds

    return file


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not RESULTS:
        return
    write = terminalreporter.write_line
    write("")
    write("compiled vs others, per item (best round):")
    for group, targets in TARGETS.items():
        fast = RESULTS.get((group, "compiled"))
        if fast is None:
            continue
        for other, target in targets:
            slow = RESULTS.get((group, other))
            if slow is None:
                continue
            ratio = slow / fast
            verdict = "meets" if ratio >= target else "MISSES"
            write(
                f"  {group:<8} compiled {fast * 1e9:8.1f} ns  {other:<13} {slow * 1e9:8.1f} ns"
                f"  ratio {ratio:6.3f}x  (target {target}x: {verdict})"
            )
