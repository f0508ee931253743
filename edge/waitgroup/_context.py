"""The ``current_op()`` context variable, readable from async, thread and process ops."""

from __future__ import annotations

import contextvars
import time
from typing import Protocol


class _ContextSource(Protocol):
    """Source of an ``OpContext``: the op's name, its deadline and the clock it uses."""

    @property
    def name(self) -> str: ...

    @property
    def deadline(self) -> float | None: ...

    def clock(self) -> float: ...


class OpContext:
    """Name and time budget of the op that is running in the current context.

    The deadline is the earlier of the op's own timeout and the group deadline, on the
    clock that ``remaining()`` uses: the event loop clock in async and thread ops,
    ``time.monotonic()`` in a worker process.
    """

    __slots__ = ("_source",)

    def __init__(self, source: _ContextSource) -> None:
        self._source = source

    @property
    def name(self) -> str:
        """Op name as given to ``go()``, or the function's qualified name."""
        return self._source.name

    @property
    def deadline(self) -> float | None:
        """Clock time at which the op is cancelled, ``None`` if it has no time limit."""
        return self._source.deadline

    def remaining(self) -> float | None:
        """Return the seconds left before the deadline (0.0 once passed), ``None`` if unlimited.

        Pass it on as the timeout of a downstream call, for example a gRPC stub, so
        the server stops working when the op is cancelled.
        """
        deadline = self._source.deadline
        if deadline is None:
            return None
        return max(0.0, deadline - self._source.clock())

    def __repr__(self) -> str:
        return f"OpContext(name={self.name!r}, remaining={self.remaining()!r})"


class _FixedSource:
    """Context source with a fixed deadline on ``time.monotonic()``, used in worker processes."""

    __slots__ = ("deadline", "name")

    def __init__(self, name: str, deadline: float | None) -> None:
        self.name = name
        self.deadline = deadline

    def clock(self) -> float:
        return time.monotonic()


_current_source: contextvars.ContextVar[_ContextSource] = contextvars.ContextVar(
    "edge.waitgroup.current_op"
)


def current_op() -> OpContext:
    """Return the context of the WaitGroup op that is running here.

    Works in async ops, in thread ops (the op runs in a copy of the submitter's
    context) and inside the function of a process op.

    Raises:
        RuntimeError: Called outside a WaitGroup op.
    """
    try:
        source = _current_source.get()
    except LookupError:
        message = "current_op() called outside a WaitGroup op"
        raise RuntimeError(message) from None
    return OpContext(source)
