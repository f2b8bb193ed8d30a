"""The bench's workspace: its topics, tables and child processes, and what it reads back."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from spr.bench.options import BenchOptions, Progress
from spr.errors import ServerUnavailable

__all__ = ["Child", "Workspace", "broker_timestamps", "watermarks"]


def _rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class Child:
    """One contender process: its result file, and an RSS sampler thread."""

    #: Seconds between the samples kept in :attr:`rss_series` (peaks use every sample).
    SERIES_STEP_S = 1.0

    def __init__(self, argv: list[str], out: Path, log: Path) -> None:
        self.out = out
        self.log = log
        self.peak_sampled = 0
        #: ``(seconds since start, RSS bytes)``, one sample per SERIES_STEP_S: the
        #: soak scenario's memory over time.
        self.rss_series: list[tuple[float, int]] = []
        self._started = time.monotonic()
        with open(log, "wb") as stderr:
            self.process = subprocess.Popen(argv, stdout=stderr, stderr=stderr)
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        # From one step in: at 0 s the process is still being exec'd (well under 1 MB).
        next_kept = self.SERIES_STEP_S
        while self.process.poll() is None:
            rss = _rss_bytes(self.process.pid)
            if rss is not None:
                self.peak_sampled = max(self.peak_sampled, rss)
                elapsed = time.monotonic() - self._started
                if elapsed >= next_kept:
                    self.rss_series.append((round(elapsed, 1), rss))
                    next_kept = elapsed + self.SERIES_STEP_S
            time.sleep(0.2)

    def wait(self, timeout_s: float) -> dict[str, Any]:
        """The process's result; kills it after ``timeout_s`` (result then says so)."""
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            if not self.out.exists():
                return {"error": f"timed out after {timeout_s:.0f} s", "log": self.tail()}
        self._sampler.join(timeout=1.0)
        if not self.out.exists():
            return {
                "error": f"exited {self.process.returncode} without a result",
                "log": self.tail(),
            }
        result: dict[str, Any] = json.loads(self.out.read_text())
        if "error" in result:
            result["log"] = self.tail()
        result["rss_sampled_bytes"] = self.peak_sampled
        return result

    def tail(self, lines: int = 8) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])


class Workspace:
    """Names, temporary files and the clean-up of one bench run."""

    def __init__(self, options: BenchOptions, progress: Progress) -> None:
        self.options = options
        self.progress = progress
        self.run_id = f"{time.strftime('%H%M%S')}_{uuid.uuid4().hex[:6]}"
        self.tmp = Path(tempfile.mkdtemp(prefix="spr-bench-"))
        self.topics: list[str] = []
        self.tables: list[str] = []
        self.groups: list[str] = []
        self.offsets_table = self.name("offsets")
        self.tables.append(self.offsets_table)
        from spr.config import TableMapping

        self.tables.append(TableMapping(table="_", offsets_table=self.offsets_table).gaps_table)
        self._admin: Any = None

    def name(self, what: str) -> str:
        return f"spr_bench_{self.run_id}_{what}"

    def group(self, what: str) -> str:
        group = self.name(what)
        self.groups.append(group)
        return group

    def table(self, what: str) -> str:
        table = self.name(what)
        self.tables.append(table)
        return table

    @property
    def admin(self) -> Any:
        if self._admin is None:
            from confluent_kafka.admin import AdminClient

            self._admin = AdminClient({"bootstrap.servers": self.options.bootstrap})
        return self._admin

    def create_topic(self, what: str, config: dict[str, str] | None = None) -> str:
        from confluent_kafka import KafkaException
        from confluent_kafka.cimpl import NewTopic

        topic = self.name(what)
        futures = self.admin.create_topics(
            [NewTopic(topic, num_partitions=self.options.partitions, config=config or {})],
            operation_timeout=30,
        )
        try:
            futures[topic].result(timeout=30)
        except KafkaException as exc:
            raise ServerUnavailable(f"cannot create topic {topic}: {exc}") from None
        self.topics.append(topic)
        from spr.dev.loadgen import ensure_topic

        ensure_topic(self.options.bootstrap, topic, self.options.partitions)
        return topic

    def launch(self, kind: str, label: str, **kwargs: Any) -> Child:
        args = self.tmp / f"{label}.args.json"
        args.write_text(json.dumps(kwargs))
        out = self.tmp / f"{label}.result.json"
        argv = [sys.executable, "-m", "spr.bench.worker", kind, str(args), str(out)]
        return Child(argv, out, self.tmp / f"{label}.log")

    def create_state_table(self, what: str, *, textbook: bool = False) -> str:
        """A new state table (and the offsets table) for one contender: spr's own, or
        with ``textbook`` the plain table the textbook merge is measured on."""
        from spr.config import TableMapping
        from spr.sink.postgres import PostgresSink

        table = self.table(what)
        mapping = TableMapping(table=table, offsets_table=self.offsets_table)
        with PostgresSink(self.options.dsn, mapping=mapping) as sink:
            if textbook:
                from spr.bench.ceilings import create_textbook_table

                create_textbook_table(sink.connect(), table)
            # On the textbook table this only adds the offsets and gaps tables.
            sink.init_schema(fit_existing_table=textbook)
        return table

    def drop_table(self, table: str) -> None:
        if self.options.keep:
            return
        import psycopg
        from psycopg import sql

        try:
            with psycopg.connect(self.options.dsn, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))
        except psycopg.Error as exc:
            self.progress(f"could not drop table {table}: {exc}")

    def delete_topic(self, topic: str) -> None:
        """Delete one of the bench's topics now (to free disk), unless ``keep``."""
        if self.options.keep or topic not in self.topics:
            return
        try:
            self.admin.delete_topics([topic], operation_timeout=30)[topic].result(timeout=30)
            self.topics.remove(topic)
        except Exception as exc:
            self.progress(f"could not delete topic {topic}: {exc}")

    def wait_assigned(self, group: str, topic: str, timeout_s: float = 60.0) -> bool:
        """Block until ``group`` is stable with every partition of ``topic`` assigned to
        its members (whatever client they run); False after ``timeout_s``."""
        from confluent_kafka import ConsumerGroupState

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                described = self.admin.describe_consumer_groups([group])[group].result(timeout=5)
            except Exception:
                described = None
            if described is not None and described.state == ConsumerGroupState.STABLE:
                held = {
                    tp.partition
                    for member in described.members
                    for tp in member.assignment.topic_partitions
                    if tp.topic == topic
                }
                if len(held) >= self.options.partitions:
                    return True
            time.sleep(0.1)
        return False

    def cleanup(self) -> None:
        if self.options.keep:
            self.progress(f"kept topics {self.topics}, tables {self.tables}, files {self.tmp}")
            return
        if self.options.runs_state:  # the transform scenario makes no tables
            for table in self.tables:
                self.drop_table(table)
        try:
            if self.topics:
                futures = self.admin.delete_topics(self.topics, operation_timeout=30)
                for topic, future in futures.items():
                    try:
                        future.result(timeout=30)
                    except Exception as exc:
                        # A topic a contender was to create may never have been created.
                        if "UNKNOWN_TOPIC" not in str(exc):
                            self.progress(f"could not delete topic {topic}: {exc}")
            if self.groups:
                futures = self.admin.delete_consumer_groups(self.groups, request_timeout=10)
                for future in futures.values():
                    # A group that never committed does not exist.
                    with contextlib.suppress(Exception):
                        future.result(timeout=10)
        except Exception as exc:
            self.progress(f"clean-up of topics/groups incomplete: {exc}")
        shutil.rmtree(self.tmp, ignore_errors=True)


def watermarks(
    bootstrap: str, topic: str, partitions: int
) -> tuple[dict[int, int], dict[int, int]]:
    """(low, high) watermark offsets of every partition of ``topic``."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "spr-bench-watermarks"})
    try:
        low: dict[int, int] = {}
        high: dict[int, int] = {}
        for p in range(partitions):
            lo, hi = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            low[p], high[p] = int(lo), int(hi)
        return low, high
    finally:
        consumer.close()


def broker_timestamps(
    bootstrap: str, topic: str, low: Mapping[int, int], high: Mapping[int, int]
) -> dict[int, list[int]]:
    """Every message's broker timestamp, per partition, indexed by offset - low."""
    from confluent_kafka import Consumer, TopicPartition

    stamps: dict[int, list[int]] = {p: [] for p in low}
    remaining = {p for p in low if high[p] > low[p]}
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "spr-bench-timestamps",
         "enable.auto.commit": "false"}
    )  # fmt: skip
    consumer.assign([TopicPartition(topic, p, low[p]) for p in remaining])
    deadline = time.monotonic() + 120
    try:
        while remaining and time.monotonic() < deadline:
            messages: list[Any] = consumer.consume(10_000, 0.5)
            for m in messages:
                if m.error() is not None:
                    continue
                p = m.partition()
                stamps[p].append(m.timestamp()[1])
                if m.offset() + 1 >= high[p]:
                    remaining.discard(p)
    finally:
        consumer.close()
    return stamps


# ------------------------------------------------------------------------ contenders
