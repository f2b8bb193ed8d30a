"""``spr bench``: the end-to-end benchmark with verification (design §8, issue 7).

Produces the workload once, then runs, on the same events: spr's engine, the two
ceilings (raw consumption; spr's COPY -> merge alone), a sentry-arroyo composition,
Quix Streams' PostgreSQL sink (in its own cached venv) and the field report's
anti-pattern; verifies every table against the expected state, and reports events/s,
ratios, peak RSS, flushes/pauses/dedup hits and, from a latency phase at a steady rate,
the latency distribution. Exit 0 when spr's run verified, 1 when it did not, 2 when a
server or an argument is wrong. See :mod:`spr.bench.harness` for the measurement rules;
the command line is :mod:`spr.cli.bench`.

``--scenario transform`` (issue 14, :mod:`spr.bench.transform`) benchmarks the routing
stage instead: foreign-shaped events (:mod:`spr.bench.foreign`) moved by a plain
consume -> produce loop (the ceiling), by ``spr transform`` and by Quix Streams'
exactly-once mode (:mod:`spr.bench.quix_eos`), each output read back and verified,
with events/s, latency to ``read_committed`` visibility and peak RSS.
"""

from __future__ import annotations
