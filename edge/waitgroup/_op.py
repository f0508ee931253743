"""Per-op record kept by the group, and the ``OpHandle`` that ``go()`` returns."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Generator
from typing import Any, Generic, TypeVar

from edge.waitgroup._types import Kind, OpResult, Outcome, Reason

T = TypeVar("T")


class Op(Generic[T]):
    """Mutable state of one op while the group runs it, frozen into an ``OpResult`` at the end.

    Only the event loop thread writes these fields, except ``deadline``, which the
    worker thread of a thread op sets once before it calls the function.
    """

    __slots__ = (
        "_result",
        "abandoned",
        "args",
        "cancel_reason",
        "cancel_requested",
        "clock",
        "deadline",
        "ended_at",
        "entered",
        "epoch",
        "error",
        "fn",
        "grace_timer",
        "index",
        "killed",
        "kind",
        "name",
        "on_cancel",
        "outcome",
        "reason",
        "slot_held",
        "started_at",
        "submitted_at",
        "submitter",
        "task",
        "timeout",
        "timer",
        "value",
        "waiters",
        "work",
    )

    def __init__(
        self,
        *,
        index: int,
        name: str,
        kind: Kind,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        timeout: float | None,
        on_cancel: Callable[[], object] | None,
        clock: Callable[[], float],
        submitted_at: float,
    ) -> None:
        self.index = index
        self.name = name
        self.kind: Kind = kind
        self.fn = fn
        self.args = args
        self.timeout = timeout
        self.on_cancel = on_cancel
        self.clock = clock

        # Fields of the final OpResult.
        self.submitted_at = submitted_at
        self.epoch = 0
        self.started_at: float | None = None
        self.ended_at = 0.0
        self.deadline: float | None = None
        self.outcome: Outcome | None = None
        self.value: T | None = None
        self.error: BaseException | None = None
        self.reason: Reason | None = None
        self.killed = False
        self.abandoned = False

        # Set once the group has requested the op to stop. cancel_reason contains
        # the reason, which is None when the op's handle was cancelled.
        self.cancel_requested = False
        self.cancel_reason: Reason | None = None
        # True from slot acquisition until the work has stopped (task ended, thread
        # returned, worker idle or reaped).
        self.slot_held = False
        # True once the op task has begun executing its body.
        self.entered = False

        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.grace_timer: asyncio.TimerHandle | None = None
        self.submitter: asyncio.Task[Any] | None = None
        self.waiters: list[asyncio.Future[None]] | None = None
        # Pool future of a thread op, done once the thread has returned.
        self.work: concurrent.futures.Future[T] | None = None
        self._result: OpResult[T] | None = None

    @property
    def final(self) -> bool:
        """True once the op has its terminal outcome."""
        return self.outcome is not None

    def result(self) -> OpResult[T]:
        """Build (once) and return the frozen result of a final op."""
        if self._result is None:
            if self.outcome is None:
                message = f"op {self.name!r} has no outcome yet"
                raise RuntimeError(message)
            started = self.started_at
            queue_end = started if started is not None else self.ended_at
            self._result = OpResult(
                index=self.index,
                name=self.name,
                kind=self.kind,
                outcome=self.outcome,
                epoch=self.epoch,
                value=self.value,
                error=self.error,
                reason=self.reason,
                submitted_at=self.submitted_at,
                started_at=started,
                ended_at=self.ended_at,
                queue_wait=queue_end - self.submitted_at,
                run_time=None if started is None else self.ended_at - started,
                killed=self.killed,
                abandoned=self.abandoned,
            )
        return self._result

    def drop_work(self) -> None:
        """Drop references to the function, its arguments and the task once the work ended.

        A long-lived group keeps each op until ``take_results()``, and arguments
        such as image crops should not stay in memory that long.
        """
        self.fn = _dropped
        self.args = ()
        self.on_cancel = None
        self.task = None
        self.work = None
        self.submitter = None

    def wake_waiters(self) -> None:
        """Resolve the futures of callers awaiting the op's handle."""
        waiters = self.waiters
        if waiters is None:
            return
        self.waiters = None
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def unwrap(self) -> T:
        """Return the op's value or raise its error, or ``CancelledError`` if it has none."""
        if self.outcome is Outcome.SUCCEEDED:
            return self.value  # type: ignore[return-value]
        if self.error is not None:
            raise self.error
        message = f"op {self.name!r} was {self.outcome.value if self.outcome else 'not run'}"
        raise asyncio.CancelledError(message)


def _dropped(*args: object) -> None:
    message = "the op has ended and its function was released"
    raise RuntimeError(message)


class OpHandle(Generic[T]):
    """Handle of a started op, returned by ``go()`` and ``try_go()``.

    Awaiting it returns the op's value or raises its error: the exception for FAILED,
    a ``TimeoutError`` for TIMED_OUT, ``asyncio.CancelledError`` for CANCELLED.
    Awaiting is optional because the group retrieves every error itself.
    """

    __slots__ = ("_cancel", "_op")

    def __init__(self, op: Op[T], cancel: Callable[[Op[Any], str | None], bool]) -> None:
        self._op = op
        self._cancel = cancel

    @property
    def name(self) -> str:
        """Op name."""
        return self._op.name

    @property
    def index(self) -> int:
        """Position of the op in submission order."""
        return self._op.index

    @property
    def result(self) -> OpResult[T] | None:
        """Final result, ``None`` while the outcome is pending."""
        return self._op.result() if self._op.final else None

    def done(self) -> bool:
        """Return True once the outcome is final."""
        return self._op.final

    def cancel(self, msg: str | None = None) -> bool:
        """Cancel the op (outcome CANCELLED). Return False if its outcome was already final.

        Must run on the group's event loop thread. A thread op keeps its slot until
        the thread returns, and a process op's worker is killed.
        """
        return self._cancel(self._op, msg)

    def __await__(self) -> Generator[Any, None, T]:
        return self._wait().__await__()

    async def _wait(self) -> T:
        op = self._op
        if not op.final:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            if op.waiters is None:
                op.waiters = []
            op.waiters.append(waiter)
            await waiter
        return op.unwrap()

    def __repr__(self) -> str:
        state = self._op.outcome.name if self._op.outcome else "pending"
        return f"<OpHandle {self._op.name!r} #{self._op.index} {state}>"
