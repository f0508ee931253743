"""Tests for returning freed heap memory to the operating system."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import numpy as np
import psutil
import pytest

from edge.memory import can_trim_heap, limit_heap_arenas, trim_heap

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is a glibc function")
def test_trim_heap_available_on_glibc() -> None:
    assert can_trim_heap()


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is a glibc function")
def test_trim_heap_returns_freed_memory() -> None:
    """Blocks freed in the middle of the heap stay resident until the heap is trimmed."""
    process = psutil.Process()
    trim_heap()
    # Blocks under glibc's mmap threshold (128 KiB) come from the heap. Every other one is
    # kept, so the freed ones are not at the top of the heap, where free() trims by itself.
    blocks = [np.ones(8_000, dtype=np.float64) for _ in range(6_000)]
    del blocks[::2]
    freed = process.memory_info().rss
    released = trim_heap()
    trimmed = process.memory_info().rss
    assert released
    assert freed - trimmed > 100 * 2**20


_COUNT_HEAPS = """
import ctypes, sys, threading
import numpy as np
from edge.memory import limit_heap_arenas

if sys.argv[1] == "limit":
    assert limit_heap_arenas(1)
barrier = threading.Barrier(4)
kept = []

def allocate() -> None:
    # Small blocks come from the thread's heap; holding them while the other threads
    # allocate makes glibc give each thread a heap of its own when it may.
    blocks = [np.ones(1_000) for _ in range(200)]
    barrier.wait()
    kept.append(blocks)

threads = [threading.Thread(target=allocate) for _ in range(4)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
libc = ctypes.CDLL(None)
libc.open_memstream.restype = ctypes.c_void_p
libc.open_memstream.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_size_t)]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
buffer, size = ctypes.c_char_p(), ctypes.c_size_t()
stream = libc.open_memstream(ctypes.byref(buffer), ctypes.byref(size))
libc.malloc_info(0, stream)
libc.fclose(stream)
print(buffer.value.decode().count("<heap nr="))
"""


@pytest.mark.skipif(not GLIBC, reason="mallopt's arena limit is a glibc setting")
@pytest.mark.parametrize(("mode", "most"), [("limit", 1), ("default", None)])
def test_limit_heap_arenas(mode: str, most: int | None) -> None:
    """With the limit, threads that allocate at once share one heap; without, they do not."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    completed = subprocess.run(
        [sys.executable, "-c", _COUNT_HEAPS, mode],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        timeout=60,
    )
    heaps = int(completed.stdout.strip())
    if most is None:
        assert heaps > 1
    else:
        assert heaps <= most


def test_limit_heap_arenas_leaves_environment_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """MALLOC_ARENA_MAX in the environment wins: the call sets nothing."""
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert not limit_heap_arenas()
