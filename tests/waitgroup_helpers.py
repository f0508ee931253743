"""Shared helpers for the WaitGroup tests.

Worker processes import this module to unpickle the process-op functions below, so it
imports nothing heavy (no pytest).
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

from edge.waitgroup import Stats, current_op

# Upper bound on timer lateness accepted by timing asserts, in seconds. The tests run
# on loaded 2-core CI machines, where a loop iteration can be delayed by tens of ms.
SLACK = 0.15
# Lower-bound tolerance: asyncio may fire a timer up to one clock resolution early,
# and loop.time() is read a moment after the timer was scheduled.
EARLY = 0.005


def check_invariants(stats: Stats) -> None:
    """Assert the accounting invariants of a stats snapshot."""
    finished = stats.succeeded + stats.failed + stats.timed_out + stats.cancelled + stats.rejected
    assert stats.submitted == stats.queued + stats.running + finished
    assert stats.counter == stats.manual_pending + stats.queued + stats.running
    if stats.limit is not None:
        assert stats.running + stats.abandoned_in_flight <= stats.limit
        assert stats.peak_running <= stats.limit


class Concurrency:
    """Instrumented async op body: records start order, current and peak concurrency."""

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0
        self.started: list[str] = []
        self.start_times: list[float] = []

    async def run(self, seconds: float, tag: str = "") -> str:
        """Sleep for ``seconds`` while counted as running, then return ``tag``."""
        self.current += 1
        self.peak = max(self.peak, self.current)
        self.started.append(tag)
        self.start_times.append(asyncio.get_running_loop().time())
        try:
            await asyncio.sleep(seconds)
        finally:
            self.current -= 1
        return tag


class Gate:
    """Async op body that blocks until the test opens its gate."""

    def __init__(self) -> None:
        self.calls = 0
        self.event = asyncio.Event()

    async def wait(self, tag: str = "") -> str:
        """Block until ``open()``, then return ``tag``."""
        self.calls += 1
        await self.event.wait()
        return tag

    def open(self) -> None:
        """Release every op waiting on the gate."""
        self.event.set()


async def yield_turns(turns: int = 5) -> None:
    """Let the event loop run a few iterations."""
    for _ in range(turns):
        await asyncio.sleep(0)


def spin(seconds: float) -> int:
    """Burn CPU in pure Python for ``seconds`` and return the process id."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return os.getpid()


def spin_until(event: threading.Event, seconds: float, poll: float) -> bool:
    """Work in ``poll``-second steps until ``event`` is set or ``seconds`` pass.

    Returns True if the event stopped the work.
    """
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if event.wait(poll):
            return True
    return False


def spin_ignoring_sigterm(seconds: float) -> int:
    """Ignore SIGTERM, as a hung native call would, then burn CPU for ``seconds``."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return spin(seconds)


def process_id() -> int:
    """Return the worker's process id."""
    return os.getpid()


def abort_worker() -> None:
    """Abort the worker process with SIGABRT, as a crashing native decoder would."""
    os.abort()


def fail_with(message: str) -> None:
    """Raise ValueError(message)."""
    raise ValueError(message)


def remaining_budget() -> tuple[str, float | None]:
    """Return the op name and remaining budget as seen inside the op."""
    context = current_op()
    return context.name, context.remaining()
