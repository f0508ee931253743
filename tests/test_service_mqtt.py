"""The service's MQTT side: frames, events, stats, availability and discovery from `run_service`.

The detector is replaced by a stand-in pipeline that returns synthetic results, so these tests
need no trained model. The simulated camera, the publisher and the broker are real.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Broker, free_port
from mqtt_helpers import Received, Recorder, synthetic_result
from test_delivery import _invalid

import edge.service
from edge.config import (
    CameraConfig,
    Config,
    DeviceConfig,
    MqttConfig,
    OutboxConfig,
    TrackerConfig,
)
from edge.outbox import Outbox
from edge.pipeline import DetectedFrame, Pipeline
from edge.results import Frame, FrameResult

SAMPLE_FRAMES = 6


class _StandInPipeline:
    """Returns a synthetic result per frame after a short pause, like a fast detector."""

    async def detect(self, frame: Frame) -> DetectedFrame:
        return DetectedFrame(frame, [], 0, time.perf_counter(), time.perf_counter())

    async def read(self, detected: DetectedFrame) -> FrameResult:
        await asyncio.sleep(0.05)
        frame = detected.frame
        return synthetic_result(frame.seq, captured_at=frame.captured_at)

    # The real pipeline's driver, over the stand-in's two stages.
    stream = Pipeline.stream
    _take = Pipeline._take

    async def _read(self, detected: DetectedFrame, turn: Any) -> FrameResult:
        # The stage that stream() starts: the stand-in's read, which takes no slot.
        turn.began.set()
        return await self.read(detected)

    async def aclose(self) -> None:
        return None


@pytest.fixture
def stand_in_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes run_service use the stand-in pipeline instead of loading models."""
    monkeypatch.setattr(edge.service, "build_pipeline", lambda config: _StandInPipeline())


def _config(tmp_path: Path, port: int, prefix: str) -> Config:
    return Config(
        device=DeviceConfig(id="svc-pi"),
        camera=CameraConfig(fps=0),
        mqtt=MqttConfig(
            host="127.0.0.1",
            port=port,
            topic_prefix=prefix,
            stats_interval=0.1,
            discovery=True,
            discovery_prefix=f"{prefix}/ha",
        ),
        outbox=OutboxConfig(path=tmp_path / "outbox.sqlite3"),
        tracker=TrackerConfig(seen_again_interval=3600, gone_after=3600),
    )


def _payloads(messages: list[Received]) -> list[dict[str, object]]:
    return [json.loads(m.payload) for m in messages]


@pytest.mark.broker
@pytest.mark.usefixtures("stand_in_pipeline")
async def test_service_publishes_valid_messages(
    tmp_path: Path, broker: Broker, topic_prefix: str
) -> None:
    """A run publishes frames, events and stats that all match their schemas, then stopped."""
    recorder = await asyncio.to_thread(Recorder, broker.host, broker.port, f"{topic_prefix}/#")
    summary = await edge.service.run_service(_config(tmp_path, broker.port, topic_prefix))
    await asyncio.to_thread(
        recorder.wait_for,
        lambda: bool(recorder.on("/status")[-1:]) and len(recorder.on("/frames")) >= SAMPLE_FRAMES,
        60,
    )
    await asyncio.to_thread(recorder.close)

    events = _payloads(recorder.on("/events"))
    kinds = [event["event"] for event in events]
    print(
        f"service run: {summary.frames} frames, {len(recorder.on('/frames'))} frame messages, "
        f"{len(events)} events, {len(recorder.on('/stats'))} stats messages"
    )
    assert summary.frames == SAMPLE_FRAMES
    assert len(recorder.on("/frames")) == SAMPLE_FRAMES
    assert _invalid(recorder.on("/frames"), "frame") == []
    assert _invalid(recorder.on("/events"), "events") == []
    assert _invalid(recorder.on("/stats"), "stats") == []
    assert kinds.count("first_seen") == SAMPLE_FRAMES + 1
    assert kinds.count("gone") == SAMPLE_FRAMES + 1
    assert [m.payload for m in recorder.on("/status")] == [b"online", b"stopped"]
    assert len(recorder.on("/svc-pi/last_code")) == SAMPLE_FRAMES
    assert len(recorder.on("/svc-pi/tag")) == SAMPLE_FRAMES
    assert len(recorder.on("/config")) == 3


@pytest.mark.usefixtures("stand_in_pipeline")
async def test_service_without_broker_keeps_results(tmp_path: Path, topic_prefix: str) -> None:
    """With no broker, a run ends promptly and leaves its frames and events in the outbox."""
    config = _config(tmp_path, free_port(), topic_prefix)
    summary = await edge.service.run_service(config)
    box = Outbox(tmp_path / "outbox.sqlite3")
    topics = [row.topic for row in box.fetch(0, 1000)]
    box.close()
    assert summary.frames == SAMPLE_FRAMES
    assert topics.count(f"{topic_prefix}/svc-pi/frames") == SAMPLE_FRAMES
    assert topics.count(f"{topic_prefix}/svc-pi/events") == 2 * (SAMPLE_FRAMES + 1)
