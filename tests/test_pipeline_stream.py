"""Pipeline.stream: each frame is detected while the previous one is read, results stay in order."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import numpy as np

from edge.pipeline import FailedFrame, Pipeline, PipelineOptions
from edge.readers.base import Cancellation, Reader
from edge.results import (
    Box,
    Frame,
    FrameResult,
    Image,
    Reading,
    Region,
    RegionStatus,
    TextLine,
)

#: Seconds a read waits for the next frame's detection before it gives up.
WAIT = 5.0


def _frame(seq: int) -> Frame:
    """A grey frame whose top-left pixel carries its sequence number."""
    image = np.full((120, 160, 3), 200, np.uint8)
    image[0:2, 0:2] = seq
    return Frame(seq, time.time(), image, f"frame-{seq}")


class Journal:
    """Thread-safe record of what the detector and the reader did, in order."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, int]] = []
        self.detected: dict[int, threading.Event] = {}
        self._lock = threading.Lock()

    def add(self, action: str, seq: int) -> None:
        with self._lock:
            self.entries.append((action, seq))
            self.detected.setdefault(seq, threading.Event())
        if action == "detect":
            self.detected[seq].set()

    def event(self, seq: int) -> threading.Event:
        with self._lock:
            return self.detected.setdefault(seq, threading.Event())


class JournalDetector:
    """Returns two fixed regions and journals the frame it detected."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def detect_counted(self, image: Image) -> tuple[list[Region], int]:
        self.journal.add("detect", int(image[0, 0, 0]))
        regions = [Region("text", 0.9, Box(0, 0, 40, 40)), Region("text", 0.9, Box(1, 1, 50, 50))]
        return regions, 0

    def close(self) -> None:
        pass


class WaitingReader(Reader):
    """Reads 'seen' if the next frame is detected while it waits, else 'alone'.

    Only frames below ``wait_below`` wait, for at most ``WAIT`` seconds.
    """

    name = "waiting"
    kind = "thread"
    crop_margin = 0.0

    def __init__(self, journal: Journal, *, wait_below: int) -> None:
        self.journal = journal
        self.wait_below = wait_below

    def read(self, image: Image, cancellation: Cancellation | None = None) -> Reading:
        seq = int(image[0, 0, 0])
        self.journal.add("read start", seq)
        seen = seq < self.wait_below and self.journal.event(seq + 1).wait(WAIT)
        self.journal.add("read end", seq)
        return Reading(lines=(TextLine("seen" if seen else "alone", 1.0),))


def _pipeline(journal: Journal, *, wait_below: int = 0) -> Pipeline:
    reader = WaitingReader(journal, wait_below=wait_below)
    options = PipelineOptions(full_frame_codes="never", reuse_unchanged=False, op_timeout=30)
    return Pipeline(JournalDetector(journal), {"text": reader}, options=options)


async def _collect(pipeline: Pipeline, frames: list[Frame]) -> list[FrameResult | FailedFrame]:
    async with contextlib.aclosing(pipeline.stream(frames)) as results:
        return [item async for item in results]


async def test_stream_detects_during_reads() -> None:
    journal = Journal()
    pipeline = _pipeline(journal, wait_below=3)
    try:
        items = await _collect(pipeline, [_frame(1), _frame(2), _frame(3)])
    finally:
        await pipeline.aclose()
    results = [item for item in items if isinstance(item, FrameResult)]
    assert [result.seq for result in results] == [1, 2, 3]
    # Frames 1 and 2 were read while the frame after them was detected.
    for result in results[:2]:
        assert [r.reading.lines[0].text for r in result.regions] == ["seen", "seen"]
    assert [r.reading.lines[0].text for r in results[2].regions] == ["alone", "alone"]
    assert {r.status for r in results[0].regions} == {RegionStatus.OK}
    assert results[2].timings_ms["queue"] >= 0


async def test_stream_reads_one_frame_at_a_time() -> None:
    journal = Journal()
    pipeline = _pipeline(journal)
    try:
        await _collect(pipeline, [_frame(seq) for seq in (1, 2, 3)])
    finally:
        await pipeline.aclose()
    reads = [(action, seq) for action, seq in journal.entries if action.startswith("read")]
    frames_in_order = [seq for _, seq in reads]
    assert frames_in_order == sorted(frames_in_order)
    assert len(reads) == 12


async def test_stream_failed_frame_in_order() -> None:
    journal = Journal()
    pipeline = _pipeline(journal)
    broken = _frame(2)
    channels_first = Frame(2, broken.captured_at, np.zeros((3, 120, 160), np.uint8), "planar")
    try:
        items = await _collect(pipeline, [_frame(1), channels_first, _frame(3)])
    finally:
        await pipeline.aclose()
    assert [type(item).__name__ for item in items] == ["FrameResult", "FailedFrame", "FrameResult"]
    failed = items[1]
    assert isinstance(failed, FailedFrame)
    assert failed.frame.seq == 2
    assert "channels" in str(failed.error) or "shape" in str(failed.error)


async def test_stream_close_cancels_reads() -> None:
    journal = Journal()
    # Frame 1's reads wait for frame 2, which is detected, so the stream yields frame 1.
    # Frame 2's reads wait for a frame 3 that never comes.
    pipeline = _pipeline(journal, wait_below=3)
    try:
        async with contextlib.aclosing(pipeline.stream([_frame(1), _frame(2)])) as results:
            first = await anext(results)
        pending = [t for t in asyncio.all_tasks() if t.get_name().startswith("edge.frame[")]
    finally:
        await pipeline.aclose()
    assert isinstance(first, FrameResult)
    assert first.seq == 1
    assert pending == []
