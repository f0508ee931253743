"""Execution of started ops: one task per op, timers, cancellation and final outcomes.

Every started op runs in its own task, whatever its kind. For a thread op the task
awaits the pool thread, and for a process op it awaits the worker's reply. So a
cancellation request always takes the same path: cancel the task, then wait up to the
grace period for the work to stop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import logging
from collections.abc import Callable
from typing import Any

from edge.waitgroup._context import _current_source
from edge.waitgroup._errors import DeadlineExceeded
from edge.waitgroup._ledger import Ledger
from edge.waitgroup._op import Op
from edge.waitgroup._process import StartMethod, WorkerPool
from edge.waitgroup._timers import Timeouts
from edge.waitgroup._types import OpResult, Outcome, Reason

logger = logging.getLogger(__name__)

_CANCEL_OUTCOMES: dict[Reason | None, Outcome] = {
    "op": Outcome.TIMED_OUT,
    "deadline": Outcome.TIMED_OUT,
    "shutdown": Outcome.CANCELLED,
    "error-cancel": Outcome.CANCELLED,
    None: Outcome.CANCELLED,
}


class Runner:
    """Starts ops, enforces their timeouts and records their outcomes for one group."""

    def __init__(
        self,
        *,
        loop: asyncio.AbstractEventLoop,
        ledger: Ledger,
        group_name: str,
        release_slot: Callable[[], None],
        group_deadline: Callable[[], float | None],
        on_failure: Callable[[Op[Any]], None],
        on_op_end: Callable[[OpResult[Any]], object] | None,
        cancel_grace: float,
        thread_workers: int | None,
        process_workers: int,
        start_method: StartMethod,
        kill_grace: float,
    ) -> None:
        self._loop = loop
        self._ledger = ledger
        self._group_name = group_name
        self._release_slot = release_slot
        self._group_deadline = group_deadline
        self._on_failure = on_failure
        self._on_op_end = on_op_end
        self._cancel_grace = cancel_grace
        self._thread_workers = thread_workers
        self._process_workers = process_workers
        self._start_method: StartMethod = start_method
        self._kill_grace = kill_grace
        self._thread_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._process_pool: WorkerPool | None = None
        self._timeouts = Timeouts(loop, self._on_timeout)

    @property
    def process_pool(self) -> WorkerPool | None:
        """Worker processes, ``None`` until the first process op."""
        return self._process_pool

    def start(self, op: Op[Any]) -> None:
        """Create the task of an op that has acquired its slot."""
        op.slot_held = True
        op.task = self._loop.create_task(
            self._run(op), name=f"edge.waitgroup.{self._group_name}[{op.index}]"
        )

    # --- timers -------------------------------------------------------------

    def _set_deadline(self, op: Op[Any], start: float) -> float | None:
        """Set ``op.deadline`` to the earlier of its own and the group deadline.

        Returns the op's own deadline, ``None`` without a timeout.
        """
        group_deadline = self._group_deadline()
        if op.timeout is None:
            op.deadline = group_deadline
            return None
        own = start + op.timeout
        op.deadline = own if group_deadline is None else min(own, group_deadline)
        return own

    def arm(self, op: Op[Any], start: float) -> None:
        """Start the op's clock: set its deadline and schedule its timeout."""
        own = self._set_deadline(op, start)
        timeout = op.timeout
        if own is not None and timeout is not None and not op.cancel_requested and not op.final:
            self._timeouts.add(op, own, timeout)

    def _on_timeout(self, op: Op[Any]) -> None:
        op.timer = None
        self.request_cancel(op, "op")

    def request_cancel(
        self, op: Op[Any], reason: Reason | None, grace: float | None = None
    ) -> bool:
        """Cancel a started op. Return False if it is final or already being cancelled.

        The outcome becomes final when the work stops, or at the latest after
        ``grace`` seconds (default ``cancel_grace``). In the latter case the op is
        abandoned and keeps its slot until the work stops.
        """
        if op.final or op.cancel_requested:
            return False
        op.cancel_requested = True
        op.cancel_reason = reason
        if op.timer is not None:
            op.timer.cancel()
            op.timer = None
        if not op.entered:
            # The task has not run yet, so _run() finds the request and never calls fn.
            return True
        assert op.task is not None
        op.task.cancel(f"WaitGroup {self._group_name!r}: {reason or 'cancel'}")
        delay = self._cancel_grace if grace is None else grace
        op.grace_timer = self._loop.call_later(delay, self._abandon, op, delay)
        return True

    def _abandon(self, op: Op[Any], grace: float) -> None:
        op.grace_timer = None
        if op.final:
            return
        logger.warning(
            "op %r of WaitGroup %r still running %.3g s after cancellation: abandoned,"
            " its slot stays in use until it stops",
            op.name,
            self._group_name,
            grace,
        )
        self._settle_cancelled(op)

    # --- op task ------------------------------------------------------------

    async def _run(self, op: Op[Any]) -> None:
        op.entered = True
        if op.cancel_requested:
            self._release(op)
            self._settle_cancelled(op)
            return
        try:
            if op.kind == "async":
                _current_source.set(op)
                self.arm(op, self._loop.time())
                value = await op.fn(*op.args)
            elif op.kind == "thread":
                value = await self._run_thread(op)
            else:
                value = await self._run_process(op)
        except asyncio.CancelledError:
            self._work_stopped(op)
            self._settle_cancelled(op)
        except (KeyboardInterrupt, SystemExit) as exc:
            # Caught here so that it does not escape the event loop. The group
            # re-raises it from __aexit__ or wait().
            self._work_stopped(op)
            self._settle(op, Outcome.FAILED, error=exc)
        except Exception as exc:
            self._work_stopped(op)
            if op.cancel_requested:
                logger.debug("op %r raised %r after its cancellation", op.name, exc)
                self._settle_cancelled(op)
            else:
                self._settle(op, Outcome.FAILED, error=exc)
        else:
            self._work_stopped(op)
            if op.cancel_requested:
                # Once the group has requested cancellation, the outcome follows
                # that request even if the op still returned a value.
                self._settle_cancelled(op)
            else:
                self._settle(op, Outcome.SUCCEEDED, value=value)

    def _work_stopped(self, op: Op[Any]) -> None:
        # Called just before the outcome is settled, so that the slot and the
        # running count drop together. A thread op whose thread still runs keeps
        # its slot until _thread_exited().
        if op.kind != "thread" or op.work is None or op.work.done():
            self._release(op)

    def _release(self, op: Op[Any]) -> None:
        if not op.slot_held:
            return
        op.slot_held = False
        self._release_slot()
        if op.final:
            op.drop_work()
            if op.abandoned:
                self._ledger.finish_abandoned(op)
                logger.debug(
                    "abandoned op %r of WaitGroup %r stopped, slot released",
                    op.name,
                    self._group_name,
                )

    # --- outcomes -----------------------------------------------------------

    def _settle_cancelled(self, op: Op[Any]) -> None:
        reason = op.cancel_reason
        if not op.cancel_requested:
            # Cancelled from outside the group, for example by asyncio.run()
            # cancelling the tasks left over when its main coroutine returns.
            reason = "shutdown"
        error: BaseException | None = None
        if reason == "op":
            error = TimeoutError(f"op {op.name!r} timed out after {op.timeout:g} s")
        elif reason == "deadline":
            error = DeadlineExceeded(
                f"op {op.name!r} stopped at the deadline of WaitGroup {self._group_name!r}",
                group=self._group_name,
            )
        self._settle(op, _CANCEL_OUTCOMES[reason], error=error, reason=reason)

    def _settle(
        self,
        op: Op[Any],
        outcome: Outcome,
        *,
        value: Any = None,
        error: BaseException | None = None,
        reason: Reason | None = None,
    ) -> None:
        if op.final:
            if outcome is Outcome.FAILED:
                logger.debug("late error of abandoned op %r discarded: %r", op.name, error)
            return
        if op.grace_timer is not None:
            op.grace_timer.cancel()
            op.grace_timer = None
        if op.timer is not None:
            op.timer.cancel()
            op.timer = None
        self.finalize(op, outcome, value=value, error=error, reason=reason)

    def finalize(
        self,
        op: Op[Any],
        outcome: Outcome,
        *,
        value: Any = None,
        error: BaseException | None = None,
        reason: Reason | None = None,
    ) -> None:
        """Store the op's terminal outcome, update the counter and notify hooks and waiters."""
        op.outcome = outcome
        op.value = value
        op.error = error
        op.reason = reason
        op.ended_at = self._loop.time()
        op.abandoned = op.slot_held
        if not op.slot_held:
            op.drop_work()
        if outcome is Outcome.FAILED:
            # Before the counter drops, so that error-cancel acts within this epoch.
            self._on_failure(op)
        self._ledger.finish(op)
        if self._ledger.queued + self._ledger.running == 0:
            # No op can expire any more, so drop the deadlines of ops that ended early.
            self._timeouts.clear()
        op.wake_waiters()
        self.notify_op_end(op)

    def notify_op_end(self, op: Op[Any]) -> None:
        """Pass the op's result to the on_op_end hook, logging any exception it raises."""
        if self._on_op_end is None:
            return
        try:
            self._on_op_end(op.result())
        except Exception:
            logger.exception(
                "on_op_end hook of WaitGroup %r failed for op %r", self._group_name, op.name
            )

    # --- thread ops ---------------------------------------------------------

    def _threads(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._thread_pool is None:
            self._thread_pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=self._thread_workers,
                thread_name_prefix=f"edge.waitgroup.{self._group_name}",
            )
        return self._thread_pool

    async def _run_thread(self, op: Op[Any]) -> Any:
        _current_source.set(op)
        context = contextvars.copy_context()
        exited: asyncio.Future[Any] = self._loop.create_future()
        work = self._threads().submit(self._thread_main, op, context)
        op.work = work
        work.add_done_callback(functools.partial(self._thread_done, op, exited))
        try:
            return await asyncio.shield(exited)
        except asyncio.CancelledError:
            if work.cancel():
                raise  # The thread never started.
            if op.on_cancel is not None and op.cancel_requested:
                self._call_on_cancel(op)
                # Cooperative stop: wait for the thread, bounded by the grace timer.
                await asyncio.shield(exited)
            raise

    def _thread_main(self, op: Op[Any], context: contextvars.Context) -> Any:
        """Start the op's clock, then call the function (runs in the pool thread)."""
        start = op.clock()
        self._set_deadline(op, start)
        self._loop.call_soon_threadsafe(self._thread_started, op, start)
        return context.run(op.fn, *op.args)

    def _thread_started(self, op: Op[Any], start: float) -> None:
        if op.timeout is None or op.final or op.cancel_requested:
            return
        self._timeouts.add(op, start + op.timeout, op.timeout)

    def _thread_done(
        self, op: Op[Any], exited: asyncio.Future[Any], work: concurrent.futures.Future[Any]
    ) -> None:
        """Hand the end of the work over to the loop thread (runs in the pool thread)."""
        # A closed loop raises RuntimeError. Then no waiter is left to notify.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._thread_exited, op, exited, work)

    def _thread_exited(
        self, op: Op[Any], exited: asyncio.Future[Any], work: concurrent.futures.Future[Any]
    ) -> None:
        if op.final:
            # The outcome was settled while the thread ran, so free the abandoned slot.
            self._release(op)
        if exited.done():
            return
        if op.final or work.cancelled():
            # No caller reads this value, and a plain result avoids an unretrieved
            # exception.
            exited.set_result(None)
            return
        error = work.exception()
        if error is None:
            exited.set_result(work.result())
        else:
            exited.set_exception(error)

    def _call_on_cancel(self, op: Op[Any]) -> None:
        assert op.on_cancel is not None
        try:
            op.on_cancel()
        except Exception:
            logger.exception(
                "on_cancel callback of op %r in WaitGroup %r failed", op.name, self._group_name
            )

    # --- process ops --------------------------------------------------------

    async def _run_process(self, op: Op[Any]) -> Any:
        if self._process_pool is None:
            self._process_pool = WorkerPool(
                size=self._process_workers,
                start_method=self._start_method,
                kill_grace=self._kill_grace,
                name=f"edge.waitgroup.{self._group_name}",
            )
        return await self._process_pool.run(op, self.arm)

    # --- shutdown -----------------------------------------------------------

    async def aclose(self) -> None:
        """Shut down the thread pool without waiting and stop the worker processes."""
        if self._thread_pool is not None:
            self._thread_pool.shutdown(wait=False, cancel_futures=True)
        if self._process_pool is not None:
            await self._process_pool.aclose()
