"""spr.memory: the processes spr owns keep glibc from hoarding freed big buffers.

What the setting changes is checked where glibc shows it: whether a 1 MB block, asked
for after a 16 MB one was freed, is its own mapping (returned to the system when freed)
or carved from the heap. Each case runs in a fresh interpreter, because the setting is
process-wide and glibc's threshold only ever moves up.
"""

from __future__ import annotations

import os
import subprocess
import sys

_PROBE = r"""
import ctypes, sys
from spr.memory import bound_malloc_retention
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
if sys.argv[1] == "pinned":
    print("set" if bound_malloc_retention() else "unset")
else:
    print("untouched")
libc.free(libc.malloc(16 * 2**20))  # glibc raises a dynamic threshold to 16 MB here
block = libc.malloc(2**20)
# glibc's chunk header: the size word before the block, bit 1 = IS_MMAPPED.
size_word = ctypes.c_size_t.from_address(block - ctypes.sizeof(ctypes.c_size_t)).value
print("mapped" if size_word & 2 else "heap")
libc.free(block)
"""


def _probe(mode: str, **env: str) -> list[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    environment.update(env)
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode],
        env=environment,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return out.stdout.split()


def test_pinned_threshold_keeps_big_buffers_in_their_own_mappings() -> None:
    assert _probe("pinned") == ["set", "mapped"]


def test_without_it_glibc_serves_the_same_buffer_from_the_heap() -> None:
    # The behaviour spr.memory exists to turn off: after a big block is freed, the
    # dynamic threshold puts every smaller big buffer in the heap.
    assert _probe("dynamic") == ["untouched", "heap"]


def test_an_explicit_environment_setting_is_left_alone() -> None:
    assert _probe("pinned", MALLOC_MMAP_THRESHOLD_=str(64 * 2**20))[0] == "unset"


def test_run_until_stopped_applies_it_in_the_process_it_runs_in() -> None:
    probe = (
        "import spr.memory as m, spr.cli.options as o\n"
        "calls = []\n"
        "m.bound_malloc_retention = lambda *a, **k: calls.append(1) or True\n"
        "o.run_until_stopped(lambda: None, lambda: None)\n"
        "print(len(calls))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.split() == ["1"]
