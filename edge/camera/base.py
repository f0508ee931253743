"""The interface every camera backend implements."""

from __future__ import annotations

import abc
from types import TracebackType
from typing import Self

from edge.results import Frame


class Camera(abc.ABC):
    """A source of frames that always hands over the newest one.

    A backend captures in the background at its own rate. :meth:`read` returns the newest
    frame not yet handed over, waiting for one if none is ready. Frames captured while the
    consumer was busy and replaced by a newer one before it called :meth:`read` are dropped
    and counted in :attr:`dropped`; nothing is queued without bound.
    """

    @abc.abstractmethod
    async def open(self) -> None:
        """Open the device or source and start capturing.

        Raises:
            CameraError: The device or source cannot be opened.
        """

    @abc.abstractmethod
    async def read(self) -> Frame:
        """Return the newest frame not yet handed over, waiting for one if needed.

        Raises:
            SourceExhausted: A finite source has handed over its last frame.
            CameraError: The camera failed or stopped delivering frames.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop capturing and release the device. Safe to call more than once."""

    @property
    @abc.abstractmethod
    def dropped(self) -> int:
        """Frames captured but replaced by a newer one before :meth:`read` took them."""

    @property
    def description(self) -> str:
        """A short description for logs, such as the device or path."""
        return type(self).__name__

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
