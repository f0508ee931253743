"""Counter, epochs, per-outcome counts and stored results of one WaitGroup.

All mutations run on the group's event loop thread. A lock makes each mutation atomic
for ``snapshot()``, the one method that other threads may call.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from edge.waitgroup._op import Op
from edge.waitgroup._types import OpResult, Outcome, Stats, TimingStats


class Epoch:
    """One stretch of time during which the counter stays above 0.

    A waiter keeps the epoch it observed, so it returns when that epoch ends even if
    the counter rises again before the waiter resumes.
    """

    __slots__ = ("_event", "deadline", "deadline_timer", "ended", "errors", "number")

    def __init__(self, number: int) -> None:
        self.number = number
        self.ended = False
        self._event: asyncio.Event | None = None
        # (op index, error) of FAILED and TIMED_OUT ops, for raise_on_error.
        self.errors: list[tuple[int, BaseException]] = []
        self.deadline: float | None = None
        self.deadline_timer: asyncio.TimerHandle | None = None

    def event(self) -> asyncio.Event:
        """Event set when the epoch ends, created on first use."""
        if self._event is None:
            self._event = asyncio.Event()
            if self.ended:
                self._event.set()
        return self._event

    def end(self) -> None:
        """Release every waiter of this epoch."""
        self.ended = True
        if self._event is not None:
            self._event.set()
        if self.deadline_timer is not None:
            self.deadline_timer.cancel()
            self.deadline_timer = None


class _Timing:
    __slots__ = ("count", "max", "total")

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.max = 0.0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.total += seconds
        if seconds > self.max:
            self.max = seconds

    def freeze(self) -> TimingStats:
        return TimingStats(count=self.count, total=self.total, max=self.max)


class Ledger:
    """Accounting of one group: counter = manual + queued + running.

    Args:
        limit: Slot count reported in ``Stats.limit``.
        on_epoch_end: Called on the loop thread after the counter returns to 0.
    """

    def __init__(self, limit: int | None, on_epoch_end: Callable[[Epoch], None]) -> None:
        self._lock = threading.Lock()
        self._limit = limit
        self._on_epoch_end = on_epoch_end
        self.manual = 0
        self.queued = 0
        self.running = 0
        self.peak_running = 0
        self.submitted = 0
        self.abandoned_in_flight = 0
        self.abandoned_finished = 0
        self._outcomes = dict.fromkeys(Outcome, 0)
        self._queue_wait = _Timing()
        self._run_time = _Timing()
        self.epoch_number = 0
        self.epoch: Epoch | None = None
        # Ops in submission order until take_results() drains the final ones.
        self._ops: list[Op[Any]] = []
        # Abandoned ops whose work still occupies a slot. They are kept apart from
        # _ops so that take_results() cannot drop them before aclose() reports them.
        self._abandoned: dict[int, Op[Any]] = {}
        # (op index, error) of every FAILED and TIMED_OUT op, kept only when
        # keep_errors is set (a scoped group raising on exit).
        self.keep_errors = False
        # Whether each epoch keeps its errors for wait() to raise. Without it, an epoch
        # that never ends (ops submitted before the last one ends) would keep them all.
        self.keep_epoch_errors = False
        self.errors: list[tuple[int, BaseException]] = []
        self._idle_waiters: list[asyncio.Future[None]] = []

    @property
    def counter(self) -> int:
        """Manual part plus queued and running ops."""
        return self.manual + self.queued + self.running

    def _raise_counter(self) -> None:
        if self.epoch is None:
            self.epoch_number += 1
            self.epoch = Epoch(self.epoch_number)

    def _check_zero(self) -> None:
        epoch = self.epoch
        if epoch is not None and self.counter == 0:
            self.epoch = None
            epoch.end()
            self._on_epoch_end(epoch)

    def add_manual(self, delta: int) -> None:
        """Move the manual part by ``delta``.

        Raises:
            ValueError: The manual part would drop below 0; nothing changes.
        """
        if self.manual + delta < 0:
            message = "negative WaitGroup counter"
            raise ValueError(message)
        with self._lock:
            if delta > 0:
                self._raise_counter()
            self.manual += delta
        self._check_zero()

    def submit(self, op: Op[Any], *, queued: bool) -> None:
        """Count a new op, either waiting for a slot or already holding one."""
        with self._lock:
            self._raise_counter()
            assert self.epoch is not None
            op.epoch = self.epoch.number
            self.submitted += 1
            if queued:
                self.queued += 1
            else:
                self._enter_running(op)
            self._ops.append(op)

    def reject_unqueued(self, op: Op[Any]) -> None:
        """Count an op that ``try_go()`` rejected at once. The counter never rose for it."""
        with self._lock:
            op.epoch = self.epoch.number if self.epoch is not None else self.epoch_number
            self.submitted += 1
            self._outcomes[Outcome.REJECTED] += 1
            self._ops.append(op)

    def start(self, op: Op[Any]) -> None:
        """Move a queued op to running."""
        with self._lock:
            self.queued -= 1
            self._enter_running(op)

    def _enter_running(self, op: Op[Any]) -> None:
        self.running += 1
        if self.running > self.peak_running:
            self.peak_running = self.running
        assert op.started_at is not None
        self._queue_wait.add(op.started_at - op.submitted_at)

    def finish(self, op: Op[Any]) -> None:
        """Count the final outcome already stored on ``op`` and lower the counter."""
        assert op.outcome is not None
        with self._lock:
            if op.started_at is None:
                self.queued -= 1
                self._queue_wait.add(op.ended_at - op.submitted_at)
            else:
                self.running -= 1
                self._run_time.add(op.ended_at - op.started_at)
            if op.abandoned:
                self.abandoned_in_flight += 1
                self._abandoned[op.index] = op
            self._outcomes[op.outcome] += 1
            if op.error is not None and op.outcome is not Outcome.REJECTED:
                if self.epoch is not None and self.keep_epoch_errors:
                    self.epoch.errors.append((op.index, op.error))
                if self.keep_errors:
                    self.errors.append((op.index, op.error))
        if self._idle_waiters and self.queued + self.running == 0:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        self._check_zero()

    def finish_abandoned(self, op: Op[Any]) -> None:
        """Count an abandoned op whose work has stopped and whose slot is free again."""
        with self._lock:
            del self._abandoned[op.index]
            self.abandoned_in_flight -= 1
            self.abandoned_finished += 1

    def ops_idle(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        """Return a future resolved once no op is queued or running."""
        waiter: asyncio.Future[None] = loop.create_future()
        if self.queued + self.running == 0:
            waiter.set_result(None)
        else:
            self._idle_waiters.append(waiter)
        return waiter

    def active_ops(self) -> list[Op[Any]]:
        """Started ops whose outcome is not final, in submission order."""
        return [op for op in self._ops if op.started_at is not None and not op.final]

    def results(self) -> list[OpResult[Any]]:
        """Final results in submission order."""
        return [op.result() for op in self._ops if op.final]

    def take_results(self) -> list[OpResult[Any]]:
        """Return the final results in submission order and forget them."""
        taken = [op for op in self._ops if op.final]
        self._ops = [op for op in self._ops if not op.final]
        return [op.result() for op in taken]

    def abandoned_ops(self) -> list[Op[Any]]:
        """Ops that still hold a slot after their outcome became final."""
        return list(self._abandoned.values())

    def snapshot(self) -> Stats:
        """Return a consistent copy of the counters. Safe to call from any thread."""
        with self._lock:
            outcomes = self._outcomes
            return Stats(
                submitted=self.submitted,
                queued=self.queued,
                running=self.running,
                peak_running=self.peak_running,
                succeeded=outcomes[Outcome.SUCCEEDED],
                failed=outcomes[Outcome.FAILED],
                timed_out=outcomes[Outcome.TIMED_OUT],
                cancelled=outcomes[Outcome.CANCELLED],
                rejected=outcomes[Outcome.REJECTED],
                abandoned_in_flight=self.abandoned_in_flight,
                abandoned_finished=self.abandoned_finished,
                manual_pending=self.manual,
                counter=self.counter,
                limit=self._limit,
                epoch=self.epoch_number,
                queue_wait=self._queue_wait.freeze(),
                run_time=self._run_time.freeze(),
            )
