"""Validated constructor options of a WaitGroup."""

from __future__ import annotations

import math
import multiprocessing
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from edge.waitgroup._limiter import SlotLimiter
from edge.waitgroup._process import StartMethod
from edge.waitgroup._types import OpResult

OnError = Literal["collect", "cancel"]


def check_seconds(value: object, what: str) -> float:
    """Return ``value`` as float seconds, or raise TypeError or ValueError unless positive."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        message = f"{what} must be a number of seconds, got {value!r}"
        raise TypeError(message)
    if math.isnan(value) or value <= 0:
        message = f"{what} must be a positive number of seconds, got {value!r}"
        raise ValueError(message)
    return float(value)


def check_optional_seconds(value: object, what: str) -> float | None:
    """Like ``check_seconds()``, but let ``None`` (no limit) through."""
    return None if value is None else check_seconds(value, what)


def _check_count(value: object, what: str) -> None:
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        message = f"{what} must be an int or None, got {value!r}"
        raise TypeError(message)
    if value < 1:
        message = f"{what} must be at least 1 or None (unbounded), got {value}"
        raise ValueError(message)


@dataclass(frozen=True, slots=True)
class Options:
    """Constructor arguments of a WaitGroup, checked on construction.

    The fields mean what the ``WaitGroup`` arguments of the same name mean.

    Raises:
        ValueError: A count, timeout or grace is 0 or negative, both ``limit`` and
            ``limiter`` are set, or an option has an unknown value.
        TypeError: A field has the wrong type.
    """

    name: str
    limit: int | None = None
    limiter: SlotLimiter | None = None
    op_timeout: float | None = None
    deadline: float | None = None
    on_error: OnError = "collect"
    raise_on_error: bool = False
    cancel_grace: float = 1.0
    thread_workers: int | None = None
    process_workers: int | None = None
    on_op_end: Callable[[OpResult[Any]], object] | None = None
    start_method: StartMethod = "spawn"
    kill_grace: float = 0.25

    def __post_init__(self) -> None:
        _check_count(self.limit, "limit")
        _check_count(self.thread_workers, "thread_workers")
        _check_count(self.process_workers, "process_workers")
        if self.limit is not None and self.limiter is not None:
            message = "pass either limit or limiter, not both"
            raise ValueError(message)
        if self.limiter is not None and not isinstance(self.limiter, SlotLimiter):
            message = (
                f"limiter needs acquire(), acquire_nowait() and release(), got {self.limiter!r}"
            )
            raise TypeError(message)
        check_optional_seconds(self.op_timeout, "op_timeout")
        check_optional_seconds(self.deadline, "deadline")
        check_seconds(self.cancel_grace, "cancel_grace")
        check_seconds(self.kill_grace, "kill_grace")
        if self.on_error not in ("collect", "cancel"):
            message = f"on_error must be 'collect' or 'cancel', got {self.on_error!r}"
            raise ValueError(message)
        if self.start_method not in ("spawn", "forkserver"):
            message = f"start_method must be 'spawn' or 'forkserver', got {self.start_method!r}"
            raise ValueError(message)
        if self.start_method not in multiprocessing.get_all_start_methods():
            message = f"start method {self.start_method!r} is not available on this platform"
            raise ValueError(message)

    @property
    def threads(self) -> int | None:
        """Thread pool size: ``thread_workers``, else ``limit``, else the pool default."""
        return self.thread_workers or self.limit

    @property
    def processes(self) -> int:
        """Worker process count: ``process_workers``, else ``limit``, else the CPU count."""
        return self.process_workers or self.limit or os.cpu_count() or 1
