"""``spr dev up | down | status``: the local stack."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from spr.dev.stack import DevStack

# ------------------------------------------------------------------------- the CLI


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dev = subparsers.add_parser(
        "dev",
        help="run a local Apache Kafka (KRaft) + PostgreSQL on 127.0.0.1",
        description="The local stack: Apache Kafka (KRaft) on 127.0.0.1:9092 and PostgreSQL "
        "on 127.0.0.1:55432 (ports from $SPR_DEV_KAFKA_PORT / $SPR_DEV_PG_PORT), with "
        "data and logs under $SPR_DEV_DIR. 'up' starts what is not running and waits "
        "until both answer; 'down' stops only what 'up' started; 'status' exits 1 when "
        "either is down.",
    )
    dev.add_argument(
        "action",
        choices=("up", "down", "status"),
        help="up: start and wait; down: stop what up started; status: report",
    )
    dev.add_argument("--json", action="store_true", help="print the status as JSON (default: text)")
    dev.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    stack = DevStack()
    if args.action == "up":
        t0 = time.monotonic()
        stack.up()
        _print_status(stack, as_json=args.json)
        if not args.json:
            print(f"ready in {time.monotonic() - t0:.1f} s")
        return 0
    if args.action == "down":
        stopped = stack.down()
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
        return 0
    status = _print_status(stack, as_json=args.json)
    return 0 if all(s["running"] for s in status.values()) else 1


def _print_status(stack: DevStack, *, as_json: bool) -> dict[str, dict[str, object]]:
    status = stack.status()
    if as_json:
        print(json.dumps(status))
    else:
        for name, info in status.items():
            where = info.get("bootstrap") or info.get("dsn")
            state = "running" if info["running"] else "stopped"
            print(f"{name:9} {state:8} {where}")
    return status


def main(argv: Sequence[str] | None = None) -> int:  # pragma: no cover - convenience
    from spr.cli import main as cli_main

    return cli_main(["dev", *(argv or sys.argv[1:])])
