"""Tests for returning freed heap memory to the operating system."""

from __future__ import annotations

import platform
import sys

import numpy as np
import psutil
import pytest

from edge.memory import can_trim_heap, trim_heap

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
