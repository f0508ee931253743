"""Exceptions raised by WaitGroup ops.

They derive from ``edge.errors.EdgeError``, so a handler for every daemon error also
catches them.
"""

from __future__ import annotations

import signal

from edge.errors import EdgeError


class DeadlineExceeded(EdgeError, TimeoutError):
    """Raised when the group deadline has passed.

    ``go()`` raises it once the deadline has closed admission or while the caller waits
    in the queue at expiry. It is also the ``error`` of ops that were still running at
    expiry (outcome TIMED_OUT, reason ``"deadline"``) or still queued (outcome REJECTED).

    Attributes:
        group: Name of the group whose deadline passed.
    """

    def __init__(self, message: str, *, group: str) -> None:
        self.group = group
        super().__init__(message)

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_deadline_exceeded, (str(self), self.group))


class WorkerDied(EdgeError):
    """Raised as the error of a process op whose worker process ended during the op.

    The worker died on its own: it crashed, was killed by a signal it did not expect,
    or called ``os._exit``. A worker that the group kills at a timeout does not raise
    this. That op ends TIMED_OUT with ``killed=True``.

    Attributes:
        pid: Process id of the worker.
        exitcode: Exit status as reported by ``multiprocessing`` (negative for a
            signal), or ``None`` if the worker could not be reaped.
    """

    def __init__(self, message: str, *, pid: int | None, exitcode: int | None) -> None:
        self.pid = pid
        self.exitcode = exitcode
        super().__init__(message)

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_worker_died, (str(self), self.pid, self.exitcode))

    @property
    def signal(self) -> signal.Signals | None:
        """Signal that ended the worker, or ``None`` if it exited with a status."""
        if self.exitcode is None or self.exitcode >= 0:
            return None
        try:
            return signal.Signals(-self.exitcode)
        except ValueError:
            return None


def _rebuild_deadline_exceeded(message: str, group: str) -> DeadlineExceeded:
    return DeadlineExceeded(message, group=group)


def _rebuild_worker_died(message: str, pid: int | None, exitcode: int | None) -> WorkerDied:
    return WorkerDied(message, pid=pid, exitcode=exitcode)
