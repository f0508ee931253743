"""Heap trimming: memory freed while a frame was processed goes back to the operating system.

onnxruntime, OpenCV and NumPy allocate large temporary buffers for each frame (tens of MB for
text detection on a big crop) through the C library's malloc. glibc keeps freed memory in its
heaps for reuse, so the daemon's resident memory grows to the largest sum of temporaries seen
and stays there. ``malloc_trim(0)`` hands the free pages back. Measured on 4 generated
1920x1080 scenes (x86-64, onnxruntime 1.32, OCR and detector in one process), resident memory
after each frame stayed near 170 MB with a trim, against 250 to 290 MB without.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from collections.abc import Callable

logger = logging.getLogger(__name__)


def _find_malloc_trim() -> Callable[[int], int] | None:
    """Return glibc's ``malloc_trim``, or ``None`` where the C library has none (musl, macOS)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    function = getattr(libc, "malloc_trim", None)
    if function is None:
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    trim: Callable[[int], int] = function
    return trim


_MALLOC_TRIM = _find_malloc_trim()

#: glibc's mallopt parameter number for the most heaps (arenas) threads may use.
_M_ARENA_MAX = -8
#: Heaps the daemon's threads share. glibc's default is 8 per core, so that the event loop,
#: the detector, each concurrent read and each OCR model thread get heaps of their own, and
#: each heap keeps the freed buffers of the largest detection it served. With 2, the daemon's
#: peak on the corpus was 351, 340 and 360 MB (summed RSS) against 383, 411 and 392 MB,
#: at the same frame rate on generated scenes.
HEAP_ARENAS = 2


def limit_heap_arenas(count: int = HEAP_ARENAS) -> bool:
    """Let the threads of this process share at most ``count`` glibc heaps.

    Call it before the process starts threads that allocate: heaps that already exist
    stay. Setting ``MALLOC_ARENA_MAX`` in the environment does the same and wins over this.

    Returns:
        Whether the limit was set. Always ``False`` without glibc or with
        ``MALLOC_ARENA_MAX`` set.
    """
    if _MALLOC_TRIM is None or "MALLOC_ARENA_MAX" in os.environ:
        return False
    libc = ctypes.CDLL(None)
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_ARENA_MAX, count))


def trim_heap() -> bool:
    """Give free heap memory back to the operating system.

    Returns:
        Whether the C library released any memory. Always ``False`` without glibc.
    """
    if _MALLOC_TRIM is None:
        return False
    return bool(_MALLOC_TRIM(0))


def can_trim_heap() -> bool:
    """Return whether :func:`trim_heap` does anything on this system."""
    return _MALLOC_TRIM is not None
