"""Quix Streams' PostgreSQL sink, the closest Python alternative, in a virtual environment
of its own.

Quix Streams pins ``confluent-kafka<2.13`` and its sink needs psycopg2, so it cannot share
spr's environment. :func:`ensure_venv` builds ``<cache>/bench-venvs/quix`` on demand
(``python -m venv`` + ``pip install quixstreams[postgresql]==<pinned>``), once per user,
and reuses it while the pinned requirement is unchanged. :data:`SCRIPT` runs in that
environment: an ``Application`` with its defaults (at-least-once, 5 s checkpoints), the
topic read as JSON, and ``PostgreSQLSink`` upserting on ``(entity_type, entity_id)``,
the way a user would keep one row per entity with it. The sink has no sequence guard,
so a stale event arriving after a newer one wins; the harness verifies and reports it.
"""

from __future__ import annotations

import fcntl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "QUIX_REQUIREMENT",
    "SCRIPT",
    "VenvUnavailable",
    "ensure_venv",
    "prepare",
    "venv_dir",
]

#: The exact release measured; bump it on purpose (the venv is rebuilt when it changes).
QUIX_REQUIREMENT = "quixstreams[postgresql]==3.28.1"


class VenvUnavailable(Exception):
    """The Quix Streams environment could not be built; ``str()`` says why."""


def venv_dir() -> Path:
    from spr.dev.stack import cache_dir

    return cache_dir() / "bench-venvs" / "quix"


def ensure_venv(*, timeout_s: float = 600.0) -> Path:
    """The venv's python, building the venv first when needed. Blocks (a first build
    takes ~15-60 s); safe against concurrent callers (file lock). Raises
    :class:`VenvUnavailable` with pip's last lines when it cannot be built."""
    root = venv_dir()
    python = root / "bin" / "python"
    marker = root / ".spr-requirement"
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / ".quix.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if python.exists() and marker.exists() and marker.read_text() == QUIX_REQUIREMENT:
            return python
        deadline = time.monotonic() + timeout_s
        steps = [
            [sys.executable, "-m", "venv", "--clear", str(root)],
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
             QUIX_REQUIREMENT],
        ]  # fmt: skip
        for step in steps:
            remaining = max(1.0, deadline - time.monotonic())
            try:
                done = subprocess.run(
                    step, capture_output=True, text=True, timeout=remaining, check=False
                )
            except subprocess.TimeoutExpired:
                raise VenvUnavailable(
                    f"building the Quix Streams venv took longer than {timeout_s:g} s"
                ) from None
            except OSError as exc:
                raise VenvUnavailable(f"cannot run {step[0]}: {exc}") from None
            if done.returncode != 0:
                tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
                raise VenvUnavailable(
                    f"`{' '.join(step[-3:])}` failed (exit {done.returncode}): {tail}"
                )
        marker.write_text(QUIX_REQUIREMENT)
        return python


def prepare(timeout_s: float, progress: Callable[[str], None]) -> tuple[Path | None, str]:
    """(the venv's python, "") or (None, why it could not be built); says when it built."""
    try:
        started = time.monotonic()
        python = ensure_venv(timeout_s=timeout_s)
        took = time.monotonic() - started
        if took > 1.0:
            progress(f"built the Quix Streams venv in {took:.0f} s ({python.parent.parent})")
        return python, ""
    except VenvUnavailable as exc:
        return None, f"Quix Streams could not be installed: {exc}"


#: How every Quix contender script ends, after its ``try:`` block set ``result`` and
#: ``code``: the error if any, its own peak RSS, the result file written atomically.
SCRIPT_END = r"""except BaseException as exc:
    traceback.print_exc()
    result = {"error": f"{type(exc).__name__}: {exc}"}
    code = 1
result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
try:  # this program's own peak: ru_maxrss also counts the parent's, inherited at exec
    with open("/proc/self/status") as f:
        result["peak_rss_bytes"] = next(
            int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
except (OSError, StopIteration, ValueError):
    pass
with open(out + ".tmp", "w") as f:
    json.dump(result, f)
os.replace(out + ".tmp", out)
sys.exit(code)
"""

#: Runs in the Quix venv: ``python SCRIPT ARGS.json OUT.json``. Self-contained (no spr).
SCRIPT = (
    r"""
import json, logging, os, resource, sys, threading, time, traceback

args = json.load(open(sys.argv[1]))
out = sys.argv[2]
result = {}
try:
    from quixstreams import Application
    from quixstreams.sinks.community.postgresql import PostgreSQLSink

    first = [None]
    timeline = []
    done = [0]
    app = Application(
        broker_address=args["bootstrap"],
        consumer_group=args["group"],
        auto_offset_reset="earliest",
        loglevel="WARNING",
    )

    class TimedSink(PostgreSQLSink):
        def add(self, *a, **k):
            if first[0] is None:
                first[0] = time.time()
            return super().add(*a, **k)

        def write(self, batch):
            super().write(batch)
            done[0] += batch.size
            timeline.append((time.time(), done[0]))
            if done[0] >= args["total"]:
                app.stop()

    topic = app.topic(args["topic"], value_deserializer="json")
    sdf = app.dataframe(topic)
    sdf.sink(TimedSink(
        host=args["host"], port=args["port"], dbname=args["dbname"], user=args["user"],
        password=args.get("password", ""), table_name=args["table"],
        primary_key_columns=["entity_type", "entity_id"], upsert_on_primary_key=True,
        include_metadata=False,
    ))
    timer = threading.Timer(args["timeout_s"], app.stop)
    timer.daemon = True
    timer.start()
    app.run()
    timer.cancel()
    import quixstreams
    result = {"first_s": first[0], "timeline": timeline, "events": done[0],
              "quixstreams": quixstreams.__version__}
    code = 0
"""
    + SCRIPT_END
)
