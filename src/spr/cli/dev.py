"""``spr dev up | down | status | kill-broker | stop-broker | start-broker``: the local
stack."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from spr.dev import standby
from spr.dev.stack import BROKER_COUNTS, PG_PORT, DevStack
from spr.errors import ConfigError

_NODE_ACTIONS = ("kill-broker", "stop-broker", "start-broker")

# ------------------------------------------------------------------------- the CLI


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dev = subparsers.add_parser(
        "dev",
        help="run a local Apache Kafka (KRaft) + PostgreSQL on 127.0.0.1",
        description="The local stack: Apache Kafka (KRaft) on 127.0.0.1:9092 and PostgreSQL "
        "on 127.0.0.1:55432 (ports from $SPR_DEV_KAFKA_PORT / $SPR_DEV_PG_PORT), with "
        "data and logs under $SPR_DEV_DIR. 'up' starts what is not running and waits "
        "until both answer; 'down' stops only what 'up' started; 'status' exits 1 when "
        "either is down. 'up --brokers 3' runs three Kafka nodes instead (node N on port "
        "9092 + 2 * (N - 1), its controller on the next), which the *-broker actions stop "
        "and start one at a time.",
    )
    dev.add_argument(
        "action",
        choices=("up", "down", "status", *_NODE_ACTIONS, "pg-failover"),
        help="up: start and wait; down: stop what up started; status: report; "
        "kill-broker N: SIGKILL Kafka node N; stop-broker N: SIGTERM it (a controlled "
        "shutdown); start-broker N: start it again and wait; pg-failover: fence the "
        "PostgreSQL primary and promote the standby (needs up --pg-standby)",
    )
    dev.add_argument(
        "node", nargs="?", type=int, metavar="N",
        help="the Kafka node (1 to --brokers) of kill-broker, stop-broker and start-broker",
    )  # fmt: skip
    dev.add_argument(
        "--brokers", type=int, choices=BROKER_COUNTS, default=None,
        help="Kafka nodes for up: 1, or a 3-node KRaft cluster with replication factor 3 "
        "and min.insync.replicas=2 (default: what the state folder last ran, else 1)",
    )  # fmt: skip
    dev.add_argument(
        "--pg-standby", action="store_true",
        help="up: also run a streaming PostgreSQL standby on the next port (pg_basebackup), "
        "remembered in the state folder (default: only when the folder remembers one)",
    )  # fmt: skip
    dev.add_argument("--json", action="store_true", help="print the status as JSON (default: text)")
    dev.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    if args.brokers is not None and args.action != "up":
        raise ConfigError(f"--brokers only applies to up, not to {args.action}")
    if (args.node is None) == (args.action in _NODE_ACTIONS):
        raise ConfigError(
            f"{args.action} needs a node number, e.g. spr dev {args.action} 2"
            if args.node is None
            else f"{args.action} takes no node number"
        )
    if args.pg_standby and args.action != "up":
        raise ConfigError(f"--pg-standby only applies to up, not to {args.action}")
    stack = DevStack(brokers=args.brokers if args.action == "up" else None)
    if args.action == "pg-failover":
        return _pg_failover(stack)
    if args.action in _NODE_ACTIONS:
        return _node_action(stack, args.action, args.node)
    if args.action == "up":
        t0 = time.monotonic()
        stack.up()
        pair = _pg_pair(stack)
        if args.pg_standby or pair.exists:
            pair.up()
        _print_status(stack, as_json=args.json)
        if not args.json:
            print(f"ready in {time.monotonic() - t0:.1f} s")
        return 0
    if args.action == "down":
        stopped = _pg_pair(stack).down() + stack.down()
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
        return 0
    status = _print_status(stack, as_json=args.json)
    return 0 if all(s["running"] for s in status.values()) else 1


def _node_action(stack: DevStack, action: str, node: int) -> int:
    t0 = time.monotonic()
    if action == "kill-broker":
        print(f"killed kafka node {node} (pid {stack.kill_broker(node)})")
    elif action == "stop-broker":
        print(f"stopped kafka node {node} (pid {stack.stop_broker(node)})")
    else:
        stack.start_broker(node)
        pid = stack.broker_pid(node)
        print(f"kafka node {node} running (pid {pid}), ready in {time.monotonic() - t0:.1f} s")
    return 0


def _print_status(stack: DevStack, *, as_json: bool) -> dict[str, dict[str, object]]:
    status = stack.status()
    standby.add_status(_pg_pair(stack), status)
    if as_json:
        print(json.dumps(status))
    else:
        for name, info in status.items():
            where = info.get("bootstrap") or info.get("dsn")
            state = "running" if info["running"] else "stopped"
            print(f"{name:9} {state:8} {where}")
            nodes = info.get("nodes")
            if isinstance(nodes, list) and len(nodes) > 1:
                for n in nodes:
                    state = "running" if n["running"] else "stopped"
                    active = ", active controller" if n["active_controller"] else ""
                    print(f"  node {n['node']}  {state:8} {n['address']} "
                          f"(controller port {n['controller_port']}){active}")  # fmt: skip
            servers = info.get("servers")
            if isinstance(servers, list):
                for server in servers:
                    print(f"  127.0.0.1:{server['port']}  {server['role']}")
    return status


def _pg_pair(stack: DevStack) -> standby.StandbyPair:
    return standby.stack_pair(stack.paths.root, stack.paths.pg_data, PG_PORT)


def _pg_failover(stack: DevStack) -> int:
    t0 = time.monotonic()
    old, new = _pg_pair(stack).failover()
    print(
        f"promoted 127.0.0.1:{new.port} to primary; fenced 127.0.0.1:{old.port} (stopped, "
        f"comes back read-only) in {time.monotonic() - t0:.1f} s"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:  # pragma: no cover - convenience
    from spr.cli import main as cli_main

    return cli_main(["dev", *(argv or sys.argv[1:])])
