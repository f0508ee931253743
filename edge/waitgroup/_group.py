"""The public WaitGroup: submission API, ``async with`` scope and ``aclose()``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from types import EllipsisType, TracebackType
from typing import Any, Literal, Self, TypeVar, TypeVarTuple, overload

from edge.waitgroup._core import ADMISSION_ORDER, GroupCore, default_name
from edge.waitgroup._limiter import SlotLimiter
from edge.waitgroup._op import OpHandle
from edge.waitgroup._options import OnError, Options, check_optional_seconds
from edge.waitgroup._process import StartMethod
from edge.waitgroup._types import Kind, OpResult, Report

logger = logging.getLogger(__name__)

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


class WaitGroup(GroupCore):
    """Bounded group of ops with Go's WaitGroup counter, timeouts and a group deadline.

    Args:
        limit: Maximum number of ops holding a slot at once; ``None`` for unbounded.
        limiter: A slot limiter shared with other groups (see ``Limiter``); excludes
            ``limit``.
        op_timeout: Default per-op timeout in seconds, counted from the op's start
            (queue time excluded); ``None`` for no timeout.
        deadline: Group deadline in seconds after ``__aenter__`` or, when unscoped,
            after the first submission of each epoch; ``None`` for no deadline.
        on_error: ``"collect"`` records failures and lets siblings run;
            ``"cancel"`` cancels everything at the first failure, as ``TaskGroup`` does.
        raise_on_error: In collect mode, raise an ``ExceptionGroup`` of FAILED and
            TIMED_OUT errors from ``wait()`` and on exit.
        cancel_grace: Seconds an op may take to stop after cancellation before it is
            abandoned; also bounds the join on an error or cancellation exit.
        thread_workers: Size of the group's thread pool; ``None`` means ``limit``,
            or the ``ThreadPoolExecutor`` default when unbounded.
        process_workers: Number of worker processes; ``None`` means ``limit``, or
            ``os.cpu_count()`` when unbounded.
        name: Name used in task names, logs and errors; ``None`` for ``waitgroup-N``.
        on_op_end: Called on the loop thread with each final ``OpResult``. The group
            logs the exceptions it raises and does not propagate them.
        start_method: ``"spawn"`` or ``"forkserver"`` for worker processes.
        kill_grace: Seconds between SIGTERM and SIGKILL when a worker is killed.

    Raises:
        ValueError: A limit, timeout or grace is 0 or negative, both ``limit`` and
            ``limiter`` are given, or an option has an unknown value.
        TypeError: An argument has the wrong type.
    """

    def __init__(
        self,
        limit: int | None = None,
        *,
        limiter: SlotLimiter | None = None,
        op_timeout: float | None = None,
        deadline: float | None = None,
        on_error: OnError = "collect",
        raise_on_error: bool = False,
        cancel_grace: float = 1.0,
        thread_workers: int | None = None,
        process_workers: int | None = None,
        name: str | None = None,
        on_op_end: Callable[[OpResult[Any]], object] | None = None,
        start_method: StartMethod = "spawn",
        kill_grace: float = 0.25,
    ) -> None:
        options = Options(
            name=name if name is not None else default_name(),
            limit=limit,
            limiter=limiter,
            op_timeout=op_timeout,
            deadline=deadline,
            on_error=on_error,
            raise_on_error=raise_on_error,
            cancel_grace=cancel_grace,
            thread_workers=thread_workers,
            process_workers=process_workers,
            on_op_end=on_op_end,
            start_method=start_method,
            kill_grace=kill_grace,
        )
        super().__init__(options)

    # --- submission -------------------------------------------------------

    @overload
    async def go(
        self,
        fn: Callable[[*Ts], Awaitable[T]],
        *args: *Ts,
        timeout: float | EllipsisType | None = ...,  # noqa: ASYNC109 - the op's timeout
        name: str | None = None,
        kind: Literal["async"] = "async",
        on_cancel: None = None,
    ) -> OpHandle[T]: ...

    @overload
    async def go(
        self,
        fn: Callable[[*Ts], T],
        *args: *Ts,
        timeout: float | EllipsisType | None = ...,  # noqa: ASYNC109 - the op's timeout
        name: str | None = None,
        kind: Literal["thread", "process"],
        on_cancel: Callable[[], object] | None = None,
    ) -> OpHandle[T]: ...

    async def go(
        self,
        fn: Callable[[*Ts], Any],
        *args: *Ts,
        timeout: float | EllipsisType | None = ...,  # noqa: ASYNC109 - the op's timeout
        name: str | None = None,
        kind: Kind = "async",
        on_cancel: Callable[[], object] | None = None,
    ) -> OpHandle[Any]:
        """Submit an op, waiting in FIFO order for a slot, and return its handle once started.

        The counter rises at submission; ``fn`` is called only once a slot is held.

        Args:
            fn: Coroutine function (``kind="async"``) or plain function.
            *args: Positional arguments for ``fn``; they must pickle for process ops.
            timeout: Seconds the op may run; ``...`` uses ``op_timeout``, ``None``
                means no timeout.
            name: Op name for results and logs; default: ``fn``'s qualified name.
            kind: ``"async"``, ``"thread"`` or ``"process"``.
            on_cancel: Thread ops only: called on the loop thread when the op is
                cancelled or times out, to tell the thread to stop. The outcome then
                waits up to ``cancel_grace`` for the thread to return.

        Raises:
            DeadlineExceeded: The group deadline passed before a slot was free.
            asyncio.CancelledError: The caller was cancelled while queued (the op is
                CANCELLED), or the group was cancelled meanwhile (the op is REJECTED).
            RuntimeError: Wrong thread or loop, or the group is cancelled or closed.
            TypeError | ValueError: Invalid ``fn``, ``kind``, ``timeout`` or ``on_cancel``.
        """
        loop = self._check_loop()
        op = self._new_op(loop, fn, args, timeout, name, kind, on_cancel, trying=False)
        limiter = self._limiter
        if limiter is None or limiter.acquire_nowait():
            self._start_now(loop, op)
        else:
            await self._queue(loop, op, limiter)
        return OpHandle(op, self._cancel_op)

    @overload
    def try_go(
        self,
        fn: Callable[[*Ts], Awaitable[T]],
        *args: *Ts,
        timeout: float | EllipsisType | None = ...,
        name: str | None = None,
        kind: Literal["async"] = "async",
        on_cancel: None = None,
    ) -> OpHandle[T] | None: ...

    @overload
    def try_go(
        self,
        fn: Callable[[*Ts], T],
        *args: *Ts,
        timeout: float | EllipsisType | None = ...,
        name: str | None = None,
        kind: Literal["thread", "process"],
        on_cancel: Callable[[], object] | None = None,
    ) -> OpHandle[T] | None: ...

    def try_go(
        self,
        fn: Callable[[*Ts], Any],
        *args: *Ts,
        timeout: float | EllipsisType | None = ...,
        name: str | None = None,
        kind: Kind = "async",
        on_cancel: Callable[[], object] | None = None,
    ) -> OpHandle[Any] | None:
        """Start an op if a slot is free and no ``go()`` is queued, else return None.

        A rejected op is counted as REJECTED and ``fn`` is not called. Arguments are
        those of ``go()``.

        Raises:
            RuntimeError: Wrong thread or loop, or the group is cancelled or closed.
            TypeError | ValueError: Invalid ``fn``, ``kind``, ``timeout`` or ``on_cancel``.
        """
        loop = self._check_loop()
        op = self._new_op(loop, fn, args, timeout, name, kind, on_cancel, trying=True)
        limiter = self._limiter
        if op.final or (limiter is not None and not limiter.acquire_nowait()):
            self._reject_now(loop, op)
            return None
        self._start_now(loop, op)
        return OpHandle(op, self._cancel_op)

    # --- cancellation -----------------------------------------------------

    def cancel(self, msg: str | None = None) -> None:
        """Cancel the group: close admission, reject queued ops, cancel running ones.

        Idempotent, and callable before, inside or after ``async with``; the exit then
        returns normally. The body itself is not cancelled, except that a ``go()``
        waiting for a slot raises ``CancelledError``, which the exit absorbs.

        Raises:
            RuntimeError: Wrong thread or loop; use ``cancel_threadsafe()`` from threads.
        """
        self._check_loop()
        if ADMISSION_ORDER[self._admission] >= ADMISSION_ORDER["shutdown"]:
            return
        logger.debug("WaitGroup %r cancelled: %s", self._name, msg or "no message")
        self._shutdown("shutdown")

    def cancel_threadsafe(self, msg: str | None = None) -> None:
        """Schedule ``cancel()`` on the group's loop. Callable from any thread.

        Raises:
            RuntimeError: The group's loop is closed.
        """
        loop = self._loop
        if loop is None:
            # Nothing has run yet, so closing admission is all there is to do.
            self._admission = "shutdown"
            return
        loop.call_soon_threadsafe(self.cancel, msg)

    # --- scope (asyncio vocabulary) ----------------------------------------

    async def __aenter__(self) -> Self:
        loop = self._check_loop()
        if self._scoped:
            message = f"WaitGroup {self._name!r} has already been entered; create a new group"
            raise RuntimeError(message)
        if self._admission == "closed" or self._ledger.submitted or self._ledger.counter:
            message = f"WaitGroup {self._name!r} was already used; enter a fresh group"
            raise RuntimeError(message)
        task = asyncio.current_task()
        assert task is not None
        self._scoped = True
        self._body_running = True
        self._parent = task
        self._parent_cancelling = task.cancelling()
        self._ledger.keep_errors = True
        if self._deadline is not None:
            self._scope_deadline = loop.time() + self._deadline
            self._scope_deadline_timer = loop.call_at(self._scope_deadline, self._on_deadline, None)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        self._check_loop()
        self._body_running = False
        parent = self._parent
        assert parent is not None
        if self._parent_cancel_requested:
            parent.uncancel()
        own_cancel = False
        external_cancel = False
        if isinstance(exc, asyncio.CancelledError):
            if parent.cancelling() > self._parent_cancelling:
                external_cancel = True
            elif self._parent_cancel_requested or self._parent_rejected:
                own_cancel = True
            else:
                # A CancelledError the group did not issue (for example from
                # awaiting a cancelled handle) is never swallowed.
                external_cancel = True
        if exc is not None and not own_cancel:
            self._shutdown("shutdown" if external_cancel else "error-cancel")
        is_base_error = not isinstance(exc, Exception | asyncio.CancelledError)
        if exc is not None and is_base_error and self._base_error is None:
            # KeyboardInterrupt or SystemExit from the body propagates bare.
            self._base_error = exc
        bounded = exc is not None or self._admission not in (None, "deadline")
        if await self._join(bounded=bounded):
            external_cancel = True
        await self._close()
        return self._exit_outcome(exc, own_cancel=own_cancel, external_cancel=external_cancel)

    def _exit_outcome(
        self, exc: BaseException | None, *, own_cancel: bool, external_cancel: bool
    ) -> bool:
        """Raise what the exit must raise, or return True to swallow the body's exception."""
        if self._base_error is not None:
            if self._base_error is exc:
                return False
            raise self._base_error
        if external_cancel:
            if isinstance(exc, asyncio.CancelledError):
                return False
            raise asyncio.CancelledError
        body_error = exc if isinstance(exc, Exception) else None
        errors = list(self._ledger.errors)
        if self._on_error == "cancel":
            if body_error is not None:
                errors.append((self._next_index, body_error))
            if errors:
                raise self._error_group(errors) from None
            return own_cancel
        if body_error is not None:
            return False
        if self._raise_on_error and errors:
            raise self._error_group(errors) from None
        return own_cancel

    async def _join(self, *, bounded: bool) -> bool:
        """Wait for the ops (and, unless bounded, the manual counter) to finish.

        Returns True if the calling task was cancelled meanwhile; the group then
        cancels its ops and keeps joining, bounded by ``cancel_grace``.
        """
        assert self._loop is not None
        cancelled = False
        while True:
            epoch = self._ledger.epoch
            if bounded and self._ledger.queued + self._ledger.running == 0:
                return cancelled
            if not bounded and epoch is None:
                return cancelled
            try:
                if bounded:
                    await self._ledger.ops_idle(self._loop)
                else:
                    assert epoch is not None
                    await epoch.event().wait()
            except asyncio.CancelledError:
                cancelled = True
                bounded = True
                self._shutdown("shutdown")

    async def aclose(self, grace: float | None = None) -> Report:
        """Close the group: cancel queued and running ops, stop workers, report leftovers.

        Waits up to ``grace`` seconds (default ``cancel_grace``) for cancelled ops to
        stop. Afterwards ``go()``, ``try_go()`` and ``add()`` raise RuntimeError.
        Idempotent; after ``async with`` it only returns the report.

        Returns:
            The final statistics and the ops still running as abandoned work.

        Raises:
            RuntimeError: Called inside the ``async with`` block, or wrong thread or loop.
        """
        self._check_loop()
        seconds = check_optional_seconds(grace, "grace")
        if self._body_running:
            message = f"aclose() called inside the async with block of WaitGroup {self._name!r}"
            raise RuntimeError(message)
        cancelled = False
        if self._admission != "closed":
            self._shutdown("shutdown", seconds)
            cancelled = await self._join(bounded=True)
            await self._close()
        if cancelled:
            raise asyncio.CancelledError
        if self._base_error is not None:
            logger.error("WaitGroup %r closed after an op raised %r", self._name, self._base_error)
        return self.report()

    async def _close(self) -> None:
        self._admission = "closed"
        if self._scope_deadline_timer is not None:
            self._scope_deadline_timer.cancel()
            self._scope_deadline_timer = None
        if self._runner is not None:
            await self._runner.aclose()

    def report(self) -> Report:
        """Return the statistics and the ops whose work still runs after their outcome."""
        self._check_reader()
        abandoned = tuple(op.result() for op in self._ledger.abandoned_ops())
        return Report(stats=self.stats(), abandoned=abandoned)
