"""What a bench contender records about itself: first message, timeline, peak RSS."""

from __future__ import annotations

import resource
import sys
import threading
import time
from typing import Any

__all__ = ["Recorder", "peak_rss_bytes"]


def peak_rss_bytes() -> int:
    """This process's own peak resident set size.

    On Linux that is ``VmHWM`` of ``/proc/self/status``, the high-water mark of this
    program's memory, which starts afresh at ``exec``. ``ru_maxrss`` does not: a child
    started by ``subprocess`` (vfork + exec) inherits its parent's peak, so every
    contender would report at least the harness's RSS. Elsewhere, ``ru_maxrss``.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)


class Recorder:
    """Progress of one contender: first message time and a cumulative timeline."""

    def __init__(self) -> None:
        self.first_s: float | None = None
        self.done = 0
        self.timeline: list[tuple[float, int]] = []
        self._lock = threading.Lock()

    def first(self) -> None:
        if self.first_s is None:
            self.first_s = time.time()

    def add(self, events: int) -> None:
        with self._lock:
            self.done += events
            self.timeline.append((time.time(), self.done))

    def result(self, **extra: Any) -> dict[str, Any]:
        return {
            "first_s": self.first_s,
            "timeline": self.timeline,
            "events": self.done,
            **extra,
            "peak_rss_bytes": peak_rss_bytes(),
        }
