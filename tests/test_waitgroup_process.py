"""WaitGroup process ops: worker reuse, kill at timeout, crashed workers and pickling."""

from __future__ import annotations

import asyncio
import signal

import pytest
from waitgroup_helpers import (
    EARLY,
    SLACK,
    abort_worker,
    check_invariants,
    fail_with,
    process_id,
    remaining_budget,
    spin,
    spin_ignoring_sigterm,
)

from edge.waitgroup import Outcome, WaitGroup, WorkerDied


async def test_process_ops_reuse_long_lived_workers() -> None:
    """Sequential process ops on one slot run in the same worker process."""
    async with WaitGroup(1) as wg:
        pids = [await (await wg.go(process_id, kind="process")) for _ in range(3)]

    assert len(set(pids)) == 1
    assert wg.stats().succeeded == 3
    assert wg.worker_pids() == []


async def test_process_timeout_kills_worker_and_respawns() -> None:
    """A process op over its timeout kills its worker, and the next op gets a new worker."""
    wg = WaitGroup(1, op_timeout=0.2)
    first_pid = await (await wg.go(process_id, kind="process"))
    loop = asyncio.get_running_loop()

    hung = await wg.go(spin, 5.0, kind="process", name="hung")
    await wg.wait()
    result = hung.result
    assert result is not None
    assert result.outcome is Outcome.TIMED_OUT
    assert result.killed
    assert isinstance(result.error, TimeoutError)
    assert result.run_time is not None
    assert 0.2 - EARLY <= result.run_time < 0.2 + SLACK
    assert wg.worker_pids() == []
    assert wg.stats().abandoned_in_flight == 0

    start = loop.time()
    later_pid = await (await wg.go(process_id, kind="process"))

    assert later_pid != first_pid
    assert wg.worker_pids() == [later_pid]
    assert loop.time() - start > 0
    check_invariants(wg.stats())
    await wg.aclose()
    assert wg.worker_pids() == []


async def test_worker_ignoring_sigterm_gets_sigkill() -> None:
    """A worker that ignores SIGTERM is killed with SIGKILL after kill_grace, then reaped."""
    wg = WaitGroup(1, op_timeout=0.2, kill_grace=0.1)
    await (await wg.go(process_id, kind="process"))

    stubborn = await wg.go(spin_ignoring_sigterm, 5.0, kind="process")
    await wg.wait()

    result = stubborn.result
    assert result is not None
    assert result.outcome is Outcome.TIMED_OUT
    assert result.killed
    assert result.run_time is not None
    assert 0.3 - EARLY <= result.run_time < 0.3 + SLACK
    assert wg.worker_pids() == []
    assert isinstance(await (await wg.go(process_id, kind="process")), int)
    await wg.aclose()


async def test_aborted_worker_fails_only_its_op() -> None:
    """A worker killed by SIGABRT fails its op with WorkerDied and leaves its sibling alone."""
    async with WaitGroup(2) as wg:
        sibling = await wg.go(spin, 0.3, kind="process", name="sibling")
        crashed = await wg.go(abort_worker, kind="process", name="crashed")
        with pytest.raises(WorkerDied) as excinfo:
            await crashed
        after = await wg.go(process_id, kind="process", name="after")

    assert excinfo.value.signal is signal.SIGABRT
    assert "SIGABRT" in str(excinfo.value)
    assert crashed.result is not None
    assert crashed.result.outcome is Outcome.FAILED
    assert not crashed.result.killed
    sibling_pid = await sibling
    assert sibling.result is not None
    assert sibling.result.outcome is Outcome.SUCCEEDED
    assert excinfo.value.pid != sibling_pid
    assert await after not in (excinfo.value.pid, None)


async def test_process_error_and_context_cross_boundary() -> None:
    """A worker's exception reaches the parent with its traceback, and current_op() works."""
    async with WaitGroup(1, op_timeout=2.0) as wg:
        failing = await wg.go(fail_with, "bad crop", kind="process")
        budget = await wg.go(remaining_budget, kind="process", name="budget")
        unpicklable = await wg.go(process_id, kind="process", name="lambda-arg")
        local = await wg.go(lambda: 1, kind="process", name="lambda")

    with pytest.raises(ValueError, match="bad crop") as excinfo:
        await failing
    assert any("Traceback in worker process" in note for note in excinfo.value.__notes__)
    name, remaining = await budget
    assert name == "budget"
    assert remaining is not None
    assert 0 < remaining <= 2.0
    assert isinstance(await unpicklable, int)
    assert local.result is not None
    assert local.result.outcome is Outcome.FAILED
    assert wg.stats().failed == 2


async def test_forkserver_workers_run_ops() -> None:
    """The forkserver start method runs process ops and kills at timeouts as spawn does."""
    async with WaitGroup(1, op_timeout=0.2, start_method="forkserver") as wg:
        pid = await wg.go(process_id, kind="process")
        hung = await wg.go(spin, 5.0, kind="process")

    assert isinstance(await pid, int)
    assert hung.result is not None
    assert hung.result.outcome is Outcome.TIMED_OUT
    assert hung.result.killed


async def test_cancelled_process_op_kills_worker() -> None:
    """cancel() kills the worker of a running process op, whose outcome is CANCELLED."""
    async with WaitGroup(1) as wg:
        await (await wg.go(process_id, kind="process"))
        handle = await wg.go(spin, 5.0, kind="process")
        await asyncio.sleep(0.1)
        wg.cancel()

    assert handle.result is not None
    assert handle.result.outcome is Outcome.CANCELLED
    assert handle.result.killed
