"""The interface every region reader implements."""

from __future__ import annotations

import abc
from typing import Literal

from edge.results import Image, Reading

OpKind = Literal["thread", "process"]


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

    @abc.abstractmethod
    def read(self, image: Image) -> Reading:
        """Read a crop: H x W x 3 uint8 BGR, C-contiguous, at least 1 x 1 pixels."""

    def warm_up(self) -> None:  # noqa: B027 (optional hook, empty by default)
        """Load models and run one dummy read so the first frame is not slow."""

    def cancel(self) -> None:  # noqa: B027 (optional hook, empty by default)
        """Ask a running :meth:`read` to stop early; called from the event loop on timeout."""

    def close(self) -> None:  # noqa: B027 (optional hook, empty by default)
        """Release what :meth:`warm_up` loaded."""
