"""`edge run` as systemd runs it: notify socket, watchdog, metrics endpoint, SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO

from conftest import REPO, Broker, free_port

SAMPLES = REPO / "edge" / "samples"


def _receive_all(sock: socket.socket) -> list[str]:
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096).decode())
        except BlockingIOError:
            return messages


def _processed(metrics_text: str) -> float:
    """Value of the frames-processed counter in a Prometheus text page, -1 if absent."""
    for line in metrics_text.splitlines():
        if line.startswith("edge_frames_processed_total "):
            return float(line.split()[-1])
    return -1.0


def _wait_for(predicate: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_service_notifies_serves_metrics_and_stops_on_sigterm(
    tmp_path: Path, broker: Broker, topic_prefix: str
) -> None:
    """READY after start-up, watchdog pings while frames flow, metrics scraped, exit 0 on TERM."""
    notify_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.setblocking(False)
    metrics_port = free_port()
    config = tmp_path / "edge.toml"
    config.write_text(
        f'[camera]\nkind = "simulated"\npath = "{SAMPLES}"\nfps = 4\nloop = true\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\ntopic_prefix = "{topic_prefix}"\n'
        f"[service]\nmetrics = true\nmetrics_port = {metrics_port}\n"
    )
    env = dict(os.environ, NOTIFY_SOCKET=str(notify_path), WATCHDOG_USEC="2000000")
    process = subprocess.Popen(
        [sys.executable, "-m", "edge", "run", "--config", str(config)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    received: list[str] = []
    bodies: list[str] = []
    url = f"http://127.0.0.1:{metrics_port}/metrics"

    def sent_after(text: str, index: int = 0) -> Callable[[], bool]:
        def check() -> bool:
            received.extend(_receive_all(sock))
            return any(text in m for m in received[index:])

        return check

    def frames_counted() -> bool:
        with urllib.request.urlopen(url, timeout=10) as response:
            bodies.append(response.read().decode())
        return _processed(bodies[-1]) > 0

    try:
        assert _wait_for(sent_after("READY=1"), 120), f"no READY=1; got {received}"
        ready_index = next(i for i, m in enumerate(received) if "READY=1" in m)
        # Frames flow at 4 fps and the watchdog interval is 1 s: pings must follow READY.
        assert _wait_for(sent_after("WATCHDOG=1", ready_index), 30)
        _wait_for(frames_counted, 60)
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        returncode = process.wait(60)
        stop_seconds = time.monotonic() - started
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        assert process.stderr is not None
        stderr = process.stderr.read()
        process.stderr.close()
        received.extend(_receive_all(sock))
        sock.close()
    print(f"stopped {stop_seconds:.2f} s after SIGTERM")
    assert returncode == 0, stderr
    assert any("STOPPING=1" in m for m in received)
    assert _processed(bodies[-1]) > 0
    assert "received SIGTERM" in stderr


def test_service_sighup_reloads_configuration(tmp_path: Path) -> None:
    """SIGHUP with a valid file restarts with it; an invalid one is kept out; SIGTERM wins."""
    config = tmp_path / "edge.toml"
    base = f'[camera]\nkind = "simulated"\npath = "{SAMPLES}"\nfps = 4\nloop = true\n'
    config.write_text(base + '[device]\nid = "before"\n[mqtt]\nenabled = false\n')
    process = subprocess.Popen(
        [sys.executable, "-m", "edge", "run", "--config", str(config), "--stdout"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    errors: list[str] = []
    rejected = threading.Event()

    def collect_stderr(stream: IO[str]) -> None:
        for text in stream:
            errors.append(text)
            if "configuration not reloaded" in text:
                rejected.set()

    collector = threading.Thread(target=collect_stderr, args=(process.stderr,), daemon=True)
    collector.start()
    try:
        assert '"device_id":"before"' in process.stdout.readline()
        config.write_text(base + "[mqtt]\nport = 0\n")
        process.send_signal(signal.SIGHUP)
        # The valid file is written only after the daemon has rejected the invalid one.
        assert rejected.wait(60), "".join(errors)
        assert '"device_id":"before"' in process.stdout.readline()
        config.write_text(base + '[device]\nid = "after"\n[mqtt]\nenabled = false\n')
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 120
        line = ""
        while time.monotonic() < deadline and '"device_id":"after"' not in line:
            line = process.stdout.readline()
        # A stop right after a reload request wins: the daemon exits instead of restarting.
        process.send_signal(signal.SIGHUP)
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        collector.join(10)
        stderr = "".join(errors)
        process.stdout.close()
        process.stderr.close()
    assert '"device_id":"after"' in line, stderr
    assert "configuration not reloaded" in stderr
    assert "mqtt.port" in stderr
    assert returncode == 0, stderr


def test_service_sigterm_during_startup(tmp_path: Path) -> None:
    """A SIGTERM while the model loads stops the daemon before its camera opens, with exit 0."""
    config = tmp_path / "edge.toml"
    config.write_text(
        f'[camera]\nkind = "simulated"\npath = "{SAMPLES}"\nfps = 4\nloop = true\n'
        "[mqtt]\nenabled = false\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "edge", "run", "--config", str(config), "--stdout"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None

    try:
        # The first log line comes after the handlers are in place and before the frame loop.
        first = process.stderr.readline()
        process.send_signal(signal.SIGTERM)
        stdout, rest = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stderr = first + rest
    assert "starting" in first, stderr
    assert process.returncode == 0, stderr
    assert "received SIGTERM during start-up, stopping" in stderr
    assert "pipeline stopped" in stderr
    # The run ended before the camera opened.
    assert "camera ready" not in stderr
    assert '"device_id"' not in stdout


def test_service_sigterm_during_reload_drain(tmp_path: Path) -> None:
    """A SIGTERM that lands while a reload drains the run ends the daemon, with exit 0."""
    config = tmp_path / "edge.toml"
    config.write_text(
        f'[camera]\nkind = "simulated"\npath = "{SAMPLES}"\nfps = 4\nloop = true\n'
        '[device]\nid = "child"\n[mqtt]\nenabled = false\n'
    )
    completed = subprocess.run(
        [sys.executable, str(REPO / "tests" / "reload_child.py"), str(config)],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO / "tests")),
        capture_output=True,
        text=True,
        timeout=120,
    )
    stderr = completed.stderr
    assert completed.returncode == 0, stderr
    assert "received SIGHUP, reloading" in stderr
    assert "received SIGTERM while reloading, so not starting again" in stderr
    assert stderr.count("pipeline built for device child") == 1
    assert '"device_id":"child"' in completed.stdout
