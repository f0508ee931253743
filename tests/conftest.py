"""Run-wide fixtures: a real mosquitto broker on a loopback port, topics, schema validation."""

from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from edge.results import load_schema

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO.parent / "shared" / "corpus"
RUN_TOKEN = uuid.uuid4().hex[:8]


@dataclass(frozen=True)
class Broker:
    """Address of a running test broker."""

    host: str
    port: int


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_for_port(host: str, port: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """Start mosquitto on a free loopback port for the whole run (or use EDGE_TEST_MQTT_PORT)."""
    external = os.environ.get("EDGE_TEST_MQTT_PORT")
    if external:
        _wait_for_port("127.0.0.1", int(external), 10)
        yield Broker("127.0.0.1", int(external))
        return
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).exists():
        pytest.fail("mosquitto not found; install it (apt-get install mosquitto) to run MQTT tests")
    port = free_port()
    conf = tmp_path_factory.mktemp("mosquitto") / "mosquitto.conf"
    conf.write_text(
        (REPO / "scripts" / "mosquitto.conf").read_text() + f"listener {port} 127.0.0.1\n"
    )
    process = subprocess.Popen([binary, "-c", str(conf)], stderr=subprocess.PIPE)
    try:
        _wait_for_port("127.0.0.1", port, 10)
        yield Broker("127.0.0.1", port)
    finally:
        process.terminate()
        process.wait(10)
        assert process.stderr is not None
        process.stderr.close()


@pytest.fixture
def topic_prefix(request: pytest.FixtureRequest) -> str:
    """Topic prefix unique to this run and test, so tests never see each other's messages."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", request.node.name)[:60]
    return f"edgetest/{RUN_TOKEN}/{name}"


@pytest.fixture(scope="session")
def frame_validator() -> jsonschema.Draft202012Validator:
    """Validator of the frame result schema, with format checks."""
    return jsonschema.Draft202012Validator(
        load_schema("frame"), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


def manifest() -> list[dict[str, Any]]:
    """Entries of the real-image corpus manifest; empty when the corpus is not present."""
    path = CORPUS / "MANIFEST.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]


@pytest.fixture(autouse=True)
def _isolated_state(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Point the default outbox of every test, and of the daemons it starts, to a fresh folder.

    Without this, `edge run` in a test would share ~/.local/state/edge/outbox.sqlite3 with
    other test runs and with a daemon of the same user.
    """
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))
    for name in ("STATE_DIRECTORY", "CREDENTIALS_DIRECTORY", "EDGE_MQTT_PASSWORD"):
        monkeypatch.delenv(name, raising=False)


class BrokerProcess:
    """A mosquitto of one test that can be stopped and started again on the same port.

    Persistence is on, so that messages queued for a subscriber's persistent session survive
    a restart, as they would on a production broker.

    Args:
        workdir: Folder for the configuration, the persistence file and the log.
        extra_conf: Lines added to the configuration (listeners with TLS, password file).
        port: Loopback port; a free one when ``None``.
    """

    def __init__(self, workdir: Path, *, extra_conf: str | None = None, port: int | None = None):
        self.workdir = workdir
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        listener = f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
        self.conf.write_text(
            # mosquitto started as root switches to the user "mosquitto" unless `user` names
            # another, and that user cannot write the persistence file into the test's folder.
            f"user {getpass.getuser()}\n"
            "persistence true\n"
            f"persistence_location {workdir}/\n"
            "log_dest stderr\nlog_type error\nlog_type warning\n"
            "max_queued_messages 0\n" + (extra_conf if extra_conf is not None else listener)
        )
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        """Whether the broker process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start mosquitto and wait until it accepts connections."""
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        with self.log.open("ab") as log:
            self._process = subprocess.Popen([binary, "-c", str(self.conf)], stderr=log)
        _wait_for_port(self.host, self.port, 20)

    def pause(self) -> None:
        """Freeze mosquitto with SIGSTOP: connections stay open, nothing is acknowledged."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused mosquitto run again with SIGCONT."""
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Stop mosquitto with SIGTERM (it saves its persistence file) and wait for the exit."""
        if self._process is not None:
            self._process.send_signal(signal.SIGCONT)
            self._process.terminate()
            self._process.wait(20)
            self._process = None


@pytest.fixture
def broker_process(tmp_path: Path) -> Iterator[BrokerProcess]:
    """A stopped :class:`BrokerProcess` of this test; stopped again at the end if running."""
    folder = tmp_path / "broker"
    folder.mkdir()
    process = BrokerProcess(folder)
    try:
        yield process
    finally:
        process.stop()
