"""Tests for the sd_notify client and the watchdog, against a real datagram socket."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge.notify import Notifier, Watchdog, watchdog_timeout_from_environment


class FakeClock:
    """A monotonic clock that moves only when a test sets ``now``."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound AF_UNIX datagram socket standing in for systemd's notify socket."""
    path = tmp_path / "notify.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(5.0)
    yield server, str(path)
    server.close()


def receive(server: socket.socket) -> str:
    """Return the next datagram as text."""
    return server.recv(4096).decode()


def pending(server: socket.socket) -> list[str]:
    """Return every datagram already queued, without waiting."""
    messages: list[str] = []
    server.setblocking(False)
    try:
        while True:
            messages.append(server.recv(4096).decode())
    except BlockingIOError:
        return messages
    finally:
        server.settimeout(5.0)


def test_notifier_ready_sends_datagram(notify_socket: tuple[socket.socket, str]) -> None:
    """ready() sends READY=1 to the socket path."""
    server, path = notify_socket
    notifier = Notifier(path)

    assert notifier.ready()
    assert receive(server) == "READY=1"


def test_notifier_ready_with_status(notify_socket: tuple[socket.socket, str]) -> None:
    """ready(status) sends READY=1 and STATUS in one datagram."""
    server, path = notify_socket
    Notifier(path).ready("camera picamera2:0, model detector.onnx")

    assert receive(server) == "READY=1\nSTATUS=camera picamera2:0, model detector.onnx"


def test_notifier_stopping_sends_datagram(notify_socket: tuple[socket.socket, str]) -> None:
    """stopping() sends STOPPING=1."""
    server, path = notify_socket
    Notifier(path).stopping()

    assert receive(server) == "STOPPING=1"


def test_notifier_status_newlines_joined(notify_socket: tuple[socket.socket, str]) -> None:
    """A newline in a status text becomes a space, so it cannot start another assignment."""
    server, path = notify_socket
    Notifier(path).status("line one\nWATCHDOG=1")

    assert receive(server) == "STATUS=line one WATCHDOG=1"


def test_notifier_watchdog_sends_datagram(notify_socket: tuple[socket.socket, str]) -> None:
    """watchdog() sends WATCHDOG=1."""
    server, path = notify_socket
    Notifier(path).watchdog()

    assert receive(server) == "WATCHDOG=1"


def test_notifier_abstract_socket() -> None:
    """An address starting with @ reaches a socket in the abstract namespace."""
    name = f"edge-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        server.settimeout(5.0)
        Notifier("@" + name).ready()

        assert receive(server) == "READY=1"


def test_notifier_from_environment_unset_disabled() -> None:
    """Without NOTIFY_SOCKET the notifier is disabled and sends report False."""
    notifier = Notifier.from_environment({})

    assert not notifier.enabled
    assert not notifier.ready()


def test_notifier_from_environment_reads_socket(
    notify_socket: tuple[socket.socket, str],
) -> None:
    """NOTIFY_SOCKET from the environment is the address used."""
    server, path = notify_socket
    Notifier.from_environment({"NOTIFY_SOCKET": path}).status("up")

    assert receive(server) == "STATUS=up"


def test_notifier_relative_address_disabled(caplog: pytest.LogCaptureFixture) -> None:
    """A relative NOTIFY_SOCKET address disables notifications with a warning."""
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": "relative.sock"})

    assert not notifier.enabled
    assert "unsupported NOTIFY_SOCKET address 'relative.sock'" in caplog.text


def test_notifier_missing_socket_returns_false(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A send to a socket that does not exist returns False and logs, without raising."""
    notifier = Notifier(str(tmp_path / "gone.sock"))

    assert not notifier.ready()
    assert "READY=1" in caplog.text


def test_notifier_repeated_failure_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Repeated failed sends log one warning, not one per send."""
    notifier = Notifier(str(tmp_path / "gone.sock"))
    for _ in range(3):
        notifier.watchdog()

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1


def test_watchdog_timeout_from_usec() -> None:
    """WATCHDOG_USEC is read as microseconds."""
    assert watchdog_timeout_from_environment({"WATCHDOG_USEC": "30000000"}) == 30.0


def test_watchdog_timeout_other_pid_ignored() -> None:
    """A WATCHDOG_PID of another process disables the watchdog."""
    environ = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}

    assert watchdog_timeout_from_environment(environ) is None


def test_watchdog_timeout_own_pid_accepted() -> None:
    """A WATCHDOG_PID equal to this process keeps the timeout."""
    environ = {"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}

    assert watchdog_timeout_from_environment(environ) == 4.0


@pytest.mark.parametrize("value", ["", "abc", "0", "-5"], ids=["empty", "text", "zero", "negative"])
def test_watchdog_timeout_invalid_ignored(value: str) -> None:
    """An empty, non-numeric or non-positive WATCHDOG_USEC disables the watchdog."""
    assert watchdog_timeout_from_environment({"WATCHDOG_USEC": value}) is None


def test_watchdog_interval_half_timeout() -> None:
    """The ping interval is half the systemd timeout."""
    watchdog = Watchdog(Notifier(None), 30.0)

    assert watchdog.interval == 15.0


def test_watchdog_disabled_without_socket() -> None:
    """Without a notify socket the watchdog is disabled even with a timeout."""
    assert not Watchdog(Notifier(None), 30.0).enabled


def test_watchdog_invalid_stall_window_raises() -> None:
    """A non-positive stall window raises ValueError naming it."""
    with pytest.raises(ValueError, match="stall_window"):
        Watchdog(Notifier(None), 30.0, stall_window=0)


def test_watchdog_pings_before_armed(notify_socket: tuple[socket.socket, str]) -> None:
    """Before arm(), every check pings, whatever the frame progress."""
    server, path = notify_socket
    clock = FakeClock()
    watchdog = Watchdog(Notifier(path), 10.0, clock=clock)
    clock.now += 100

    assert watchdog.ping_if_due()
    assert receive(server) == "WATCHDOG=1"


def test_watchdog_armed_no_frames_withholds(notify_socket: tuple[socket.socket, str]) -> None:
    """Once armed, no frame within the stall window means no ping."""
    server, path = notify_socket
    clock = FakeClock()
    watchdog = Watchdog(Notifier(path), 10.0, clock=clock)
    watchdog.arm()
    clock.now += 5.1

    assert not watchdog.ping_if_due()
    assert pending(server) == []


def test_watchdog_armed_frame_pings(notify_socket: tuple[socket.socket, str]) -> None:
    """Once armed, a frame processed since the last ping gives a ping."""
    server, path = notify_socket
    clock = FakeClock()
    watchdog = Watchdog(Notifier(path), 10.0, clock=clock)
    watchdog.arm()
    clock.now += 4.0
    watchdog.frame_processed()
    clock.now += 1.0

    assert watchdog.ping_if_due()
    assert receive(server) == "WATCHDOG=1"


def test_watchdog_stall_window_extends(notify_socket: tuple[socket.socket, str]) -> None:
    """A longer stall window keeps pinging until the last frame is older than it."""
    server, path = notify_socket
    clock = FakeClock()
    watchdog = Watchdog(Notifier(path), 10.0, stall_window=60.0, clock=clock)
    watchdog.arm()
    watchdog.frame_processed()
    clock.now += 59.0
    inside = watchdog.ping_if_due()
    clock.now += 2.0
    outside = watchdog.ping_if_due()

    assert inside
    assert not outside
    assert pending(server) == ["WATCHDOG=1"]


def test_watchdog_stall_logged_once(
    notify_socket: tuple[socket.socket, str], caplog: pytest.LogCaptureFixture
) -> None:
    """A stall logs one warning however many checks it spans, and recovery logs once."""
    caplog.set_level(logging.INFO, logger="edge.notify")
    _, path = notify_socket
    clock = FakeClock()
    watchdog = Watchdog(Notifier(path), 10.0, clock=clock)
    watchdog.arm()
    for _ in range(3):
        clock.now += 5.0
        watchdog.ping_if_due()
    watchdog.frame_processed()
    watchdog.ping_if_due()

    warnings = [r for r in caplog.records if "withholding watchdog pings" in r.message]
    recoveries = [r for r in caplog.records if "watchdog pings resumed" in r.message]
    assert len(warnings) == 1
    assert len(recoveries) == 1


async def test_watchdog_run_pings_while_frames_flow(
    notify_socket: tuple[socket.socket, str],
) -> None:
    """The edge.watchdog task pings while frames flow and stops pinging when they stop."""
    server, path = notify_socket
    watchdog = Watchdog(Notifier(path), 0.2)
    watchdog.arm()
    task = asyncio.create_task(watchdog.run(), name="edge.watchdog")
    try:
        for _ in range(5):
            watchdog.frame_processed()
            await asyncio.sleep(0.1)
        flowing = len(pending(server))
        # Two stall windows without frames: at most one ping may still be in flight.
        await asyncio.sleep(0.2)
        pending(server)
        await asyncio.sleep(0.4)
        stalled = len(pending(server))
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    assert flowing >= 2
    assert stalled == 0


async def test_watchdog_run_disabled_returns() -> None:
    """run() returns at once when systemd set no watchdog timeout."""
    watchdog = Watchdog(Notifier(None), None)

    await asyncio.wait_for(watchdog.run(), timeout=5.0)

    assert not watchdog.enabled
