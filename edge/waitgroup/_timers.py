"""Op timeouts kept in start order, with one loop timer per timeout value.

Ops with the same timeout that start in order also expire in order. So a FIFO queue
per timeout value replaces one ``TimerHandle`` per op, and adding an op is an append.
An op that ends early stays in its queue and is skipped when its deadline comes.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from edge.waitgroup._op import Op

# asyncio runs a timer once its time is within the clock resolution of now
# (BaseEventLoop._run_once in CPython 3.11), so entries that close count as expired.
_RESOLUTION = time.get_clock_info("monotonic").resolution


class _Queue:
    __slots__ = ("entries", "timer")

    def __init__(self) -> None:
        self.entries: deque[tuple[float, Op[Any]]] = deque()
        self.timer: asyncio.TimerHandle | None = None


class Timeouts:
    """Calls ``expire(op)`` at each op's timeout unless the op ended first.

    Args:
        loop: Loop whose clock the deadlines use.
        expire: Called on the loop thread with each op whose deadline passed; it
            must ignore ops that are already final or being cancelled.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, expire: Callable[[Op[Any]], object]
    ) -> None:
        self._loop = loop
        self._expire = expire
        self._queues: dict[float, _Queue] = {}

    def add(self, op: Op[Any], when: float, timeout: float) -> None:
        """Schedule ``expire(op)`` at loop time ``when`` (start + ``timeout``)."""
        queue = self._queues.get(timeout)
        if queue is None:
            queue = self._queues[timeout] = _Queue()
        entries = queue.entries
        if entries and when < entries[-1][0]:
            # Out of start order (thread ops start on other threads): use a
            # dedicated timer for this op.
            op.timer = self._loop.call_at(when, self._expire, op)
            return
        entries.append((when, op))
        if queue.timer is None:
            queue.timer = self._loop.call_at(when, self._fire, queue)

    def _fire(self, queue: _Queue) -> None:
        queue.timer = None
        entries = queue.entries
        now = self._loop.time() + _RESOLUTION
        while entries and entries[0][0] <= now:
            _, op = entries.popleft()
            if not op.final:
                self._expire(op)
        if entries:
            queue.timer = self._loop.call_at(entries[0][0], self._fire, queue)

    def clear(self) -> None:
        """Drop every pending deadline. Call it only when no op is running."""
        for queue in self._queues.values():
            if queue.timer is not None:
                queue.timer.cancel()
        self._queues.clear()
