"""``spr bench``: the end-to-end benchmark with verification (design §8, issue 7).

Produces the workload once, then runs, on the same events: spr's engine, the two
ceilings (raw consumption; spr's COPY -> merge alone), a sentry-arroyo composition,
Quix Streams' PostgreSQL sink (in its own cached venv) and the field report's
anti-pattern; verifies every table against the expected state, and reports events/s,
ratios, peak RSS, flushes/pauses/dedup hits and, from a latency phase at a steady rate,
the latency distribution. Exit 0 when spr's run verified, 1 when it did not, 2 when a
server or an argument is wrong. See :mod:`spr.bench.harness` for the measurement rules;
the command line is :mod:`spr.cli.bench`.
"""

from __future__ import annotations
