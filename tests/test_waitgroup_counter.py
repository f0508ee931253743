"""WaitGroup counter: add, done, wait, epochs and the thread and loop rules."""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading

import pytest
from waitgroup_helpers import EARLY, SLACK, Gate, check_invariants, yield_turns

from edge.waitgroup import Outcome, WaitGroup


async def test_wait_fresh_group_returns_without_suspending(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """wait() on a fresh group returns within the same loop turn and logs nothing."""
    loop = asyncio.get_running_loop()
    turned = asyncio.Event()
    loop.call_soon(turned.set)
    wg = WaitGroup()

    await wg.wait()

    assert not turned.is_set()
    assert wg.stats().counter == 0
    assert caplog.records == []


async def test_done_three_times_after_add_three() -> None:
    """add(3) followed by three done() releases wait() and leaves the counter at 0."""
    wg = WaitGroup()
    wg.add(3)
    waiter = asyncio.create_task(wg.wait())
    await yield_turns()
    assert not waiter.done()

    for _ in range(3):
        wg.done()
    await asyncio.wait_for(waiter, 1)

    assert wg.stats().counter == 0
    assert wg.stats().manual_pending == 0


async def test_done_at_zero_raises_value_error() -> None:
    """done() at counter 0 raises ValueError and leaves the counter at 0."""
    wg = WaitGroup()

    with pytest.raises(ValueError, match="negative WaitGroup counter"):
        wg.done()

    assert wg.stats().counter == 0


async def test_done_cannot_steal_op_accounting() -> None:
    """done() with only ops pending raises, keeps the counter and leaves waiters blocked."""
    wg = WaitGroup()
    gate = Gate()
    handle = await wg.go(gate.wait)
    waiter = asyncio.create_task(wg.wait())
    await yield_turns()

    with pytest.raises(ValueError, match="negative WaitGroup counter"):
        wg.done()

    assert wg.stats().counter == 1
    await yield_turns()
    assert not waiter.done()
    gate.open()
    await asyncio.wait_for(waiter, 1)
    assert handle.done()


async def test_add_below_zero_raises_and_keeps_counter() -> None:
    """add(-2) at counter 1 raises ValueError and the counter stays 1."""
    wg = WaitGroup()
    wg.add(1)

    with pytest.raises(ValueError, match="negative WaitGroup counter"):
        wg.add(-2)

    assert wg.stats().counter == 1
    wg.done()


async def test_add_negative_releases_waiter() -> None:
    """add(-2) at counter 2 releases a blocked waiter."""
    wg = WaitGroup()
    wg.add(2)
    waiter = asyncio.create_task(wg.wait())
    await yield_turns()
    assert not waiter.done()

    wg.add(-2)

    await asyncio.wait_for(waiter, 1)
    assert wg.stats().counter == 0


async def test_add_rejects_non_int_and_ignores_zero() -> None:
    """add() raises TypeError for non-int deltas, and add(0) changes nothing."""
    wg = WaitGroup()

    with pytest.raises(TypeError):
        wg.add(1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        wg.add(True)
    wg.add(0)

    assert wg.stats().counter == 0
    assert wg.stats().epoch == 0


async def test_wait_blocks_again_in_second_batch() -> None:
    """After a first batch completes, add(1) makes wait() block until the matching done()."""
    wg = WaitGroup()
    wg.add(1)
    wg.done()
    await wg.wait()

    wg.add(1)
    waiter = asyncio.create_task(wg.wait())
    await yield_turns()
    assert not waiter.done()

    wg.done()
    await asyncio.wait_for(waiter, 1)
    assert wg.stats().epoch == 2


async def test_wait_returns_when_its_epoch_ends() -> None:
    """done() then add(1) in one tick releases the blocked waiter, and a new wait() blocks."""
    wg = WaitGroup()
    wg.add(1)
    waiter = asyncio.create_task(wg.wait())
    await yield_turns()
    assert not waiter.done()

    wg.done()
    wg.add(1)

    await asyncio.wait_for(waiter, 1)
    second = asyncio.create_task(wg.wait())
    await yield_turns()
    assert not second.done()
    assert wg.stats().epoch == 2
    wg.done()
    await asyncio.wait_for(second, 1)


async def test_wait_releases_all_waiters() -> None:
    """Five concurrent waiters all return when the counter reaches 0."""
    wg = WaitGroup()
    wg.add(1)
    waiters = [asyncio.create_task(wg.wait()) for _ in range(5)]
    await yield_turns()
    assert not any(waiter.done() for waiter in waiters)

    wg.done()

    await asyncio.wait_for(asyncio.gather(*waiters), 1)
    assert all(waiter.done() and waiter.exception() is None for waiter in waiters)


async def test_wait_timeout_leaves_op_running() -> None:
    """wait(timeout=0.05) raises TimeoutError at ~50 ms while the op runs on to completion."""
    loop = asyncio.get_running_loop()
    wg = WaitGroup()
    handle = await wg.go(asyncio.sleep, 1.0)
    start = loop.time()

    with pytest.raises(TimeoutError):
        await wg.wait(timeout=0.05)

    elapsed = loop.time() - start
    assert 0.05 - EARLY <= elapsed < 0.05 + SLACK
    assert not handle.done()
    assert wg.stats().running == 1
    await wg.wait()
    assert handle.result is not None
    assert handle.result.outcome is Outcome.SUCCEEDED


async def test_wait_cancelled_cancels_only_the_waiter() -> None:
    """Cancelling one wait() leaves the op and other waiters untouched."""
    wg = WaitGroup()
    gate = Gate()
    handle = await wg.go(gate.wait)
    cancelled = asyncio.create_task(wg.wait())
    other = asyncio.create_task(wg.wait())
    await yield_turns()

    cancelled.cancel()
    await yield_turns()

    assert cancelled.cancelled()
    assert not other.done()
    assert not handle.done()
    gate.open()
    await asyncio.wait_for(other, 1)


async def test_done_from_plain_thread_raises() -> None:
    """done() from a plain thread raises RuntimeError, but done_threadsafe() lowers the counter."""
    wg = WaitGroup()
    wg.add(2)
    errors: list[BaseException] = []

    def from_thread() -> None:
        try:
            wg.done()
        except RuntimeError as exc:
            errors.append(exc)
        wg.done_threadsafe()

    thread = threading.Thread(target=from_thread)
    thread.start()
    await asyncio.to_thread(thread.join)
    await yield_turns()

    assert len(errors) == 1
    assert "event loop thread" in str(errors[0])
    assert wg.stats().counter == 1
    wg.done()
    await wg.wait()


async def test_done_threadsafe_negative_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """done_threadsafe() at counter 0 logs an error on the loop and leaves the counter at 0."""
    wg = WaitGroup()
    await wg.wait()

    await asyncio.to_thread(wg.done_threadsafe)
    await yield_turns()

    assert wg.stats().counter == 0
    assert any(
        record.levelno == logging.ERROR and "negative counter" in record.getMessage()
        for record in caplog.records
    )


async def test_add_and_done_are_plain_methods() -> None:
    """add() and done() are not coroutine functions and act when called without await."""
    wg = WaitGroup()

    assert not inspect.iscoroutinefunction(wg.add)
    assert not inspect.iscoroutinefunction(wg.done)
    wg.add()
    assert wg.stats().counter == 1
    wg.done()
    assert wg.stats().counter == 0


def test_group_second_loop_raises_naming_loop() -> None:
    """A group used under one asyncio.run() raises RuntimeError naming the loop in a second."""
    wg = WaitGroup()
    loops: list[asyncio.AbstractEventLoop] = []

    async def use() -> None:
        loops.append(asyncio.get_running_loop())
        wg.add(1)
        wg.done()
        await wg.wait()

    asyncio.run(use())
    with pytest.raises(RuntimeError, match="bound to event loop") as excinfo:
        asyncio.run(use())

    assert repr(loops[0]) in str(excinfo.value)
    assert repr(loops[1]) in str(excinfo.value)


async def test_take_results_drains_one_epoch() -> None:
    """take_results() returns the finished epoch's results once, tagged with its epoch."""
    wg = WaitGroup()
    for value in range(3):
        await wg.go(asyncio.sleep, 0, value)
    await wg.wait()

    first = wg.take_results()
    assert [result.value for result in first] == [0, 1, 2]
    assert {result.epoch for result in first} == {1}
    assert wg.results == []

    for value in (10, 11):
        await wg.go(asyncio.sleep, 0.01, value)
    await wg.wait()
    second = wg.take_results()

    assert [result.value for result in second] == [10, 11]
    assert {result.epoch for result in second} == {2}
    assert [result.index for result in second] == [3, 4]
    stats = wg.stats()
    assert stats.epoch == 2
    assert stats.succeeded == 5
    check_invariants(stats)
    await wg.aclose()
