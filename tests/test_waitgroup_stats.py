"""WaitGroup observability: stats snapshots, their invariants, timings and thread ops."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref

import pytest
from waitgroup_helpers import EARLY, Gate, check_invariants, spin, yield_turns

from edge.waitgroup import OpResult, Stats, WaitGroup


def test_stats_rejects_inconsistent_counts() -> None:
    """Stats raises ValueError when its counts break the accounting invariants."""
    with pytest.raises(ValueError, match="submitted"):
        Stats(submitted=1)
    with pytest.raises(ValueError, match="counter"):
        Stats(counter=1)
    with pytest.raises(ValueError, match="limit"):
        Stats(submitted=3, running=3, counter=3, peak_running=3, limit=2)


async def test_stats_invariants_hold_under_mixed_load() -> None:
    """Snapshots taken at every outcome and from another thread all satisfy the invariants."""
    snapshots: list[Stats] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def sample_from_thread() -> None:
        while not done.is_set():
            try:
                snapshots.append(wg.stats())
            except BaseException as exc:  # reported by the assert below
                errors.append(exc)
                return
            time.sleep(0.001)

    def on_end(result: OpResult[object]) -> None:
        check_invariants(wg.stats())

    async def fail() -> None:
        await asyncio.sleep(0.005)
        raise ValueError("unreadable")

    wg = WaitGroup(4, op_timeout=0.05, on_op_end=on_end, cancel_grace=0.2)
    sampler = threading.Thread(target=sample_from_thread)
    sampler.start()
    try:
        wg.add(2)
        for index in range(40):
            choice = index % 5
            if choice == 0:
                await wg.go(fail)
            elif choice == 1:
                await wg.go(asyncio.sleep, 1.0)
            elif choice == 2:
                await wg.go(spin, 0.01, kind="thread")
            elif choice == 3:
                wg.try_go(asyncio.sleep, 0.01)
            else:
                handle = await wg.go(asyncio.sleep, 1.0, timeout=None)
                handle.cancel()
            check_invariants(wg.stats())
        wg.done()
        wg.done()
        await wg.wait()
    finally:
        done.set()
        await asyncio.to_thread(sampler.join)

    assert errors == []
    assert len(snapshots) > 0
    for snapshot in snapshots:
        check_invariants(snapshot)
    final = wg.stats()
    assert final.submitted == 40
    assert final.counter == 0
    # Cancellations are deterministic. On a loaded machine a short op can still
    # exceed the 50 ms timeout, so the other outcomes are checked as a total.
    assert final.cancelled == 8
    assert final.timed_out >= 8
    assert final.succeeded + final.failed + final.timed_out + final.rejected == 32
    assert final.peak_running == 4
    await wg.aclose()


async def test_stats_record_queue_and_run_times() -> None:
    """queue_wait and run_time count every op and track total and maximum durations."""
    async with WaitGroup(1) as wg:
        await wg.go(asyncio.sleep, 0.05)
        await wg.go(asyncio.sleep, 0.05)

    stats = wg.stats()
    assert stats.run_time.count == 2
    assert stats.run_time.max >= 0.05 - EARLY
    assert stats.run_time.total >= 0.1 - 2 * EARLY
    assert stats.queue_wait.count == 2
    assert stats.queue_wait.max >= 0.05 - EARLY
    assert stats.queue_wait.mean == pytest.approx(stats.queue_wait.total / 2)
    second = wg.results[1]
    assert second.started_at is not None
    assert second.queue_wait == pytest.approx(second.started_at - second.submitted_at)


async def test_thread_ops_run_on_group_pool() -> None:
    """Thread ops run on the group's own named pool, never the loop's default executor."""
    names: list[str] = []

    def record_thread() -> None:
        names.append(threading.current_thread().name)

    async with WaitGroup(2, name="zbar") as wg:
        for _ in range(3):
            await wg.go(record_thread, kind="thread")

    assert len(names) == 3
    assert all(name.startswith("edge.waitgroup.zbar") for name in names)


async def test_thread_op_cancelled_before_start_never_runs() -> None:
    """A thread op cancelled before its thread starts never calls fn and frees its slot."""
    calls: list[int] = []
    gate = Gate()

    async with WaitGroup(2, thread_workers=1) as wg:
        await wg.go(gate.wait)
        handle = await wg.go(calls.append, 1, kind="thread")
        handle.cancel()
        await yield_turns()
        gate.open()

    assert calls == []
    assert handle.result is not None
    assert not handle.result.abandoned
    assert wg.stats().abandoned_in_flight == 0


async def test_finished_op_releases_arguments() -> None:
    """A finished op drops its arguments, so a kept result does not pin large inputs."""

    class Crop:
        pass

    async def read(crop: Crop) -> str:
        await asyncio.sleep(0)
        return "text"

    wg = WaitGroup()
    crop = Crop()
    crop_ref = weakref.ref(crop)
    await wg.go(read, crop)
    await wg.go(lambda item: None, crop, kind="thread")
    del crop
    await wg.wait()
    await yield_turns()
    gc.collect()

    assert crop_ref() is None
    assert [result.value for result in wg.results] == ["text", None]
    await wg.aclose()
