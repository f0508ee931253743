"""`edge run` as systemd runs it: notify socket, watchdog, metrics endpoint, SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

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


def _wait_for(predicate: object, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
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
    try:
        ready = _wait_for(
            lambda: received.extend(_receive_all(sock)) or any("READY=1" in m for m in received),
            120,
        )
        assert ready, f"no READY=1; got {received}"
        ready_index = next(i for i, m in enumerate(received) if "READY=1" in m)
        # Frames flow at 4 fps and the watchdog interval is 1 s: pings must follow READY.
        assert _wait_for(
            lambda: (
                received.extend(_receive_all(sock))
                or any("WATCHDOG=1" in m for m in received[ready_index:])
            ),
            30,
        )
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        bodies: list[str] = []
        _wait_for(
            lambda: (
                bodies.append(urllib.request.urlopen(url, timeout=10).read().decode())
                or _processed(bodies[-1]) > 0
            ),
            60,
        )
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
