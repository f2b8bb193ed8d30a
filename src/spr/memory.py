"""Process-wide memory settings for the processes spr owns (``spr run``, ``spr transform``).

glibc's ``malloc`` serves a request above its mmap threshold (128 KiB at start) with a
private mapping that ``free`` returns to the system. But each time such a block is freed
it raises the threshold to that block's size, up to 32 MiB. spr's big buffers (a
batch's byte arena, doubling to ~16 MB; the 1 MB ``COPY`` pieces; librdkafka's fetch
buffers) soon sit below the raised threshold and come from the heap, whose freed pages
fragment and stay resident. On the ``live`` bench scenario that was the difference
between a peak RSS of 160 MB and 118 MB (issue 15 note).

:func:`bound_malloc_retention` pins the threshold at its starting value, which also turns
off the raise. It is called by the command-line entry points, never on import: a
program that embeds spr owns its allocator and can set ``MALLOC_MMAP_THRESHOLD_=131072``
itself. An explicit ``MALLOC_MMAP_THRESHOLD_`` in the environment is left alone, and on a
C library without ``mallopt`` (musl, macOS) this does nothing.
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["MMAP_THRESHOLD_BYTES", "bound_malloc_retention"]

#: glibc's own starting threshold, kept fixed.
MMAP_THRESHOLD_BYTES = 128 * 1024
_M_MMAP_THRESHOLD = -3  # <malloc.h>


def bound_malloc_retention(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Pin glibc's mmap threshold at ``threshold`` bytes. True when it was set."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold))
