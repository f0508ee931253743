"""FIFO slot limiter that one or several WaitGroups draw their slots from."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Protocol, runtime_checkable


@runtime_checkable
class SlotLimiter(Protocol):
    """Interface a WaitGroup needs from a limiter passed as ``limiter=``.

    ``acquire()`` must wait in FIFO order and release the slot again if it is
    cancelled after the slot was granted. ``acquire_nowait()`` must fail while anyone
    waits, so that ``try_go()`` never overtakes a queued ``go()``.
    """

    async def acquire(self) -> None:
        """Wait for a slot and take it."""
        ...

    def acquire_nowait(self) -> bool:
        """Take a slot if one is free and no caller waits. Return whether it was taken."""
        ...

    def release(self) -> None:
        """Return a slot taken by ``acquire()`` or ``acquire_nowait()``."""
        ...


class Limiter:
    """FIFO concurrency limiter for one event loop, shareable by several WaitGroups.

    A released slot goes straight to the longest waiting ``acquire()``, so a caller
    that arrives later can never take it first.

    Args:
        total: Number of slots, at least 1.

    Raises:
        ValueError: ``total`` is below 1.
        TypeError: ``total`` is not an int.
    """

    def __init__(self, total: int) -> None:
        if not isinstance(total, int) or isinstance(total, bool):
            message = f"Limiter total must be an int, got {total!r}"
            raise TypeError(message)
        if total < 1:
            message = f"Limiter total must be at least 1, got {total}"
            raise ValueError(message)
        self._total = total
        self._free = total
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def total(self) -> int:
        """Number of slots."""
        return self._total

    @property
    def borrowed(self) -> int:
        """Slots currently taken."""
        return self._total - self._free

    @property
    def waiting(self) -> int:
        """Callers of ``acquire()`` still waiting for a slot."""
        return sum(1 for waiter in self._waiters if not waiter.done())

    def acquire_nowait(self) -> bool:
        """Take a slot if one is free and no caller waits. Return whether it was taken."""
        if self._free == 0 or self._waiters:
            return False
        self._free -= 1
        return True

    async def acquire(self) -> None:
        """Wait in FIFO order for a slot and take it.

        Raises:
            asyncio.CancelledError: The caller was cancelled while waiting; a slot
                granted at the same moment passes on to the next waiter.
        """
        if self.acquire_nowait():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                # The slot was handed over just before the cancellation arrived.
                self.release()
            else:
                # release() may already have dropped the cancelled waiter.
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        """Return a slot, handing it to the longest waiting ``acquire()`` if there is one.

        Raises:
            ValueError: More slots released than taken.
        """
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        if self._free >= self._total:
            message = f"Limiter released more often than acquired (total {self._total})"
            raise ValueError(message)
        self._free += 1

    def __repr__(self) -> str:
        return f"Limiter(total={self._total}, borrowed={self.borrowed}, waiting={self.waiting})"
