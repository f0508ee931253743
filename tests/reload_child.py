"""`edge run` with a stand-in pipeline that signals its own process, for the reload tests.

Usage: reload_child.py CONFIG

The stand-in's first read sends SIGHUP, so the run stops to reload. Its ``aclose()`` sends
SIGTERM, which lands after the frame loop has handed the signals back, while the run drains.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

from mqtt_helpers import synthetic_result

import edge.cli
import edge.service
from edge.config import Config
from edge.pipeline import DetectedFrame, Pipeline
from edge.results import Frame, FrameResult


class SignallingPipeline:
    """Returns synthetic results and sends SIGHUP at its first read, SIGTERM at its close."""

    reloads_sent = 0

    async def detect(self, frame: Frame) -> DetectedFrame:
        return DetectedFrame(frame, [], 0, time.perf_counter(), time.perf_counter())

    async def read(self, detected: DetectedFrame) -> FrameResult:
        if SignallingPipeline.reloads_sent == 0:
            SignallingPipeline.reloads_sent += 1
            os.kill(os.getpid(), signal.SIGHUP)
        frame = detected.frame
        return synthetic_result(frame.seq, captured_at=frame.captured_at)

    stream = Pipeline.stream
    _take = Pipeline._take

    async def _read(self, detected: DetectedFrame, turn: Any) -> FrameResult:
        # The stage that stream() starts: the stand-in's read, which takes no slot.
        turn.began.set()
        return await self.read(detected)

    async def aclose(self) -> None:
        os.kill(os.getpid(), signal.SIGTERM)


def _build(config: Config) -> SignallingPipeline:
    print(f"pipeline built for device {config.device.id}", file=sys.stderr, flush=True)
    return SignallingPipeline()


if __name__ == "__main__":
    setattr(edge.service, "build_pipeline", _build)  # noqa: B010 (replaces the model loader)
    sys.exit(edge.cli.main(["run", "--config", sys.argv[1], "--stdout"]))
