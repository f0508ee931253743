"""Process signals of the daemon: SIGTERM and SIGINT stop it, SIGHUP reloads its configuration."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

#: Signals that end the daemon.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: All signals the inbox takes over.
HANDLED_SIGNALS = (*STOP_SIGNALS, signal.SIGHUP)

_Handler = Callable[[int, FrameType | None], Any] | int | None


class SignalInbox:
    """Handler of SIGTERM, SIGINT and SIGHUP that stays installed between runs.

    ``loop.add_signal_handler`` puts the default action back when its handler is removed,
    so a SIGTERM during the drain or a restart would end the process at once. With this
    handler, a signal goes to the attached frame loop, or waits for the next one to attach.
    A second SIGINT gets SIGINT's default action, so a second Ctrl-C ends the process at once.
    """

    def __init__(self) -> None:
        #: The first SIGTERM or SIGINT received, or ``None``. It is kept for the process's life.
        self.stop_signum: int | None = None
        self._reload_pending = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_stop: Callable[[int], None] | None = None
        self._on_reload: Callable[[], None] | None = None
        self._wakeup: tuple[socket.socket, socket.socket] | None = None
        self._replaced_wakeup_fd = -1

    def install(self) -> dict[int, _Handler]:
        """Install the handler (from the main thread) and return the handlers it replaced."""
        previous: dict[int, _Handler] = {}
        for signum in HANDLED_SIGNALS:
            previous[signum] = signal.signal(signum, self._receive)
        return previous

    def attach(
        self,
        loop: asyncio.AbstractEventLoop,
        on_stop: Callable[[int], None],
        on_reload: Callable[[], None],
    ) -> None:
        """Send signals to ``loop``'s callbacks, first those that arrived while none was attached.

        A stop received before wins over a reload received before. The callbacks run on the
        loop, never inside the signal handler.
        """
        if self._loop is not None:
            msg = "the signal inbox is already attached to a loop; detach it first"
            raise RuntimeError(msg)
        if threading.current_thread() is threading.main_thread():
            # Python runs its handlers on the main thread only. A signal that lands on another
            # thread writes to this socket, which wakes the loop so that the handler runs.
            receiver, sender = socket.socketpair()
            receiver.setblocking(False)
            sender.setblocking(False)
            self._replaced_wakeup_fd = signal.set_wakeup_fd(
                sender.fileno(), warn_on_full_buffer=False
            )
            self._wakeup = (receiver, sender)
            loop.add_reader(receiver.fileno(), _drain, receiver)
        self._loop = loop
        self._on_stop = on_stop
        self._on_reload = on_reload
        if self.stop_signum is not None:
            loop.call_soon(on_stop, self.stop_signum)
        elif self._reload_pending:
            loop.call_soon(on_reload)
        self._reload_pending = False

    def detach(self) -> None:
        """Stop sending signals to the loop, and keep them until the next ``attach``."""
        if self._wakeup is not None:
            receiver, sender = self._wakeup
            # Put the replaced file descriptor back only if nothing replaced this one since.
            current = signal.set_wakeup_fd(self._replaced_wakeup_fd)
            if current != sender.fileno():
                signal.set_wakeup_fd(current)
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(receiver.fileno())
            receiver.close()
            sender.close()
            self._wakeup = None
        self._loop = None
        self._on_stop = None
        self._on_reload = None

    def _receive(self, signum: int, _frame: FrameType | None) -> None:
        # Python runs this on the main thread at a later bytecode, possibly inside the loop's
        # own code, so it only records the signal and hands it to the loop.
        loop = self._loop
        if loop is not None and loop.is_closed():
            loop = None
        if signum == signal.SIGHUP:
            if loop is not None and self._on_reload is not None:
                loop.call_soon_threadsafe(self._on_reload)
            else:
                self._reload_pending = True
            return
        if self.stop_signum is not None and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
            return
        if self.stop_signum is None:
            self.stop_signum = signum
        if loop is not None and self._on_stop is not None:
            loop.call_soon_threadsafe(self._on_stop, signum)


def _drain(receiver: socket.socket) -> None:
    with contextlib.suppress(BlockingIOError):
        while receiver.recv(64):
            pass
