"""The systemd notify protocol (sd_notify) and a watchdog fed only while frames flow.

systemd passes a ``Type=notify`` service the address of a datagram socket in
``$NOTIFY_SOCKET``; the service sends newline-separated ``KEY=VALUE`` assignments to it
(``READY=1``, ``STOPPING=1``, ``STATUS=...``, ``WATCHDOG=1``). With ``WatchdogSec=`` set,
systemd also passes ``$WATCHDOG_USEC`` and restarts the service when no ``WATCHDOG=1``
arrives within that time. See sd_notify(3) and systemd.service(5).

Everything here is a no-op when ``$NOTIFY_SOCKET`` is unset, so the daemon runs unchanged
outside systemd.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

logger = logging.getLogger(__name__)


class Notifier:
    """Send sd_notify messages to the socket systemd named in ``$NOTIFY_SOCKET``.

    Sending never raises: a failed send is logged and reported as ``False``, because losing a
    status line must not stop the daemon. Sends do not block; a full socket queue drops the
    message.

    Args:
        address: The socket address: an absolute path, or ``@name`` for a socket in the
            abstract namespace. ``None`` or an empty string disables every send.

    Raises:
        ValueError: ``address`` is neither an absolute path nor starts with ``@``.
    """

    def __init__(self, address: str | None) -> None:
        self._address: str | bytes | None = None
        if address:
            if address.startswith("@"):
                # A leading NUL byte selects the abstract namespace (unix(7)).
                self._address = b"\0" + address[1:].encode()
            elif address.startswith("/"):
                self._address = address
            else:
                msg = (
                    f"unsupported NOTIFY_SOCKET address {address!r}; expected an absolute "
                    "path or an abstract socket name starting with @"
                )
                raise ValueError(msg)
        self._failing = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """Create a notifier for ``$NOTIFY_SOCKET``; an unsupported address disables it.

        Args:
            environ: The environment to read; ``None`` reads :data:`os.environ`.
        """
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET")
        try:
            return cls(address)
        except ValueError as exc:
            logger.warning("systemd notifications disabled: %s", exc)
            return cls(None)

    @property
    def enabled(self) -> bool:
        """Whether a socket address is set, so messages are sent at all."""
        return self._address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments in one datagram.

        Returns:
            ``True`` when the datagram was sent, ``False`` when disabled or the send failed.
        """
        if self._address is None or not assignments:
            return False
        payload = "\n".join(assignments).encode(errors="replace")
        try:
            # A socket per message, as sd_notify(3) does: nothing stays open between pings.
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto(payload, self._address)
        except OSError as exc:
            # Warn once per run of failures: a broken socket would repeat at every ping.
            level = logging.DEBUG if self._failing else logging.WARNING
            logger.log(level, "systemd notification %r not sent: %s", assignments[0], exc)
            self._failing = True
            return False
        if self._failing:
            logger.info("systemd notifications sent again")
            self._failing = False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd that start-up is complete (``READY=1``), with an optional status."""
        return self.notify("READY=1", *_status_line(status))

    def stopping(self, status: str | None = None) -> bool:
        """Tell systemd that the service is shutting down (``STOPPING=1``)."""
        return self.notify("STOPPING=1", *_status_line(status))

    def status(self, text: str) -> bool:
        """Set the one-line status that ``systemctl status`` shows (``STATUS=...``)."""
        return self.notify(*_status_line(text))

    def watchdog(self) -> bool:
        """Reset the systemd watchdog timer (``WATCHDOG=1``)."""
        return self.notify("WATCHDOG=1")


def _status_line(text: str | None) -> tuple[str, ...]:
    if text is None:
        return ()
    # One assignment per line: a newline in the text would start a new assignment.
    return ("STATUS=" + " ".join(text.splitlines()),)


def watchdog_timeout_from_environment(environ: Mapping[str, str] | None = None) -> float | None:
    """Return the watchdog timeout in seconds that systemd set for this process, if any.

    Reads ``$WATCHDOG_USEC`` (microseconds). ``$WATCHDOG_PID``, when set, must be this
    process's id; otherwise the timeout belongs to another process and ``None`` is returned.

    Args:
        environ: The environment to read; ``None`` reads :data:`os.environ`.
    """
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        logger.debug("WATCHDOG_PID %s is not this process (%d); watchdog off", pid, os.getpid())
        return None
    try:
        value = int(usec)
    except ValueError:
        logger.warning("invalid WATCHDOG_USEC %r; expected microseconds; watchdog off", usec)
        return None
    if value <= 0:
        logger.warning("invalid WATCHDOG_USEC %r; expected a positive number; watchdog off", usec)
        return None
    return value / 1_000_000


class Watchdog:
    """Send ``WATCHDOG=1`` at half the systemd timeout, but only while frames are processed.

    Before :meth:`arm`, every interval gets a ping: start-up (model load, camera open) is
    bounded by ``TimeoutStartSec=`` instead. After :meth:`arm`, a ping is sent only if
    :meth:`frame_processed` was called within the last ``stall_window`` seconds. A stalled
    camera or a hung pipeline therefore stops the pings, and systemd restarts the service
    at most ``stall_window`` plus the watchdog timeout after the last processed frame.

    The pings come from an asyncio task on the event loop, so a blocked event loop stops them
    too.

    Args:
        notifier: Where pings are sent.
        timeout: The systemd watchdog timeout in seconds; ``None`` disables the watchdog.
        stall_window: Seconds since the last processed frame within which pings continue.
            ``None`` uses the ping interval, so that a frame must have been processed since
            the previous ping.
        clock: Monotonic clock in seconds; tests replace it.

    Raises:
        ValueError: ``timeout`` or ``stall_window`` is not a positive number.
    """

    def __init__(
        self,
        notifier: Notifier,
        timeout: float | None,
        *,
        stall_window: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if timeout is not None and not timeout > 0:
            msg = f"watchdog timeout must be a positive number of seconds, got {timeout}"
            raise ValueError(msg)
        if stall_window is not None and not stall_window > 0:
            msg = f"stall_window must be a positive number of seconds, got {stall_window}"
            raise ValueError(msg)
        self._notifier = notifier
        self._timeout = timeout
        self._interval = timeout / 2 if timeout is not None else None
        self._stall_window = stall_window if stall_window is not None else self._interval
        self._clock = clock
        self._armed = False
        self._last_progress = clock()
        self._frames = 0
        self._stalled = False

    @classmethod
    def from_environment(
        cls,
        notifier: Notifier,
        environ: Mapping[str, str] | None = None,
        *,
        stall_window: float | None = None,
    ) -> Watchdog:
        """Create a watchdog with the timeout systemd set in ``$WATCHDOG_USEC``, if any."""
        return cls(notifier, watchdog_timeout_from_environment(environ), stall_window=stall_window)

    @property
    def enabled(self) -> bool:
        """Whether pings are sent at all: systemd set a timeout and a notify socket."""
        return self._interval is not None and self._notifier.enabled

    @property
    def interval(self) -> float | None:
        """Seconds between pings (half the timeout), or ``None`` when disabled."""
        return self._interval

    @property
    def frames(self) -> int:
        """Frames reported through :meth:`frame_processed`."""
        return self._frames

    def arm(self) -> None:
        """Start requiring processed frames for pings; call once READY=1 has been sent.

        The first frame then has ``stall_window`` seconds to arrive.
        """
        self._armed = True
        self._last_progress = self._clock()

    def frame_processed(self) -> None:
        """Record that a frame went through the pipeline. Call from the event loop."""
        self._frames += 1
        self._last_progress = self._clock()

    def should_ping(self) -> bool:
        """Return whether a ping is due: not armed yet, or a frame within ``stall_window``."""
        if not self._armed or self._stall_window is None:
            return True
        return self._clock() - self._last_progress <= self._stall_window

    def ping_if_due(self) -> bool:
        """Send ``WATCHDOG=1`` if :meth:`should_ping`; log when frames stall and recover.

        Returns:
            Whether a ping was sent.
        """
        if not self.should_ping():
            if not self._stalled:
                self._stalled = True
                logger.warning(
                    "no frame processed for %.1f s; withholding watchdog pings, so systemd "
                    "restarts the service unless frames resume within %.1f s",
                    self._clock() - self._last_progress,
                    self._timeout or 0.0,
                )
            return False
        if self._stalled:
            self._stalled = False
            logger.info("frames flowing again; watchdog pings resumed")
        return self._notifier.watchdog()

    async def run(self) -> None:
        """Ping every interval until cancelled; returns at once when the watchdog is disabled.

        Run it as a task named ``edge.watchdog`` in the service's task group.
        """
        if not self.enabled:
            logger.debug("systemd watchdog not enabled for this process")
            return
        assert self._interval is not None
        logger.info("systemd watchdog enabled: ping every %.1f s", self._interval)
        while True:
            self.ping_if_due()
            await asyncio.sleep(self._interval)
