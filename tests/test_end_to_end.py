"""The daemon as a user runs it: `edge run` and `edge scan` in a subprocess, real broker."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import cv2
import jsonschema
import paho.mqtt.client as mqtt
import pytest
from conftest import CORPUS, REPO, Broker, free_port
from paho.mqtt.enums import CallbackAPIVersion

SAMPLES = REPO / "edge" / "samples"
EXPECTED = json.loads((SAMPLES / "expected.json").read_text("utf-8"))


class Subscriber:
    """Collects every message under a topic prefix on a background paho loop."""

    def __init__(self, broker: Broker, prefix: str) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sub-{os.getpid()}")
        self._client.on_connect = lambda c, *_: c.subscribe(f"{prefix}/#", qos=1)
        self._client.on_subscribe = lambda *_: self._subscribed.set()
        self._client.on_message = self._on_message
        self._client.connect(broker.host, broker.port)
        self._client.loop_start()
        assert self._subscribed.wait(10), "subscription not acknowledged"

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload), msg.retain))

    def on(self, suffix: str) -> list[bytes]:
        with self._lock:
            return [payload for topic, payload, _ in self.messages if topic.endswith(suffix)]

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@pytest.fixture
def subscriber(broker: Broker, topic_prefix: str) -> Iterator[Subscriber]:
    sub = Subscriber(broker, topic_prefix)
    yield sub
    sub.close()


def _edge(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=REPO,
    )


def _config(tmp_path: Path, broker_port: int, prefix: str, extra: str = "") -> Path:
    path = tmp_path / "edge.toml"
    path.write_text(
        f'[device]\nid = "test-pi"\n'
        f'[camera]\nkind = "simulated"\npath = "{SAMPLES}"\nfps = 0\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {broker_port}\ntopic_prefix = "{prefix}"\n'
        f"{extra}"
    )
    return path


@pytest.mark.broker
def test_run_publishes_valid_frames(
    tmp_path: Path,
    broker: Broker,
    topic_prefix: str,
    subscriber: Subscriber,
    frame_validator: jsonschema.Draft202012Validator,
) -> None:
    """`edge run` on the samples publishes one valid frame message per sample, then `stopped`."""
    config = _config(tmp_path, broker.port, topic_prefix)
    completed = _edge("run", "--config", str(config))
    assert completed.returncode == 0, completed.stderr
    frames = [json.loads(p) for p in subscriber.on("/test-pi/frames")]
    assert len(frames) == len(EXPECTED["frames"])
    for payload in frames:
        frame_validator.validate(payload)
    assert [f["frame"]["seq"] for f in frames] == list(range(len(frames)))
    assert subscriber.on("/test-pi/status")[-1] == b"stopped"


@pytest.mark.broker
def test_run_reads_sample_codes(
    tmp_path: Path, broker: Broker, topic_prefix: str, subscriber: Subscriber
) -> None:
    """The published results carry the payloads of the codes drawn in the sample frames."""
    config = _config(tmp_path, broker.port, topic_prefix)
    completed = _edge("run", "--config", str(config))
    assert completed.returncode == 0, completed.stderr
    read = {
        code["text"]
        for payload in subscriber.on("/frames")
        for region in json.loads(payload)["regions"]
        for code in region["codes"]
    }
    drawn = {
        obj["value"]
        for frame in EXPECTED["frames"]
        for obj in frame["objects"]
        if obj["class"] != "text"
    }
    missed = drawn - read
    assert len(missed) <= len(drawn) // 10, f"codes not read: {sorted(missed)}"


def test_run_without_broker_finishes(tmp_path: Path, topic_prefix: str) -> None:
    """With no broker listening, `edge run` still processes every frame and exits 0."""
    config = _config(tmp_path, free_port(), topic_prefix)
    completed = _edge("run", "--config", str(config), "--stdout", "--max-frames", "2")
    assert completed.returncode == 0, completed.stderr
    assert len(completed.stdout.splitlines()) == 2
    assert "not reachable" in completed.stderr


def test_scan_prints_valid_results(frame_validator: jsonschema.Draft202012Validator) -> None:
    """`edge scan FOLDER` prints one valid JSON result per image, with the file as source."""
    completed = _edge("scan", str(SAMPLES))
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert len(lines) == len(EXPECTED["frames"])
    for line in lines:
        frame_validator.validate(json.loads(line))
    assert json.loads(lines[0])["frame"]["source"].endswith("frame-000.jpg")


def test_scan_missing_file_exits_nonzero(tmp_path: Path) -> None:
    """A missing path exits non-zero with a message naming it, before any model loads."""
    completed = _edge("scan", str(tmp_path / "nope.jpg"))
    assert completed.returncode != 0
    assert "nope.jpg" in completed.stderr


def test_scan_corrupt_image_skipped(tmp_path: Path) -> None:
    """A corrupt image is reported and skipped; the good one is still read; exit status 1."""
    (tmp_path / "a-broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (tmp_path / "b-good.jpg").write_bytes((SAMPLES / "frame-000.jpg").read_bytes())
    completed = _edge("scan", str(tmp_path))
    assert completed.returncode == 1
    assert "a-broken.jpg" in completed.stderr
    assert len(completed.stdout.splitlines()) == 1


RECEIPT = CORPUS / "sroie2019" / "img" / "150.jpg"


@pytest.mark.skipif(not RECEIPT.exists(), reason="the SROIE receipts of the corpus are not present")
def test_scan_reads_a_receipt_whole(tmp_path: Path) -> None:
    """A receipt scan is read as one document, and its footer, outside every text box, is read.

    The default detector's text boxes cover 66% of this receipt, but leave out its footer
    under the barcode.
    """
    no_documents = tmp_path / "edge.toml"
    no_documents.write_text("[pipeline]\ndocument_share = 0\n")

    def scan(*config: str) -> tuple[list[dict[str, object]], str]:
        completed = _edge("scan", *config, str(RECEIPT))
        assert completed.returncode == 0, completed.stderr
        regions = json.loads(completed.stdout)["regions"]
        texts = [r for r in regions if r["class"] == "text"]
        return texts, " ".join(line["text"] for r in texts for line in r["lines"]).lower()

    texts, whole = scan()
    parts, in_boxes = scan("--config", str(no_documents))

    image = cv2.imread(str(RECEIPT))
    assert image is not None
    height, width = image.shape[:2]
    assert [(r["origin"], r["box"]) for r in texts] == [("document", [0, 0, width, height])]
    assert "come again" in whole
    assert {r["origin"] for r in parts} == {"detector"}
    assert "come again" not in in_boxes


def test_run_bad_config_names_key(tmp_path: Path) -> None:
    """An invalid configuration value exits 2 with the key path in the message."""
    path = tmp_path / "edge.toml"
    path.write_text("[mqtt]\nport = 0\n")
    completed = _edge("run", "--config", str(path))
    assert completed.returncode == 2
    assert "mqtt.port" in completed.stderr


def test_check_config_accepts_example() -> None:
    """The example configuration shipped in systemd/ is valid."""
    completed = _edge("check-config", str(REPO / "systemd" / "edge.example.toml"))
    assert completed.returncode == 0, completed.stderr


def test_opencv_is_headless_build() -> None:
    """cv2 comes from opencv-python-headless, so it imports without libGL on Pi OS Lite."""
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.distribution("opencv-python")
    assert importlib.metadata.distribution("opencv-python-headless").version
    gui = [line for line in cv2.getBuildInformation().splitlines() if "GUI:" in line]
    assert gui
    assert "NONE" in gui[0].upper()
