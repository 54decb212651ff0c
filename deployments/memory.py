"""Giving freed heap memory back to the system, in the replicas that make and free large
buffers every round (the QueueServer's model activations, the SessionManager's canvases).

glibc keeps freed blocks in its heaps for reuse, and after a free of a large mapped block it
raises its mmap threshold, so later large buffers come from the heap too; with buffers of many
sizes freed in other orders than made, the heaps fragment and a replica's resident memory
creeps up (bench/results/soak-cpu-2core.md). `malloc_trim(0)` returns every free page of every
heap to the system (madvise), whatever the fragmentation. Called at most every
`serve.trim_every_s` seconds after a round (null: never).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time

_libc = None
if ctypes.util.find_library("c"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"))
        _libc.malloc_trim.argtypes, _libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        _libc = None


def trim_heap() -> bool:
    """Give the free pages of the C heaps back to the system; whether it could (glibc only)."""
    if _libc is None:
        return False
    _libc.malloc_trim(0)
    return True


class HeapTrimmer:
    """Calls `trim_heap` at most every `every_s` seconds (None: never), when `maybe()` is called."""

    def __init__(self, every_s: float | None, clock=time.monotonic):
        self.every_s, self._clock = every_s, clock
        self._last = clock()

    def maybe(self) -> bool:
        """Trim if it is time; whether it did."""
        if self.every_s is None or self._clock() - self._last < self.every_s:
            return False
        self._last = self._clock()
        return trim_heap()
