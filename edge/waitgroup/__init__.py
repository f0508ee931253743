"""Bounded WaitGroup: Go's add/done/wait counter with errgroup-style limits and timeouts.

The counter and the slots are separate. The counter (``add()`` plus queued and running
ops) drops as soon as an op's outcome is final, and ``wait()`` returns at 0. A slot is
freed only when the op's work has really stopped, so ``limit`` bounds real resources.

What a timeout does depends on the op's kind:

- ``"async"``: the op's task is cancelled and its ``finally`` blocks run. An op that
  ignores the cancellation for ``cancel_grace`` seconds is abandoned: its outcome is
  final but it keeps its slot until it ends.
- ``"thread"``: nothing can stop a thread. The outcome is final at once and the slot
  stays held until the thread returns. With ``on_cancel``, the group calls it to signal
  the thread and gives the thread up to ``cancel_grace`` seconds to return first.
- ``"process"``: the worker process running the op is killed (SIGTERM, then SIGKILL
  after ``kill_grace``) and reaped, and its slot is freed. A new worker starts on
  demand.

Use ``async with WaitGroup(...) as wg:`` for a single-use scope that joins its ops on
exit, or a long-lived group with ``wait()``, ``take_results()`` and ``aclose()``. A
group belongs to the first event loop that uses it. Only ``done_threadsafe()``,
``cancel_threadsafe()`` and ``stats()`` may be called from other threads.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edge.waitgroup._context import OpContext, current_op
    from edge.waitgroup._errors import DeadlineExceeded, WorkerDied
    from edge.waitgroup._group import WaitGroup
    from edge.waitgroup._limiter import Limiter, SlotLimiter
    from edge.waitgroup._op import OpHandle
    from edge.waitgroup._options import OnError
    from edge.waitgroup._process import StartMethod
    from edge.waitgroup._types import (
        Kind,
        OpResult,
        Outcome,
        Reason,
        Report,
        Stats,
        TimingStats,
    )

# The names below are imported on first use. A worker process imports this package to run
# its jobs (edge.waitgroup._worker), and needs neither asyncio nor the group: importing them
# all took about 10 MB of resident memory in each worker.
_MODULES = {
    "OpContext": "_context",
    "current_op": "_context",
    "DeadlineExceeded": "_errors",
    "WorkerDied": "_errors",
    "WaitGroup": "_group",
    "Limiter": "_limiter",
    "SlotLimiter": "_limiter",
    "OpHandle": "_op",
    "OnError": "_options",
    "StartMethod": "_process",
    "Kind": "_types",
    "OpResult": "_types",
    "Outcome": "_types",
    "Reason": "_types",
    "Report": "_types",
    "Stats": "_types",
    "TimingStats": "_types",
}


# Hidden from mypy, which would otherwise type a misspelt name as this function's result.
if not TYPE_CHECKING:

    def __getattr__(name: str) -> object:
        module = _MODULES.get(name)
        if module is None:
            msg = f"module {__name__!r} has no attribute {name!r}"
            raise AttributeError(msg)
        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
        globals()[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*globals(), *_MODULES})


__all__ = [
    "DeadlineExceeded",
    "Kind",
    "Limiter",
    "OnError",
    "OpContext",
    "OpHandle",
    "OpResult",
    "Outcome",
    "Reason",
    "Report",
    "SlotLimiter",
    "StartMethod",
    "Stats",
    "TimingStats",
    "WaitGroup",
    "WorkerDied",
    "current_op",
]
