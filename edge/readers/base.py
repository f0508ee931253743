"""The interface every region reader implements, and the token that cancels one read."""

from __future__ import annotations

import abc
import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Literal

from edge.results import Image, Reading

OpKind = Literal["thread", "process"]


class ReadCancelled(Exception):
    """Raised by a thread reader's :meth:`Reader.read` that stopped because it was cancelled."""


class Cancellation:
    """A request to stop one running read, sent from the event loop to the reading thread.

    The pipeline creates one for each read by a thread-kind reader that is ``cancellable``,
    and calls :meth:`cancel` when the read times out. The reader registers a callback for
    each native call that can be interrupted (an onnxruntime run, through
    ``RunOptions.terminate``) and checks :attr:`cancelled` between calls. Thread-safe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancelled = False
        self._callbacks: list[Callable[[], object]] = []

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self._cancelled

    def cancel(self) -> None:
        """Mark the read cancelled and call the registered callbacks once each."""
        with self._lock:
            if self._cancelled:
                return
            self._cancelled = True
            callbacks = list(self._callbacks)
        for callback in callbacks:
            callback()

    def raise_if_cancelled(self) -> None:
        """Raise :class:`ReadCancelled` if :meth:`cancel` was called."""
        if self._cancelled:
            msg = "read cancelled"
            raise ReadCancelled(msg)

    @contextlib.contextmanager
    def registered(self, callback: Callable[[], object]) -> Iterator[None]:
        """Call ``callback`` if the read is cancelled while the block runs.

        If it was cancelled before, ``callback`` runs at once.
        """
        with self._lock:
            already = self._cancelled
            if not already:
                self._callbacks.append(callback)
        if already:
            callback()
        try:
            yield
        finally:
            with self._lock:
                if callback in self._callbacks:
                    self._callbacks.remove(callback)


class Reader(abc.ABC):
    """Reads one kind of content (text, codes) from an image crop.

    ``read`` is synchronous and runs off the event loop: on a worker thread when ``kind`` is
    ``"thread"`` (native code that releases the GIL, such as onnxruntime), or in a killable
    worker process when ``kind`` is ``"process"`` (native code that may crash or hang, such as
    zbar). A process reader is pickled into its worker with each call, so it must keep heavy
    state (libraries, sessions) out of its pickled attributes and create it lazily.

    "Nothing found" is an empty :class:`Reading`, never an exception; an exception means the
    read failed.
    """

    #: Short name reported in each region result (``"text"``, ``"codes"``).
    name: str
    #: How the pipeline runs :meth:`read`.
    kind: OpKind = "thread"
    #: Margin added on each side of a detected box before cropping, as a share of the box's
    #: width and height, so that content cut by a tight box is still whole in the crop.
    crop_margin: float = 0.06
    #: Whether :meth:`read` stops early when its ``cancellation`` is cancelled. The pipeline
    #: passes a :class:`Cancellation` to thread readers that set this; a process reader is
    #: stopped by killing its worker instead.
    cancellable: bool = False
    #: CPU time per crop pixel relative to the other readers, used to start the longest
    #: reads of a frame first. Only the ratio between readers matters.
    cost_per_pixel: float = 1.0

    @abc.abstractmethod
    def read(self, image: Image, cancellation: Cancellation | None = None) -> Reading:
        """Read a crop: H x W x 3 uint8 BGR, C-contiguous, at least 1 x 1 pixels.

        Raises:
            ReadCancelled: ``cancellation`` was cancelled, if the reader is ``cancellable``.
        """

    def warm_up(self) -> None:  # noqa: B027 (optional hook, empty by default)
        """Load models and run one dummy read so the first frame is not slow."""

    def close(self) -> None:  # noqa: B027 (optional hook, empty by default)
        """Release what :meth:`warm_up` loaded."""
