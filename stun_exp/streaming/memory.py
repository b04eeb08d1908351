"""Keep freed layer buffers from piling up in the heap (glibc only; a no-op elsewhere).

glibc serves big allocations with mmap and returns them on free, but after such a free it raises its
mmap threshold to that size (up to 32 MiB), so the next layers' tensors come from the heap, whose
free space is seldom given back: the process RSS then grows by ~10 MiB per decoder layer streamed
(measured in benchmarks/bench_scale.py). Fixing the threshold turns the dynamic rule off.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3
_done = False


def bound_allocator(threshold: int = 1 << 20) -> bool:
    """mallopt(M_MMAP_THRESHOLD, threshold) once per process; True when it took effect."""
    global _done
    if _done or not sys.platform.startswith("linux"):
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _done = bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        _done = False
    return _done
