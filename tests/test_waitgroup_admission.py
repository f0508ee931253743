"""WaitGroup admission: the slot bound, FIFO queueing, try_go() and shared limiters."""

from __future__ import annotations

import asyncio

import pytest
from waitgroup_helpers import EARLY, SLACK, Concurrency, Gate, check_invariants, yield_turns

from edge.waitgroup import Limiter, Outcome, WaitGroup


async def test_limit_caps_concurrency_at_three() -> None:
    """limit=3 with ten 100 ms ops peaks at exactly 3 running and takes ~400 ms."""
    loop = asyncio.get_running_loop()
    probe = Concurrency()
    start = loop.time()

    async with WaitGroup(3) as wg:
        for index in range(10):
            await wg.go(probe.run, 0.1, str(index))

    wall = loop.time() - start
    assert probe.peak == 3
    assert wg.stats().peak_running == 3
    assert 0.4 - EARLY <= wall < 0.4 + SLACK
    assert probe.started == [str(index) for index in range(10)]
    check_invariants(wg.stats())


async def test_go_blocks_while_slots_full() -> None:
    """With both slots busy, go() waits for a slot and try_go() is rejected without calling fn."""
    wg = WaitGroup(2)
    gate = Gate()
    await wg.go(gate.wait, "a")
    await wg.go(gate.wait, "b")
    third = asyncio.create_task(wg.go(gate.wait, "c"))
    await yield_turns()
    assert not third.done()

    rejected_gate = Gate()
    assert wg.try_go(rejected_gate.wait) is None

    assert rejected_gate.calls == 0
    stats = wg.stats()
    assert stats.rejected == 1
    assert stats.queued == 1
    assert stats.running == 2
    check_invariants(stats)
    gate.open()
    handle = await asyncio.wait_for(third, 1)
    assert await handle == "c"
    await wg.wait()
    assert [result.outcome for result in wg.results] == [
        Outcome.SUCCEEDED,
        Outcome.SUCCEEDED,
        Outcome.SUCCEEDED,
        Outcome.REJECTED,
    ]


async def test_queue_admits_in_fifo_order() -> None:
    """Queued submitters A, B, C start in that order, and try_go() never overtakes them."""
    wg = WaitGroup(1)
    gates = {tag: Gate() for tag in ("blocker", "A", "B", "C")}
    started: list[str] = []

    async def op(tag: str) -> None:
        started.append(tag)
        await gates[tag].wait()

    await wg.go(op, "blocker")
    submitters = []
    for tag in ("A", "B", "C"):
        submitters.append(asyncio.create_task(wg.go(op, tag)))
        await yield_turns()
    gates["blocker"].open()
    await yield_turns()
    assert wg.try_go(op, "barger") is None

    for tag in ("A", "B", "C"):
        await yield_turns()
        assert started[-1] == tag
        gates[tag].open()
    await asyncio.gather(*submitters)
    await wg.wait()

    assert started == ["blocker", "A", "B", "C"]
    assert wg.stats().rejected == 1


async def test_queued_submitter_cancelled_never_starts() -> None:
    """A submitter cancelled while queued leaves a CANCELLED op whose fn never ran."""
    wg = WaitGroup(2)
    gate = Gate()
    await wg.go(gate.wait)
    await wg.go(gate.wait)
    never = Gate()
    submitter = asyncio.create_task(wg.go(never.wait, name="queued"))
    await yield_turns()
    assert wg.stats().queued == 1

    submitter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await submitter

    assert never.calls == 0
    assert wg.stats().counter == 2
    assert wg.stats().queued == 0
    gate.open()
    await wg.wait()
    cancelled = [result for result in wg.results if result.name == "queued"]
    assert len(cancelled) == 1
    assert cancelled[0].outcome is Outcome.CANCELLED
    assert cancelled[0].started_at is None
    probe = Concurrency()
    for index in range(2):
        await wg.go(probe.run, 0.05, str(index))
    await wg.wait()
    assert probe.peak == 2
    check_invariants(wg.stats())


async def test_slots_survive_failures_timeouts_and_cancels() -> None:
    """After 12 ops that fail, time out or are cancelled, 4 sleepers start at once."""
    loop = asyncio.get_running_loop()
    wg = WaitGroup(4, op_timeout=0.05)

    async def fail() -> None:
        await asyncio.sleep(0)
        raise ValueError("boom")

    handles = []
    for index in range(12):
        if index % 3 == 0:
            await wg.go(fail)
        elif index % 3 == 1:
            await wg.go(asyncio.sleep, 1.0)
        else:
            handles.append(await wg.go(asyncio.sleep, 1.0, timeout=None))
            handles[-1].cancel()
    await wg.wait()
    stats = wg.stats()
    assert (stats.failed, stats.timed_out, stats.cancelled) == (4, 4, 4)

    probe = Concurrency()
    start = loop.time()
    for index in range(4):
        await wg.go(probe.run, 0.05, str(index))
    await wg.wait()

    assert probe.peak == 4
    assert max(probe.start_times) - start < SLACK
    check_invariants(wg.stats())


@pytest.mark.parametrize("limit", [0, -1])
def test_limit_below_one_raises(limit: int) -> None:
    """limit 0 or negative raises ValueError."""
    with pytest.raises(ValueError, match="at least 1"):
        WaitGroup(limit)


async def test_unbounded_starts_all_in_one_tick() -> None:
    """limit=None starts 1000 sleepers within one loop iteration after submission."""
    probe = Concurrency()

    async with WaitGroup() as wg:
        for index in range(1000):
            await wg.go(probe.run, 0.01, str(index))
        assert probe.current == 0
        await asyncio.sleep(0)
        assert probe.current == 1000

    assert probe.peak == 1000
    assert wg.stats().peak_running == 1000


async def test_shared_limiter_bounds_two_groups() -> None:
    """Two groups sharing a Limiter of 3 never run more than 3 ops together."""
    limiter = Limiter(3)
    probe = Concurrency()

    async def feed(wg: WaitGroup, prefix: str) -> None:
        for index in range(6):
            await wg.go(probe.run, 0.03, f"{prefix}{index}")

    async with WaitGroup(limiter=limiter) as first, WaitGroup(limiter=limiter) as second:
        await asyncio.gather(feed(first, "a"), feed(second, "b"))

    assert probe.peak == 3
    assert len(probe.started) == 12
    assert limiter.borrowed == 0
    assert first.stats().peak_running + second.stats().peak_running >= 3


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"limit": 2, "limiter": Limiter(2)}, ValueError),
        ({"limit": 1.5}, TypeError),
        ({"op_timeout": 0}, ValueError),
        ({"op_timeout": -1.0}, ValueError),
        ({"deadline": 0}, ValueError),
        ({"cancel_grace": 0}, ValueError),
        ({"on_error": "ignore"}, ValueError),
        ({"limiter": object()}, TypeError),
        ({"thread_workers": 0}, ValueError),
        ({"start_method": "fork"}, ValueError),
    ],
    ids=lambda value: repr(value),
)
def test_constructor_rejects_invalid_options(kwargs: dict[str, object], error: type) -> None:
    """Invalid constructor options raise ValueError or TypeError."""
    with pytest.raises(error):
        WaitGroup(**kwargs)  # type: ignore[arg-type]


async def test_go_rejects_invalid_arguments() -> None:
    """go() rejects bad timeouts, kinds, coroutine functions for threads and on_cancel misuse."""
    wg = WaitGroup()

    with pytest.raises(ValueError, match="positive"):
        await wg.go(asyncio.sleep, 0, timeout=0)
    with pytest.raises(ValueError, match="kind"):
        await wg.go(asyncio.sleep, 0, kind="fiber")  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="coroutine function"):
        await wg.go(asyncio.sleep, 0, kind="thread")
    with pytest.raises(ValueError, match="thread ops only"):
        await wg.go(asyncio.sleep, 0, on_cancel=lambda: None)  # type: ignore[call-overload]

    assert wg.stats().submitted == 0
    assert wg.stats().counter == 0


async def test_limiter_hands_slot_to_oldest_waiter() -> None:
    """Limiter.release() gives the slot to the oldest waiter, never to acquire_nowait()."""
    limiter = Limiter(1)
    assert limiter.acquire_nowait()
    order: list[str] = []

    async def take(tag: str) -> None:
        await limiter.acquire()
        order.append(tag)

    first = asyncio.create_task(take("first"))
    second = asyncio.create_task(take("second"))
    await yield_turns()
    assert limiter.waiting == 2

    limiter.release()
    assert not limiter.acquire_nowait()
    await yield_turns()
    assert order == ["first"]
    limiter.release()
    await asyncio.gather(first, second)

    assert order == ["first", "second"]
    limiter.release()
    assert limiter.borrowed == 0
    with pytest.raises(ValueError, match="released more often"):
        limiter.release()


async def test_limiter_cancelled_waiter_passes_slot_on() -> None:
    """A waiter cancelled right after being granted a slot passes it to the next waiter."""
    limiter = Limiter(1)
    assert limiter.acquire_nowait()
    cancelled = asyncio.create_task(limiter.acquire())
    following = asyncio.create_task(limiter.acquire())
    await yield_turns()

    limiter.release()
    cancelled.cancel()
    await asyncio.wait_for(following, 1)

    assert cancelled.cancelled()
    assert limiter.borrowed == 1
    assert limiter.waiting == 0
