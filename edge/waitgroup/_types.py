"""Value objects of the WaitGroup: op outcomes, per-op results, statistics, close report."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

T = TypeVar("T")

Kind = Literal["async", "thread", "process"]
"""Execution kind of an op: a task on the loop, a thread of the group's pool, or a
worker process."""

Reason = Literal["op", "deadline", "shutdown", "error-cancel"]
"""Reason the group ended an op early.

``"op"``: the op's own timeout. ``"deadline"``: the group deadline. ``"shutdown"``:
``cancel()``, ``aclose()`` or cancellation of the task that owns the group.
``"error-cancel"``: another op or the ``async with`` body failed and the group cancels
the rest.
"""

KINDS: tuple[Kind, ...] = ("async", "thread", "process")


class Outcome(enum.Enum):
    """Terminal outcome of an op. Every submitted op reaches exactly one."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class OpResult(Generic[T]):
    """Final record of one op. Times are in seconds on the event loop clock.

    Attributes:
        index: Position in submission order within the group, from 0.
        name: Op name given to ``go()``, or the function's qualified name.
        kind: Where the op ran.
        outcome: Terminal outcome.
        epoch: Counter epoch in which the op was submitted.
        value: Return value of the function; ``None`` unless SUCCEEDED.
        error: The exception for FAILED, a ``TimeoutError`` (``DeadlineExceeded`` for
            the group deadline) for TIMED_OUT, ``DeadlineExceeded`` for ops REJECTED at
            the deadline; otherwise ``None``.
        reason: Why the group ended the op early, ``None`` if it did not.
        submitted_at: When ``go()`` or ``try_go()`` was called.
        started_at: When the op got its slot, ``None`` if it never started.
        ended_at: When the outcome became final.
        queue_wait: Seconds spent waiting for a slot.
        run_time: Seconds from start to final outcome, ``None`` if it never started.
        killed: The group killed the worker process that ran the op.
        abandoned: The outcome became final while the work was still in flight (a
            thread that cannot be stopped, or a task or worker that outlived
            ``cancel_grace``). Its slot stays held until the work stops.
    """

    index: int
    name: str
    kind: Kind
    outcome: Outcome
    epoch: int
    value: T | None
    error: BaseException | None
    reason: Reason | None
    submitted_at: float
    started_at: float | None
    ended_at: float
    queue_wait: float
    run_time: float | None
    killed: bool = False
    abandoned: bool = False

    def __post_init__(self) -> None:
        if self.outcome is Outcome.SUCCEEDED and self.error is not None:
            message = f"op {self.name!r} SUCCEEDED but has an error: {self.error!r}"
            raise ValueError(message)
        if self.outcome is Outcome.FAILED and self.error is None:
            message = f"op {self.name!r} FAILED without an error"
            raise ValueError(message)
        if (self.started_at is None) != (self.run_time is None):
            message = f"op {self.name!r}: started_at and run_time must both be set or unset"
            raise ValueError(message)


@dataclass(frozen=True, slots=True)
class TimingStats:
    """Count, total and maximum of a duration in seconds."""

    count: int = 0
    total: float = 0.0
    max: float = 0.0

    @property
    def mean(self) -> float:
        """Mean duration in seconds, 0.0 when nothing was measured."""
        return self.total / self.count if self.count else 0.0


@dataclass(frozen=True, slots=True)
class Stats:
    """Snapshot of a group's counters, taken by ``WaitGroup.stats()``.

    Op counts accumulate over the group's life, across epochs and ``take_results()``.
    Construction checks the accounting invariants and raises ``ValueError`` if one fails.

    Attributes:
        submitted: Ops passed to ``go()`` or ``try_go()`` (rejected ones included).
        queued: Ops waiting for a slot.
        running: Ops holding a slot whose outcome is not final yet.
        peak_running: Maximum of ``running`` so far.
        succeeded: Ops that returned a value.
        failed: Ops that raised.
        timed_out: Ops ended by their timeout or by the group deadline.
        cancelled: Ops cancelled, before or after starting.
        rejected: Ops refused a slot (``try_go()`` without a free slot, deadline, close).
        abandoned_in_flight: Ops with a final outcome whose work still occupies a slot.
        abandoned_finished: Abandoned ops whose work has since stopped.
        manual_pending: Counter part raised by ``add()`` and not yet lowered by ``done()``.
        counter: ``manual_pending + queued + running``; ``wait()`` returns at 0.
        limit: Slot count, ``None`` for unbounded or a shared limiter.
        epoch: Number of 0-to-positive transitions of the counter so far.
        queue_wait: Time spent queued by ops that left the queue.
        run_time: Time from start to final outcome of ops that started.
    """

    submitted: int = 0
    queued: int = 0
    running: int = 0
    peak_running: int = 0
    succeeded: int = 0
    failed: int = 0
    timed_out: int = 0
    cancelled: int = 0
    rejected: int = 0
    abandoned_in_flight: int = 0
    abandoned_finished: int = 0
    manual_pending: int = 0
    counter: int = 0
    limit: int | None = None
    epoch: int = 0
    queue_wait: TimingStats = field(default_factory=TimingStats)
    run_time: TimingStats = field(default_factory=TimingStats)

    @property
    def finished(self) -> int:
        """Ops with a final outcome."""
        return self.succeeded + self.failed + self.timed_out + self.cancelled + self.rejected

    def __post_init__(self) -> None:
        if self.submitted != self.queued + self.running + self.finished:
            message = (
                f"invalid WaitGroup stats: submitted {self.submitted} != queued {self.queued}"
                f" + running {self.running} + finished {self.finished}"
            )
            raise ValueError(message)
        if self.counter != self.manual_pending + self.queued + self.running:
            message = (
                f"invalid WaitGroup stats: counter {self.counter} != manual_pending"
                f" {self.manual_pending} + queued {self.queued} + running {self.running}"
            )
            raise ValueError(message)
        if self.limit is not None and (
            self.running + self.abandoned_in_flight > self.limit or self.peak_running > self.limit
        ):
            message = (
                f"invalid WaitGroup stats: running {self.running} + abandoned_in_flight"
                f" {self.abandoned_in_flight} or peak_running {self.peak_running}"
                f" exceeds limit {self.limit}"
            )
            raise ValueError(message)


@dataclass(frozen=True, slots=True)
class Report:
    """Result of ``WaitGroup.aclose()`` and of leaving ``async with``.

    Attributes:
        stats: Counters when the group closed.
        abandoned: Ops whose outcome is final but whose work still runs: threads that
            cannot be stopped, tasks that ignore cancellation, workers not yet reaped.
            The interpreter waits for such threads at exit unless the process exits hard.
    """

    stats: Stats
    abandoned: tuple[OpResult[object], ...] = ()

    @property
    def clean(self) -> bool:
        """True when no work outlives the group."""
        return not self.abandoned
