"""Run-wide fixtures: a real mosquitto broker on a loopback port, topics, schema validation."""

from __future__ import annotations

import json
import os
import re
import shutil
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
