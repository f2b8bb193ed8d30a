"""The primary and streaming standby of one failover test (see conftest.py)."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import psycopg

from spr.dev.standby import PgNode, init_primary, make_standby


class Pair:
    """One test's primary (``first``) and standby (``second``), and its DSNs."""

    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.first = PgNode(data=root / "a", port=port)
        self.second = PgNode(data=root / "b", port=port + 1)

    def dsn(self) -> str:
        """The multi-host DSN spr runs with: whichever of the two accepts writes."""
        return (
            f"host=127.0.0.1,127.0.0.1 port={self.first.port},{self.second.port} "
            "user=spr dbname=spr target_session_attrs=read-write connect_timeout=2"
        )

    @staticmethod
    def direct(node: PgNode) -> str:
        return node.conninfo("spr")

    def setup(self, *, synchronous: bool) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:  # the servers' logs go beside their data folders
            shutil.chown(self.root, "postgres", "postgres")
        init_primary(self.first)
        self.first.start()
        with psycopg.connect(self.first.conninfo("postgres"), autocommit=True) as conn:
            conn.execute("CREATE DATABASE spr")
        make_standby(self.first, self.second)
        if synchronous:
            # Only now that the standby streams: every commit waits for it from here on.
            with psycopg.connect(self.first.conninfo("postgres"), autocommit=True) as conn:
                conn.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
                conn.execute("SELECT pg_reload_conf()")

    def teardown(self) -> None:
        for node in (self.first, self.second):
            with contextlib.suppress(Exception):
                node.stop("immediate")
            with contextlib.suppress(Exception):
                node.kill()  # a postmaster pg_ctl could not stop, by its recorded PID
        shutil.rmtree(self.root, ignore_errors=True)
