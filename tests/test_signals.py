"""The signal inbox: stops and reloads reach the frame loop, or wait for it, never kill at once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from edge.signals import SignalInbox


@pytest.fixture
def inbox() -> Iterator[SignalInbox]:
    """Install an inbox, and put back the handlers it replaced after the test."""
    installed = SignalInbox()
    replaced = installed.install()
    try:
        yield installed
    finally:
        for signum, handler in replaced.items():
            signal.signal(signum, handler)


async def _deliver(events: list[object], count: int) -> None:
    """Yield to the loop until ``count`` callbacks ran, for at most two seconds."""
    for _ in range(200):
        if len(events) >= count:
            return
        await asyncio.sleep(0.01)


async def test_attached_loop_gets_signals(inbox: SignalInbox) -> None:
    events: list[object] = []
    inbox.attach(asyncio.get_running_loop(), events.append, lambda: events.append("reload"))
    os.kill(os.getpid(), signal.SIGHUP)
    await _deliver(events, 1)
    os.kill(os.getpid(), signal.SIGTERM)
    await _deliver(events, 2)
    inbox.detach()
    assert events == ["reload", signal.SIGTERM]
    assert inbox.stop_signum == signal.SIGTERM


async def test_stop_waits_for_attach(inbox: SignalInbox) -> None:
    # Without the inbox, this SIGTERM would end the test process.
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGHUP)
    assert inbox.stop_signum == signal.SIGTERM
    events: list[object] = []
    inbox.attach(asyncio.get_running_loop(), events.append, lambda: events.append("reload"))
    await _deliver(events, 1)
    await asyncio.sleep(0.05)
    inbox.detach()
    # The stop wins over the reload that came with it.
    assert events == [signal.SIGTERM]


async def test_pending_reload_sent_once(inbox: SignalInbox) -> None:
    os.kill(os.getpid(), signal.SIGHUP)
    events: list[object] = []
    loop = asyncio.get_running_loop()
    inbox.attach(loop, events.append, lambda: events.append("reload"))
    await _deliver(events, 1)
    inbox.detach()
    inbox.attach(loop, events.append, lambda: events.append("reload"))
    await asyncio.sleep(0.05)
    inbox.detach()
    assert events == ["reload"]
    assert inbox.stop_signum is None


async def test_first_stop_signal_kept(inbox: SignalInbox) -> None:
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGTERM)
    assert inbox.stop_signum == signal.SIGINT


async def test_signal_on_worker_thread_wakes_loop(inbox: SignalInbox) -> None:
    """A stop delivered to another thread reaches the idle loop at once, not at its next timer."""
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    inbox.attach(loop, lambda signum: stopped.set(), lambda: None)

    def send_to_this_thread() -> None:
        # Sent once the main thread waits in the loop's select().
        time.sleep(0.2)
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)

    worker = threading.Thread(target=send_to_this_thread)
    started = time.monotonic()
    try:
        worker.start()
        # Without the wakeup socket, the handler would run only when this timeout wakes the
        # loop, after 10 s.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopped.wait(), 10.0)
        waited = time.monotonic() - started
    finally:
        worker.join()
        inbox.detach()
    assert stopped.is_set()
    assert waited < 5.0
    assert inbox.stop_signum == signal.SIGTERM


def test_second_sigint_ends_process() -> None:
    """The first SIGINT is kept for the loop, and the second ends the process at once."""
    script = (
        "import os, signal, time\n"
        "from edge.signals import SignalInbox\n"
        "inbox = SignalInbox()\n"
        "inbox.install()\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "print('kept', inbox.stop_signum == signal.SIGINT, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(5)\n"
        "print('still running', flush=True)\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert completed.stdout == "kept True\n", completed.stderr
    assert completed.returncode == -signal.SIGINT
