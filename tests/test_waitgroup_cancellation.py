"""WaitGroup cancellation and shutdown: cancel(), owner cancellation, close and reuse."""

from __future__ import annotations

import asyncio
import threading

import pytest
from waitgroup_helpers import Gate, check_invariants, yield_turns

from edge.waitgroup import Outcome, WaitGroup


async def test_cancel_inside_body_exits_cleanly() -> None:
    """cancel() in the body cancels ops and exits without error, and a later go() raises."""
    gate = Gate()
    late = Gate()

    async with WaitGroup() as wg:
        first = await wg.go(gate.wait)
        second = await wg.go(gate.wait)
        await yield_turns()
        wg.cancel("operator stop")
        wg.cancel()
        with pytest.raises(RuntimeError, match="cancelled"):
            await wg.go(late.wait)
        assert wg.try_go is not None
        with pytest.raises(RuntimeError, match="cancelled"):
            wg.try_go(late.wait)

    assert late.calls == 0
    for handle in (first, second):
        assert handle.result is not None
        assert handle.result.outcome is Outcome.CANCELLED
        assert handle.result.reason == "shutdown"
        with pytest.raises(asyncio.CancelledError):
            await handle
    assert wg.stats().submitted == 2


async def test_cancel_wakes_queued_body_without_error() -> None:
    """cancel() from another task rejects the body's queued go(), and the exit swallows it."""
    gate = Gate()
    never = Gate()
    loop = asyncio.get_running_loop()

    async with WaitGroup(1) as wg:
        await wg.go(gate.wait)
        loop.call_later(0.02, wg.cancel)
        await wg.go(never.wait, name="queued")
        pytest.fail("go() should have been interrupted by cancel()")

    assert never.calls == 0
    by_name = {result.name: result for result in wg.results}
    assert by_name["queued"].outcome is Outcome.REJECTED
    assert by_name["queued"].reason == "shutdown"


async def test_cancel_before_block_is_allowed() -> None:
    """cancel() before async with makes every go() in the block raise, and exit is normal."""
    wg = WaitGroup()
    wg.cancel()

    async with wg:
        with pytest.raises(RuntimeError):
            await wg.go(asyncio.sleep, 0)

    assert wg.stats().submitted == 0


async def test_exit_leaves_no_tasks_and_blocks_reentry() -> None:
    """After exit no group task is alive, the invariants hold, and re-entering raises."""
    async with WaitGroup(2, name="regions") as wg:
        for index in range(5):
            await wg.go(asyncio.sleep, 0.01, index)

    names = [task.get_name() for task in asyncio.all_tasks()]
    assert not [name for name in names if name.startswith("edge.waitgroup.regions")]
    check_invariants(wg.stats())
    with pytest.raises(RuntimeError, match="already been entered"):
        async with wg:
            pass
    with pytest.raises(RuntimeError, match="closed"):
        await wg.go(asyncio.sleep, 0)
    with pytest.raises(RuntimeError, match="closed"):
        wg.add(1)


async def test_ops_have_stable_task_names() -> None:
    """Op tasks are named edge.waitgroup.<group>[<index>]."""
    names: list[str] = []

    async def record_name() -> None:
        task = asyncio.current_task()
        assert task is not None
        names.append(task.get_name())

    async with WaitGroup(name="ocr") as wg:
        await wg.go(record_name)
        await wg.go(record_name)

    assert names == ["edge.waitgroup.ocr[0]", "edge.waitgroup.ocr[1]"]


async def test_owner_cancellation_propagates() -> None:
    """Cancelling the owner task cancels ops, rejects queued, and re-raises CancelledError."""
    gate = Gate()
    wg = WaitGroup(1)
    queued_tasks: list[asyncio.Task[object]] = []

    async def owner() -> None:
        async with wg:
            await wg.go(gate.wait, name="running")
            queued_tasks.append(asyncio.create_task(wg.go(gate.wait, name="queued")))
            await asyncio.sleep(10)

    task = asyncio.create_task(owner())
    await asyncio.sleep(0.02)
    task.cancel()

    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
    by_name = {result.name: result for result in wg.results}
    assert by_name["running"].outcome is Outcome.CANCELLED
    assert by_name["running"].reason == "shutdown"
    assert by_name["queued"].outcome is Outcome.REJECTED
    assert gate.calls == 1
    with pytest.raises(asyncio.CancelledError):
        await queued_tasks[0]


async def test_owner_cancellation_crosses_nested_task_group() -> None:
    """Cancelling a task that runs a WaitGroup inside a TaskGroup propagates the cancellation."""
    gate = Gate()
    entered = asyncio.Event()

    async def inner() -> None:
        async with WaitGroup() as wg:
            await wg.go(gate.wait)
            entered.set()
            await asyncio.sleep(10)

    async def outer() -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(inner())

    task = asyncio.create_task(outer())
    await entered.wait()
    task.cancel()

    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def test_handle_cancel_marks_op_cancelled() -> None:
    """handle.cancel() ends a running op as CANCELLED, and a second cancel() returns False."""
    gate = Gate()
    wg = WaitGroup()
    handle = await wg.go(gate.wait)
    await yield_turns()

    assert handle.cancel()
    await wg.wait()

    assert not handle.cancel()
    assert handle.result is not None
    assert handle.result.outcome is Outcome.CANCELLED
    assert handle.result.reason is None
    await wg.aclose()


async def test_aclose_reports_abandoned_thread() -> None:
    """aclose() cancels ops and lists a thread that cannot be stopped as abandoned."""
    started = threading.Event()
    stop = threading.Event()

    def stuck() -> None:
        started.set()
        stop.wait(5.0)

    wg = WaitGroup(2)
    handle = await wg.go(stuck, kind="thread", name="stuck")
    assert await asyncio.to_thread(started.wait, 1.0)

    report = await wg.aclose(grace=0.05)

    assert handle.result is not None
    assert handle.result.outcome is Outcome.CANCELLED
    assert [result.name for result in report.abandoned] == ["stuck"]
    assert not report.clean
    assert report.stats.abandoned_in_flight == 1
    with pytest.raises(RuntimeError, match="closed"):
        await wg.go(asyncio.sleep, 0)
    stop.set()
    await asyncio.sleep(0.05)
    await yield_turns()
    assert wg.stats().abandoned_finished == 1
    assert (await wg.aclose()).clean


async def test_go_from_other_loop_thread_raises() -> None:
    """go() from a thread running another event loop raises RuntimeError, nothing submitted."""
    wg = WaitGroup()
    await wg.wait()
    errors: list[BaseException] = []

    def other_thread() -> None:
        async def submit() -> None:
            try:
                await wg.go(asyncio.sleep, 0)
            except RuntimeError as exc:
                errors.append(exc)

        asyncio.run(submit())

    await asyncio.to_thread(other_thread)

    assert len(errors) == 1
    assert "bound to event loop" in str(errors[0])
    assert wg.stats().submitted == 0


async def test_cancel_threadsafe_from_thread() -> None:
    """cancel_threadsafe() from a plain thread cancels the running ops on the loop."""
    gate = Gate()
    wg = WaitGroup()
    handle = await wg.go(gate.wait)

    await asyncio.to_thread(wg.cancel_threadsafe)
    await wg.wait()

    assert handle.result is not None
    assert handle.result.outcome is Outcome.CANCELLED
    await wg.aclose()
