"""``--workers N``: N processes of one command in one consumer group, as children.

The parent forwards SIGTERM/SIGINT to every child and exits 0 only when every child
did; a child killed by a signal counts as failed.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from types import FrameType

__all__ = ["run_workers"]


def run_workers(command: str, workers: int, argv_of: Callable[[int], list[str]]) -> int:
    """Run ``workers`` children, the ``i``-th with ``argv_of(i)``; block until all end.
    Returns 0 when every one exited 0, else the first non-zero exit code."""
    children = [subprocess.Popen(argv_of(i)) for i in range(workers)]

    def _forward(signum: int, frame: FrameType | None) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, _forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        codes = [child.wait() for child in children]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    failed = [c for c in codes if c != 0]
    if failed:
        print(f"spr {command}: {len(failed)} of {workers} worker(s) failed", file=sys.stderr)
        return failed[0] if failed[0] > 0 else 1
    return 0
