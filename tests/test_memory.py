"""Freed heap pages given back to the system between rounds (`deployments.memory`)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from deployments.memory import HeapTrimmer, trim_heap


def test_the_heap_is_trimmed_at_most_every_so_many_seconds():
    now = [0.0]
    trimmer = HeapTrimmer(10.0, clock=lambda: now[0])
    done = []
    for t in range(0, 35, 2):
        now[0] = float(t)
        done.append(trimmer.maybe() and t)
    assert [t for t in done if t] == [10, 20, 30] or not trim_heap()
    assert not any(HeapTrimmer(None).maybe() for _ in range(3))  # null: never


# In a process of its own: the glibc settings it makes would stay with the test worker.
FREE_AND_TRIM = """
import ctypes
from deployments.memory import trim_heap

def rss_anon_kb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:"))

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: these blocks come from the heap, as after a large free
libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: glibc does not trim the heap's top by itself
blocks = [libc.malloc(64 * 1024) for _ in range(800)]  # 50 MB of heap
for block in blocks:
    ctypes.memset(block, 1, 64 * 1024)
for block in blocks[:-1]:  # the last one pins the heap's top: only madvise gives the pages back
    libc.free(block)
before = rss_anon_kb()
print(trim_heap(), before, rss_anon_kb())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_trimming_gives_back_freed_memory():
    out = subprocess.run([sys.executable, "-c", FREE_AND_TRIM], capture_output=True, text=True, check=True)
    trimmed, before, after = out.stdout.split()
    assert trimmed == "True" and int(after) < int(before) - 30 * 1024, out.stdout
