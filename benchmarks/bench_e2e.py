"""asv end to end: ``spr run``'s events/s on the local stack, per ``spr bench`` scenario.

``backlog`` is a backlog that collapses (ten events per entity), ``live`` one event per
entity (nothing to collapse: a row per event). Each runs ``spr bench``'s own harness with
spr alone (no ceilings, no alternatives), its table verified; a failed verification
fails the benchmark rather than recording a number. The field report's fleet reached
45,000 msg/s: ``track_vs_field_report`` is events/s over that reference, so 1.0 is the
line to stay above.

Needs the local stack (``spr dev up``; ``SPR_BOOTSTRAP``/``SPR_DSN`` point elsewhere):
without it, setup_cache says so on stderr and asv marks both benchmarks skipped.
"""

from __future__ import annotations

import socket
import sys
from typing import Any, ClassVar
from urllib.parse import urlparse

#: The field report's throughput, msg/s, on its fleet: the reference line.
FIELD_REPORT_EVENTS_PER_S = 45_000.0
#: Small enough for CI's quick run, big enough to be timed (several commits).
EVENTS = 200_000
#: Entities of the backlog scenario (the ratio of spr bench's default 1M / 100K).
BACKLOG_ENTITIES = 20_000


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _stack() -> tuple[str, str] | None:
    """The stack's addresses, or None (and a sentence on stderr) when it is not up."""
    from spr.config.defaults import default_bootstrap, default_dsn

    bootstrap, dsn = default_bootstrap(), default_dsn()
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    parsed = urlparse(dsn)
    if not _reachable(host, int(port)) or not _reachable(
        parsed.hostname or "127.0.0.1", parsed.port or 5432
    ):
        print(
            f"the local stack is not up (Kafka {bootstrap}, PostgreSQL {parsed.hostname}:"
            f"{parsed.port}): start it with spr dev up; skipping the end-to-end track",
            file=sys.stderr,
        )
        return None
    return bootstrap, dsn


def _rate(rates: dict[str, float], scenario: str) -> float:
    if not rates:  # no stack: skipped, not failed
        from asv_runner.benchmarks.mark import SkipNotImplemented

        raise SkipNotImplemented("the local stack is not up (spr dev up)")
    return rates[scenario]


class EndToEnd:
    params: ClassVar[list[str]] = ["backlog", "live"]
    param_names: ClassVar[list[str]] = ["scenario"]
    timeout = 600.0
    # One run per commit: each is a whole produce -> spr run -> verify cycle.
    number = 1
    repeat = 1

    def setup_cache(self) -> dict[str, float]:
        from spr.bench import harness
        from spr.bench.options import SKIPPABLE

        stack = _stack()
        if stack is None:
            return {}  # each benchmark then skips itself (_rate)
        bootstrap, dsn = stack
        rates: dict[str, float] = {}
        for scenario in self.params:
            options = harness.BenchOptions(
                bootstrap=bootstrap,
                dsn=dsn,
                events=EVENTS,
                entities=BACKLOG_ENTITIES,
                scenario=scenario,
                skip=frozenset(SKIPPABLE),  # every ceiling and alternative: spr alone
            )
            document = harness.run_bench(options)
            section: dict[str, Any] = document if scenario == "backlog" else document["live"]
            spr = section["contenders"]["spr"]
            if spr["status"] != "ok" or not spr.get("events_per_s"):
                raise RuntimeError(f"spr bench --scenario {scenario} failed: {spr}")
            rates[scenario] = float(spr["events_per_s"])
        return rates

    def track_events_per_s(self, rates: dict[str, float], scenario: str) -> float:
        return _rate(rates, scenario)

    track_events_per_s.unit = "events/s"  # type: ignore[attr-defined]

    def track_vs_field_report(self, rates: dict[str, float], scenario: str) -> float:
        return _rate(rates, scenario) / FIELD_REPORT_EVENTS_PER_S

    track_vs_field_report.unit = "x 45K msg/s"  # type: ignore[attr-defined]
