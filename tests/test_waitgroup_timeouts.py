"""WaitGroup timeouts: per-op timeouts by kind, the group deadline and current_op()."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading

import pytest
from waitgroup_helpers import EARLY, SLACK, Gate, check_invariants, spin, spin_until, yield_turns

from edge.waitgroup import DeadlineExceeded, Outcome, WaitGroup, current_op


async def test_async_timeout_runs_finally_and_spares_siblings() -> None:
    """An async op over op_timeout ends TIMED_OUT at ~0.1 s after its finally, siblings succeed."""
    loop = asyncio.get_running_loop()
    cleaned_up = asyncio.Event()

    async def slow() -> None:
        try:
            await asyncio.sleep(1.0)
        finally:
            cleaned_up.set()

    async with WaitGroup(op_timeout=0.1) as wg:
        slow_handle = await wg.go(slow)
        siblings = [await wg.go(asyncio.sleep, 0.02, index) for index in range(3)]
        start = loop.time()
        with pytest.raises(TimeoutError):
            await slow_handle
        elapsed = loop.time() - start

    assert cleaned_up.is_set()
    assert 0.1 - EARLY <= elapsed < 0.1 + SLACK
    result = slow_handle.result
    assert result is not None
    assert result.outcome is Outcome.TIMED_OUT
    assert result.reason == "op"
    assert isinstance(result.error, TimeoutError)
    assert not result.abandoned
    assert [await handle for handle in siblings] == [0, 1, 2]


async def test_queue_time_not_charged_to_timeout() -> None:
    """With limit 1, op B queued 0.2 s behind A still succeeds under op_timeout 0.1."""
    async with WaitGroup(1, op_timeout=0.1) as wg:
        await wg.go(asyncio.sleep, 0.2, "A", timeout=0.5, name="A")
        await wg.go(asyncio.sleep, 0.05, "B", name="B")

    first, second = wg.results
    assert first.outcome is Outcome.SUCCEEDED
    assert second.outcome is Outcome.SUCCEEDED
    assert second.value == "B"
    assert 0.2 - EARLY <= second.queue_wait < 0.2 + SLACK
    assert second.run_time is not None
    assert second.run_time < 0.1


async def test_thread_timeout_keeps_slot_until_return(caplog: pytest.LogCaptureFixture) -> None:
    """A 0.5 s thread op times out at ~0.1 s, but its slot frees only when the thread returns."""
    loop = asyncio.get_running_loop()
    caplog.set_level(logging.DEBUG)
    wg = WaitGroup(1, op_timeout=0.1)
    start = loop.time()
    busy = await wg.go(spin, 0.5, kind="thread")

    await wg.wait()
    released = loop.time() - start
    assert busy.result is not None
    assert busy.result.outcome is Outcome.TIMED_OUT
    assert busy.result.abandoned
    assert 0.1 - EARLY <= released < 0.1 + SLACK
    assert wg.stats().abandoned_in_flight == 1
    await asyncio.sleep(max(0.0, 0.2 - (loop.time() - start)))
    late = await wg.go(asyncio.get_running_loop().time, kind="thread", timeout=None)
    started = await late
    await wg.wait()

    assert 0.5 - EARLY <= started - start < 0.5 + SLACK
    stats = wg.stats()
    assert stats.abandoned_finished == 1
    assert stats.abandoned_in_flight == 0
    check_invariants(stats)
    report = await wg.aclose()
    assert report.clean
    gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


async def test_thread_on_cancel_stops_worker_promptly() -> None:
    """on_cancel sets an Event the thread polls, so the op ends TIMED_OUT, not abandoned."""
    loop = asyncio.get_running_loop()
    stop = threading.Event()
    wg = WaitGroup(1, op_timeout=0.1)
    start = loop.time()

    handle = await wg.go(spin_until, stop, 5.0, 0.01, kind="thread", on_cancel=stop.set)
    await wg.wait()

    assert stop.is_set()
    result = handle.result
    assert result is not None
    assert result.outcome is Outcome.TIMED_OUT
    assert not result.abandoned
    assert 0.1 - EARLY <= result.ended_at - start < 0.1 + SLACK
    stats = wg.stats()
    assert stats.abandoned_in_flight == 0
    assert stats.abandoned_finished == 0
    follower = await wg.go(loop.time, kind="thread")
    assert await follower - start < 0.1 + SLACK
    await wg.aclose()


async def test_timed_out_op_stays_timed_out() -> None:
    """Ops that finish after their timeout stay TIMED_OUT, so succeeded + timed_out == started."""
    stop = asyncio.Event()

    async def stubborn() -> str:
        while True:
            try:
                await stop.wait()
                return "late value"
            except asyncio.CancelledError:
                stop.set()

    wg = WaitGroup(op_timeout=0.05, cancel_grace=0.5)
    thread_op = await wg.go(spin, 0.2, kind="thread")
    async_op = await wg.go(stubborn)
    quick = await wg.go(asyncio.sleep, 0, "quick")
    await wg.wait()
    await asyncio.sleep(0.25)
    await yield_turns()

    for handle in (thread_op, async_op):
        assert handle.result is not None
        assert handle.result.outcome is Outcome.TIMED_OUT
        assert handle.result.value is None
    assert await quick == "quick"
    stats = wg.stats()
    assert stats.succeeded + stats.timed_out == 3
    assert stats.abandoned_finished == 1
    check_invariants(stats)
    await wg.aclose()


async def test_async_op_ignoring_cancel_is_abandoned(caplog: pytest.LogCaptureFixture) -> None:
    """An async op ignoring cancellation past cancel_grace is TIMED_OUT, abandoned, slot held."""
    release = asyncio.Event()

    async def deaf() -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue

    wg = WaitGroup(1, op_timeout=0.05, cancel_grace=0.05)
    handle = await wg.go(deaf)
    await wg.wait()

    assert handle.result is not None
    assert handle.result.outcome is Outcome.TIMED_OUT
    assert handle.result.abandoned
    assert wg.stats().abandoned_in_flight == 1
    assert wg.try_go(asyncio.sleep, 0) is None
    assert any("abandoned" in record.getMessage() for record in caplog.records)
    report = await wg.aclose(grace=0.05)
    assert [result.index for result in report.abandoned] == [0]
    release.set()
    await yield_turns()
    assert wg.stats().abandoned_finished == 1


async def test_remaining_budget_uses_earlier_deadline() -> None:
    """current_op().remaining() is <= 0.3 under a 0.3 s deadline, decreases, and reaches a stub."""
    timeouts: list[float | None] = []

    class FakeOcrStub:
        # gRPC stubs take the call deadline as a timeout argument.
        async def Recognize(self, request: bytes, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
            timeouts.append(timeout)
            await asyncio.sleep(0.02)
            return request

    async def read_region(stub: FakeOcrStub) -> list[float | None]:
        seen = []
        for _ in range(3):
            budget = current_op().remaining()
            seen.append(budget)
            await stub.Recognize(b"crop", timeout=budget)
        return seen

    async with WaitGroup(op_timeout=0.5, deadline=0.3) as wg:
        handle = await wg.go(read_region, FakeOcrStub(), name="region-7")
        thread_handle = await wg.go(lambda: current_op().remaining(), kind="thread")

    seen = [value for value in await handle if value is not None]
    assert len(seen) == 3
    assert all(0 < value <= 0.3 for value in seen)
    assert seen == sorted(seen, reverse=True)
    assert len(set(seen)) == 3
    assert timeouts == seen
    thread_budget = await thread_handle
    assert thread_budget is not None
    assert 0 < thread_budget <= 0.3


async def test_current_op_outside_op_raises() -> None:
    """current_op() outside an op raises RuntimeError."""
    with pytest.raises(RuntimeError, match="outside a WaitGroup op"):
        current_op()


async def test_deadline_rejects_queued_and_times_out_running() -> None:
    """At the deadline queued ops are REJECTED, running ones TIMED_OUT, and go() raises."""
    loop = asyncio.get_running_loop()
    wg = WaitGroup(1, deadline=0.1)
    gate = Gate()
    running = await wg.go(gate.wait, name="running")
    start = loop.time()
    queued = asyncio.create_task(wg.go(gate.wait, name="queued"))
    await yield_turns()

    with pytest.raises(DeadlineExceeded):
        await queued
    elapsed = loop.time() - start
    await wg.wait()

    assert 0.1 - EARLY <= elapsed < 0.1 + SLACK
    assert gate.calls == 1
    by_name = {result.name: result for result in wg.results}
    assert by_name["running"].outcome is Outcome.TIMED_OUT
    assert by_name["running"].reason == "deadline"
    assert isinstance(by_name["running"].error, DeadlineExceeded)
    assert by_name["queued"].outcome is Outcome.REJECTED
    assert by_name["queued"].reason == "deadline"
    with pytest.raises(TimeoutError):
        await running
    check_invariants(wg.stats())
    await wg.aclose()


async def test_scoped_deadline_closes_admission() -> None:
    """Inside async with, go() after the deadline raises DeadlineExceeded and try_go() is None."""
    async with WaitGroup(deadline=0.05) as wg:
        await asyncio.sleep(0.05 + SLACK / 2)
        with pytest.raises(DeadlineExceeded):
            await wg.go(asyncio.sleep, 0)
        assert wg.try_go(asyncio.sleep, 0) is None

    stats = wg.stats()
    assert stats.submitted == 1
    assert stats.rejected == 1


async def test_unscoped_deadline_restarts_each_epoch() -> None:
    """An unscoped group's deadline counts from each epoch's first submission."""
    wg = WaitGroup(deadline=0.1)
    first = await wg.go(asyncio.sleep, 1.0)
    await wg.wait()
    assert first.result is not None
    assert first.result.outcome is Outcome.TIMED_OUT

    second = await wg.go(asyncio.sleep, 0.05, "ok")

    assert await second == "ok"
    await wg.aclose()
