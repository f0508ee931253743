"""WaitGroup errors: collect and cancel modes, base exceptions, body errors and hooks."""

from __future__ import annotations

import asyncio
import gc
import logging
import weakref

import pytest
from waitgroup_helpers import Gate, check_invariants, yield_turns

from edge.waitgroup import OpResult, Outcome, WaitGroup


async def fail_if(index: int, failing: set[int]) -> int:
    """Return ``index`` after one loop turn, or raise ValueError if it is in ``failing``."""
    await asyncio.sleep(0.01)
    if index in failing:
        raise ValueError(f"region {index} unreadable")
    return index


async def test_collect_records_failures_without_raising(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Collect mode: 3 of 10 ops fail, 7 succeed, nothing is raised or logged as unretrieved."""
    failing = {2, 5, 7}

    async with WaitGroup(4) as wg:
        handles = [await wg.go(fail_if, index, failing) for index in range(10)]

    outcomes = [result.outcome for result in wg.results]
    assert outcomes.count(Outcome.SUCCEEDED) == 7
    assert outcomes.count(Outcome.FAILED) == 3
    failed = [result for result in wg.results if result.outcome is Outcome.FAILED]
    assert [result.index for result in failed] == [2, 5, 7]
    assert all(isinstance(result.error, ValueError) for result in failed)
    assert str(failed[0].error) == "region 2 unreadable"
    with pytest.raises(ValueError, match="region 5"):
        await handles[5]
    del handles
    gc.collect()
    await yield_turns()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


async def test_raise_on_error_groups_errors_in_order() -> None:
    """Collect with raise_on_error runs all 10 ops, then raises the 3 errors in submission order."""
    failing = {7, 1, 4}
    wg = WaitGroup(3, raise_on_error=True)

    async def submit_all() -> None:
        async with wg:
            for index in range(10):
                await wg.go(fail_if, index, failing)

    with pytest.raises(ExceptionGroup) as excinfo:
        await submit_all()

    messages = [str(error) for error in excinfo.value.exceptions]
    assert messages == ["region 1 unreadable", "region 4 unreadable", "region 7 unreadable"]
    assert wg.stats().succeeded == 7
    assert wg.stats().failed == 3


async def test_raise_on_error_from_wait() -> None:
    """An unscoped group with raise_on_error raises the epoch's errors from wait()."""
    wg = WaitGroup(raise_on_error=True)
    await wg.go(fail_if, 0, {0})
    await wg.go(fail_if, 1, set())

    with pytest.raises(ExceptionGroup) as excinfo:
        await wg.wait()

    assert len(excinfo.value.exceptions) == 1
    await wg.aclose()


async def test_cancel_mode_stops_siblings_on_first_failure() -> None:
    """on_error=cancel: a failure at 50 ms cancels running ops, rejects queued, raises a group."""
    gate = Gate()
    queued_gate = Gate()

    async def fail_later() -> None:
        await asyncio.sleep(0.05)
        raise ValueError("op 2 failed")

    wg = WaitGroup(3, on_error="cancel")
    queued: list[asyncio.Task[object]] = []

    async def body() -> None:
        async with wg:
            await wg.go(gate.wait, name="sibling-0")
            await wg.go(gate.wait, name="sibling-1")
            await wg.go(fail_later, name="failing")
            for index in range(2):
                queued.append(asyncio.create_task(wg.go(queued_gate.wait, name=f"queued-{index}")))
            await asyncio.sleep(1.0)

    with pytest.raises(ExceptionGroup) as excinfo:
        await body()

    assert [type(error) for error in excinfo.value.exceptions] == [ValueError]
    assert str(excinfo.value.exceptions[0]) == "op 2 failed"
    by_name = {result.name: result for result in wg.results}
    assert by_name["sibling-0"].outcome is Outcome.CANCELLED
    assert by_name["sibling-0"].reason == "error-cancel"
    assert by_name["sibling-1"].outcome is Outcome.CANCELLED
    assert by_name["failing"].outcome is Outcome.FAILED
    assert by_name["queued-0"].outcome is Outcome.REJECTED
    assert by_name["queued-1"].outcome is Outcome.REJECTED
    assert queued_gate.calls == 0
    for task in queued:
        with pytest.raises(asyncio.CancelledError):
            await task
    check_invariants(wg.stats())


async def test_keyboard_interrupt_propagates_bare() -> None:
    """An op raising KeyboardInterrupt cancels the others, and the exit re-raises it bare."""
    gate = Gate()

    async def interrupt() -> None:
        await asyncio.sleep(0.01)
        raise KeyboardInterrupt

    wg = WaitGroup()

    async def body() -> None:
        async with wg:
            await wg.go(gate.wait, name="sibling")
            await wg.go(interrupt)
            await asyncio.sleep(1.0)

    with pytest.raises(KeyboardInterrupt):
        await body()

    sibling = wg.results[0]
    assert sibling.name == "sibling"
    assert sibling.outcome is Outcome.CANCELLED
    assert wg.stats().failed == 1


async def test_body_error_cancels_ops_and_propagates() -> None:
    """A body RuntimeError in collect mode cancels and joins ops, then propagates unchanged."""
    gate = Gate()
    error = RuntimeError("body failed")

    wg = WaitGroup()

    async def body() -> None:
        async with wg:
            await wg.go(gate.wait)
            await yield_turns()
            raise error

    with pytest.raises(RuntimeError) as excinfo:
        await body()

    assert excinfo.value is error
    assert len(wg.results) == 1
    assert wg.results[0].outcome is Outcome.CANCELLED
    assert wg.results[0].reason == "error-cancel"
    assert wg.stats().running == 0


async def test_on_op_end_hook_errors_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    """Exceptions from on_op_end are logged with the op name and never propagate."""
    seen: list[OpResult[object]] = []

    def hook(result: OpResult[object]) -> None:
        seen.append(result)
        raise RuntimeError("hook broke")

    async with WaitGroup(1, on_op_end=hook) as wg:
        await wg.go(asyncio.sleep, 0, name="first")
        await wg.go(asyncio.sleep, 0, name="second")
        assert wg.try_go(asyncio.sleep, 0, name="rejected") is None

    assert [result.name for result in seen] == ["first", "rejected", "second"]
    hook_errors = [
        record
        for record in caplog.records
        if record.levelno == logging.ERROR and "on_op_end" in record.getMessage()
    ]
    assert len(hook_errors) == 3
    assert "'rejected'" in hook_errors[1].getMessage()
    assert hook_errors[0].exc_info is not None
    assert wg.stats().succeeded == 2


async def test_handle_reraises_op_error() -> None:
    """Awaiting a handle returns the value or re-raises that op's exception."""
    async with WaitGroup() as wg:
        good = await wg.go(fail_if, 1, set())
        bad = await wg.go(fail_if, 2, {2})

    assert await good == 1
    with pytest.raises(ValueError, match="region 2"):
        await bad


class _Crop:
    """Stands for the data a failed op's traceback keeps alive."""


async def _fail_with(crop: _Crop) -> None:
    await asyncio.sleep(0)
    raise ValueError("unreadable crop")


async def test_open_epoch_frees_taken_errors() -> None:
    """An epoch that never ends keeps no failed op alive once its result is taken."""
    wg = WaitGroup(2)
    wg.add(1)  # holds the epoch open, as overlapping submissions do
    crop = _Crop()
    kept = weakref.ref(crop)
    handle = await wg.go(_fail_with, crop)
    with pytest.raises(ValueError, match="unreadable crop"):
        await handle
    results = wg.take_results()
    assert [result.outcome for result in results] == [Outcome.FAILED]
    del handle, results, crop
    gc.collect()
    assert kept() is None
    wg.done()
    await wg.aclose()
