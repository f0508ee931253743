"""State shared by every WaitGroup method: loop binding, counter, admission, shutdown.

``WaitGroup`` (in ``_group``) adds the submission API, the ``async with`` scope and
``aclose()`` on top of this class.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
from collections.abc import Callable
from types import EllipsisType
from typing import Any

from edge.waitgroup._errors import DeadlineExceeded
from edge.waitgroup._ledger import Epoch, Ledger
from edge.waitgroup._limiter import Limiter, SlotLimiter
from edge.waitgroup._op import Op
from edge.waitgroup._options import Options, check_optional_seconds
from edge.waitgroup._runner import Runner
from edge.waitgroup._types import KINDS, Kind, OpResult, Outcome, Reason, Stats

logger = logging.getLogger(__name__)

# Admission states, from open to closed. A state never moves back to a lower one.
# The exception is an unscoped group, which reopens after "deadline" or
# "error-cancel" once its counter returns to 0.
ADMISSION_ORDER: dict[str | None, int] = {
    None: 0,
    "deadline": 1,
    "error-cancel": 2,
    "shutdown": 3,
    "closed": 4,
}

_group_numbers = itertools.count(1)


def default_name() -> str:
    """Return the next ``waitgroup-N`` name."""
    return f"waitgroup-{next(_group_numbers)}"


class GroupCore:
    """Counter, admission state and cancellation of one WaitGroup."""

    def __init__(self, options: Options) -> None:
        self._options = options
        self._name = options.name
        self._limit = options.limit
        self._limiter: SlotLimiter | None = (
            Limiter(options.limit) if options.limit is not None else options.limiter
        )
        self._op_timeout = options.op_timeout
        self._deadline = options.deadline
        self._on_error = options.on_error
        self._raise_on_error = options.raise_on_error
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: Runner | None = None
        self._ledger = Ledger(options.limit, self._on_epoch_end)
        self._ledger.keep_epoch_errors = options.raise_on_error or options.on_error == "cancel"
        self._next_index = 0
        self._queued: dict[int, Op[Any]] = {}
        self._admission: str | None = None
        self._base_error: BaseException | None = None
        # Scope state, used by the async with form only.
        self._scoped = False
        self._body_running = False
        self._parent: asyncio.Task[Any] | None = None
        self._parent_cancelling = 0
        self._parent_cancel_requested = False
        self._parent_rejected = False
        self._scope_deadline: float | None = None
        self._scope_deadline_timer: asyncio.TimerHandle | None = None

    # --- properties and snapshots -----------------------------------------

    @property
    def name(self) -> str:
        """Group name."""
        return self._name

    @property
    def limit(self) -> int | None:
        """Slot count, ``None`` when unbounded or using a shared limiter."""
        return self._limit

    def stats(self) -> Stats:
        """Return a snapshot of the counters. Callable from any thread."""
        return self._ledger.snapshot()

    @property
    def results(self) -> list[OpResult[Any]]:
        """Results of final ops in submission order (since the last ``take_results()``)."""
        self._check_reader()
        return self._ledger.results()

    def take_results(self) -> list[OpResult[Any]]:
        """Return the results of final ops in submission order and drop them from the group.

        Call it once per epoch in a long-lived unscoped group, because the group
        otherwise keeps every result.
        """
        self._check_reader()
        return self._ledger.take_results()

    def worker_pids(self) -> list[int]:
        """Process ids of live worker processes (empty before the first process op)."""
        self._check_reader()
        pool = self._runner.process_pool if self._runner is not None else None
        return pool.pids if pool is not None else []

    def __repr__(self) -> str:
        stats = self.stats()
        return (
            f"<WaitGroup {self._name!r} counter={stats.counter} running={stats.running}"
            f" queued={stats.queued} limit={self._limit}>"
        )

    # --- loop binding -------------------------------------------------------

    def _check_loop(self) -> asyncio.AbstractEventLoop:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            message = (
                f"WaitGroup {self._name!r} used outside its event loop thread;"
                " call done_threadsafe() or cancel_threadsafe() from other threads"
            )
            raise RuntimeError(message) from None
        if loop is self._loop:
            return loop
        if self._loop is None:
            self._bind(loop)
            return loop
        message = (
            f"WaitGroup {self._name!r} is bound to event loop {self._loop!r}"
            f" and cannot be used from event loop {loop!r}"
        )
        raise RuntimeError(message)

    def _check_reader(self) -> None:
        """Allow reads from the loop thread, or from anywhere once the loop has stopped."""
        if self._loop is not None and self._loop.is_running():
            self._check_loop()

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._runner = Runner(
            loop=loop,
            ledger=self._ledger,
            group_name=self._name,
            release_slot=self._release_slot,
            group_deadline=self._group_deadline,
            on_failure=self._on_failure,
            on_op_end=self._options.on_op_end,
            cancel_grace=self._options.cancel_grace,
            thread_workers=self._options.threads,
            process_workers=self._options.processes,
            start_method=self._options.start_method,
            kill_grace=self._options.kill_grace,
        )

    def _release_slot(self) -> None:
        if self._limiter is not None:
            self._limiter.release()

    # --- counter (Go vocabulary) ------------------------------------------

    def add(self, delta: int = 1) -> None:
        """Raise the counter by ``delta``, or lower it if ``delta`` is negative.

        ``add(0)`` does nothing.

        Raises:
            TypeError: ``delta`` is not an int.
            ValueError: The manual part of the counter would drop below 0.
            RuntimeError: Wrong thread or loop, or the group is closed.
        """
        self._check_loop()
        if not isinstance(delta, int) or isinstance(delta, bool):
            message = f"WaitGroup.add() needs an int, got {delta!r}"
            raise TypeError(message)
        if self._admission == "closed":
            raise RuntimeError(self._closed_message())
        if delta:
            self._ledger.add_manual(delta)

    def done(self) -> None:
        """Lower the counter by 1. Only the part raised by ``add()`` can be lowered this way.

        Raises:
            ValueError: The manual part is already 0 (``"negative WaitGroup counter"``).
            RuntimeError: Wrong thread or loop. Use ``done_threadsafe()`` from other threads.
        """
        self._check_loop()
        self._ledger.add_manual(-1)

    def done_threadsafe(self) -> None:
        """Schedule ``done()`` on the group's loop. Callable from any thread.

        A negative counter cannot be raised to the caller here, so it is logged
        as an error on the loop thread.

        Raises:
            RuntimeError: The group has not been used on a loop yet, or that loop is closed.
        """
        loop = self._loop
        if loop is None:
            message = f"WaitGroup {self._name!r} is not bound to an event loop yet"
            raise RuntimeError(message)
        loop.call_soon_threadsafe(self._done_from_thread)

    def _done_from_thread(self) -> None:
        try:
            self._ledger.add_manual(-1)
        except ValueError:
            logger.error("done_threadsafe() on WaitGroup %r: negative counter", self._name)

    async def wait(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - Go-style API
        """Wait until the counter returns to 0, or return at once if it is 0.

        The wait is bound to the current epoch: it returns when this epoch ends even
        if new work raises the counter again before the caller resumes.

        Raises:
            TimeoutError: ``timeout`` seconds passed first. Ops and counter are untouched.
            KeyboardInterrupt | SystemExit: An op raised it, and the group cancelled the rest.
            ExceptionGroup: ``raise_on_error`` is set and ops of this epoch failed or
                timed out.
        """
        self._check_loop()
        seconds = check_optional_seconds(timeout, "timeout")
        epoch = self._ledger.epoch
        errors: list[tuple[int, BaseException]] = []
        if epoch is not None:
            event = epoch.event()
            if seconds is None:
                await event.wait()
            else:
                async with asyncio.timeout(seconds):
                    await event.wait()
            errors = epoch.errors
        if self._base_error is not None:
            raise self._base_error
        raises = self._raise_on_error or (self._on_error == "cancel" and not self._scoped)
        if raises and errors:
            raise self._error_group(errors)

    def _error_group(self, errors: list[tuple[int, BaseException]]) -> BaseExceptionGroup[Any]:
        ordered = [error for _, error in sorted(errors, key=lambda item: item[0])]
        message = f"WaitGroup {self._name!r}: {len(ordered)} ops failed or timed out"
        return BaseExceptionGroup(message, ordered)

    def _new_op(
        self,
        loop: asyncio.AbstractEventLoop,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        timeout: float | EllipsisType | None,
        name: str | None,
        kind: Kind,
        on_cancel: Callable[[], object] | None,
        *,
        trying: bool,
    ) -> Op[Any]:
        if not callable(fn):
            message = f"fn must be callable, got {fn!r}"
            raise TypeError(message)
        if kind != "async":
            if kind not in KINDS:
                message = f"kind must be one of {KINDS}, got {kind!r}"
                raise ValueError(message)
            if inspect.iscoroutinefunction(fn):
                message = f"{kind} ops need a plain function, {fn!r} is a coroutine function"
                raise TypeError(message)
        if on_cancel is not None and kind != "thread":
            message = f"on_cancel applies to thread ops only, not to {kind} ops"
            raise ValueError(message)
        seconds = self._op_timeout if timeout is ... else check_optional_seconds(timeout, "timeout")
        admitted = self._check_admission(trying=trying)
        op: Op[Any] = Op(
            index=self._next_index,
            name=name if name is not None else getattr(fn, "__qualname__", None) or repr(fn),
            kind=kind,
            fn=fn,
            args=args,
            timeout=seconds,
            on_cancel=on_cancel,
            clock=loop.time,
            submitted_at=loop.time(),
        )
        self._next_index += 1
        if not admitted:
            op.outcome = Outcome.REJECTED
            op.reason = "deadline"
            op.error = self._deadline_error()
            op.ended_at = op.submitted_at
        return op

    def _check_admission(self, *, trying: bool) -> bool:
        state = self._admission
        if state is None:
            return True
        if state == "deadline":
            if trying:
                return False
            raise self._deadline_error()
        raise RuntimeError(self._closed_message())

    def _closed_message(self) -> str:
        if self._admission == "error-cancel":
            return f"WaitGroup {self._name!r} is cancelling its ops after a failure"
        if self._admission == "shutdown":
            return f"WaitGroup {self._name!r} was cancelled and accepts no new ops"
        return f"WaitGroup {self._name!r} is closed and accepts no new ops"

    def _deadline_error(self) -> DeadlineExceeded:
        message = f"deadline of WaitGroup {self._name!r} passed ({self._deadline:g} s)"
        return DeadlineExceeded(message, group=self._name)

    def _reject_now(self, loop: asyncio.AbstractEventLoop, op: Op[Any]) -> None:
        """Record an op that ``try_go()`` rejected. Its ``fn`` is never called."""
        if not op.final:
            op.outcome = Outcome.REJECTED
            op.ended_at = loop.time()
        self._ledger.reject_unqueued(op)
        assert self._runner is not None
        self._runner.notify_op_end(op)

    def _start_now(self, loop: asyncio.AbstractEventLoop, op: Op[Any]) -> None:
        op.started_at = op.submitted_at
        self._ledger.submit(op, queued=False)
        self._arm_epoch_deadline(loop)
        assert self._runner is not None
        self._runner.start(op)

    async def _queue(
        self, loop: asyncio.AbstractEventLoop, op: Op[Any], limiter: SlotLimiter
    ) -> None:
        self._ledger.submit(op, queued=True)
        self._arm_epoch_deadline(loop)
        task = asyncio.current_task()
        assert task is not None
        op.submitter = task
        cancelling = task.cancelling()
        self._queued[op.index] = op
        try:
            await limiter.acquire()
        except asyncio.CancelledError:
            self._queued.pop(op.index, None)
            if not op.final:
                # The caller was cancelled while queued: the op never starts.
                assert self._runner is not None
                self._runner.finalize(op, Outcome.CANCELLED)
                raise
            # The group rejected the op and cancelled this task to wake it.
            if task.uncancel() > cancelling:
                raise
            if op.reason == "deadline":
                raise self._deadline_error() from None
            raise asyncio.CancelledError(self._closed_message()) from None
        del self._queued[op.index]
        op.started_at = loop.time()
        self._ledger.start(op)
        assert self._runner is not None
        self._runner.start(op)

    def _cancel_op(self, op: Op[Any], msg: str | None) -> bool:
        self._check_loop()
        assert self._runner is not None
        return self._runner.request_cancel(op, None)

    # --- deadline and cancellation ----------------------------------------

    def _group_deadline(self) -> float | None:
        if self._scoped:
            return self._scope_deadline
        epoch = self._ledger.epoch
        return epoch.deadline if epoch is not None else None

    def _arm_epoch_deadline(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._deadline is None or self._scoped:
            return
        epoch = self._ledger.epoch
        if epoch is not None and epoch.deadline is None:
            epoch.deadline = loop.time() + self._deadline
            epoch.deadline_timer = loop.call_at(epoch.deadline, self._on_deadline, epoch)

    def _on_deadline(self, epoch: Epoch | None) -> None:
        if epoch is not None:
            epoch.deadline_timer = None
            if epoch.ended:
                return
        else:
            self._scope_deadline_timer = None
        logger.debug("deadline of WaitGroup %r passed", self._name)
        self._shutdown("deadline")

    def _on_epoch_end(self, epoch: Epoch) -> None:
        if not self._scoped and self._admission in ("deadline", "error-cancel"):
            self._admission = None

    def _on_failure(self, op: Op[Any]) -> None:
        error = op.error
        if not isinstance(error, Exception):
            if self._base_error is None:
                self._base_error = error
            self._shutdown("error-cancel")
            self._cancel_parent()
        elif self._on_error == "cancel" and self._admission in (None, "deadline"):
            self._shutdown("error-cancel")
            self._cancel_parent()

    def _shutdown(self, reason: Reason, grace: float | None = None) -> None:
        """Close admission for ``reason``, reject queued ops and cancel running ones."""
        if ADMISSION_ORDER[reason] > ADMISSION_ORDER[self._admission]:
            self._admission = reason
        runner = self._runner
        if runner is None:
            return
        for op in list(self._queued.values()):
            submitter = op.submitter
            assert submitter is not None
            error = self._deadline_error() if reason == "deadline" else None
            runner.finalize(op, Outcome.REJECTED, error=error, reason=reason)
            if reason != "deadline" and submitter is self._parent and self._body_running:
                self._parent_rejected = True
            submitter.cancel(f"WaitGroup {self._name!r} rejected queued op {op.name!r}")
        self._queued.clear()
        for op in self._ledger.active_ops():
            runner.request_cancel(op, reason, grace)

    def _cancel_parent(self) -> None:
        if not self._body_running or self._parent_cancel_requested or self._parent_rejected:
            return
        assert self._parent is not None
        self._parent_cancel_requested = True
        self._parent.cancel(f"WaitGroup {self._name!r} cancels its body after a failure")
