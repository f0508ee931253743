"""Frames in flight: Pipeline.stream and the daemon's frame loop that drives it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest
from test_fault_isolation import ListCamera

from edge.config import Config
from edge.errors import CameraError
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
from edge.service import RunSummary, _FrameLoop

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


def _pipeline(journal: Journal, *, wait_below: int = 0, concurrency: int = 2) -> Pipeline:
    reader = WaitingReader(journal, wait_below=wait_below)
    options = PipelineOptions(
        concurrency=concurrency, full_frame_codes="never", reuse_unchanged=False, op_timeout=30
    )
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
    assert len(results) == len(items)
    assert [result.seq for result in results] == [1, 2, 3]
    # Frames 1 and 2 were read while the frame after them was detected.
    for result in results[:2]:
        assert [r.reading.lines[0].text for r in result.regions] == ["seen", "seen"]
    assert [r.reading.lines[0].text for r in results[2].regions] == ["alone", "alone"]
    assert {r.status for r in results[0].regions} == {RegionStatus.OK}
    # Frame 3 was detected while frame 2 was read, so it waited for those reads.
    assert results[2].timings_ms["queue"] > 0


async def test_stream_starts_reads_in_frame_order() -> None:
    journal = Journal()
    # With two slots, a read's thread may log its start after the next read's thread. With
    # one, frame 1's first read holds it until frame 2 is detected, so frame 2's reads queue
    # behind frame 1's second read.
    pipeline = _pipeline(journal, wait_below=2, concurrency=1)
    try:
        await _collect(pipeline, [_frame(seq) for seq in (1, 2, 3)])
    finally:
        await pipeline.aclose()
    starts = [seq for action, seq in journal.entries if action == "read start"]
    assert starts == [1, 1, 2, 2, 3, 3]
    assert sum(action == "read end" for action, _ in journal.entries) == 6


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
    assert "shape (3, 120, 160)" in str(failed.error)


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


async def test_stream_yields_before_next_frame() -> None:
    """A result comes out while the source still waits for its next frame."""
    journal = Journal()
    pipeline = _pipeline(journal)
    release = asyncio.Event()

    async def camera() -> AsyncIterator[Frame]:
        yield _frame(1)
        await release.wait()
        yield _frame(2)

    try:
        async with contextlib.aclosing(pipeline.stream(camera())) as results:
            first = await asyncio.wait_for(anext(results), WAIT)
            release.set()
            rest = [item async for item in results]
    finally:
        await pipeline.aclose()
    assert isinstance(first, FrameResult)
    assert first.seq == 1
    assert [item.seq for item in rest if isinstance(item, FrameResult)] == [2]


class SlowDetector(JournalDetector):
    """Detects frame 2 only once ``release`` is set, or after ``WAIT`` seconds."""

    def __init__(self, journal: Journal) -> None:
        super().__init__(journal)
        self.release = threading.Event()

    def detect_counted(self, image: Image) -> tuple[list[Region], int]:
        found = super().detect_counted(image)
        if int(image[0, 0, 0]) == 2:
            self.release.wait(WAIT)
        self.journal.add("detect end", int(image[0, 0, 0]))
        return found


async def test_stream_yields_during_next_detection() -> None:
    """A result comes out while the next frame is still being detected."""
    journal = Journal()
    detector = SlowDetector(journal)
    options = PipelineOptions(full_frame_codes="never", reuse_unchanged=False, op_timeout=30)
    reader = WaitingReader(journal, wait_below=0)
    pipeline = Pipeline(detector, {"text": reader}, options=options)
    try:
        async with contextlib.aclosing(pipeline.stream([_frame(1), _frame(2)])) as results:
            first = await anext(results)
            journal.add("result", 1)
            detector.release.set()
            rest = [item async for item in results]
    finally:
        await pipeline.aclose()
    assert isinstance(first, FrameResult)
    assert first.seq == 1
    assert [item.seq for item in rest if isinstance(item, FrameResult)] == [2]
    assert journal.entries.index(("result", 1)) < journal.entries.index(("detect end", 2))


async def test_stream_stop_cuts_frame_wait() -> None:
    """A stop ends the stream while the source still waits for a frame, none is detected."""
    journal = Journal()
    pipeline = _pipeline(journal)
    stop = asyncio.Event()

    async def camera() -> AsyncIterator[Frame]:
        yield _frame(1)
        await asyncio.Event().wait()
        yield _frame(2)

    try:
        async with contextlib.aclosing(pipeline.stream(camera(), stop=stop)) as results:
            first = await anext(results)
            stop.set()
            rest = await asyncio.wait_for(_drain(results), WAIT)
    finally:
        await pipeline.aclose()
    assert isinstance(first, FrameResult)
    assert rest == []
    assert [seq for action, seq in journal.entries if action == "detect"] == [1]


async def _drain(results: AsyncIterator[FrameResult | FailedFrame]) -> list[object]:
    return [item async for item in results]


async def test_stream_source_error_after_result() -> None:
    """A camera error propagates, but only after the frame already in flight comes out."""
    journal = Journal()
    pipeline = _pipeline(journal)

    async def camera() -> AsyncIterator[Frame]:
        yield _frame(1)
        raise CameraError("camera stalled")

    items: list[FrameResult | FailedFrame] = []

    async def collect() -> None:
        async with contextlib.aclosing(pipeline.stream(camera())) as results:
            async for item in results:
                items.append(item)

    try:
        with pytest.raises(CameraError, match="camera stalled"):
            await collect()
    finally:
        await pipeline.aclose()
    assert [item.seq for item in items if isinstance(item, FrameResult)] == [1]


class StoppingReader(WaitingReader):
    """Sets ``stop`` from its read of frame 1, once frame 2 has been detected."""

    def __init__(self, journal: Journal, stop: asyncio.Event) -> None:
        super().__init__(journal, wait_below=0)
        self.stop = stop
        self.loop = asyncio.get_running_loop()

    def read(self, image: Image, cancellation: Cancellation | None = None) -> Reading:
        if int(image[0, 0, 0]) == 1 and self.journal.event(2).wait(WAIT):
            self.loop.call_soon_threadsafe(self.stop.set)
        return super().read(image, cancellation)


async def test_stream_stop_drops_unread_frame(caplog: pytest.LogCaptureFixture) -> None:
    journal = Journal()
    stop = asyncio.Event()
    options = PipelineOptions(full_frame_codes="never", reuse_unchanged=False, op_timeout=30)
    reader = StoppingReader(journal, stop)
    pipeline = Pipeline(JournalDetector(journal), {"text": reader}, options=options)
    frames = [_frame(seq) for seq in (1, 2, 3)]
    try:
        with caplog.at_level(logging.INFO, logger="edge.pipeline"):
            async with contextlib.aclosing(pipeline.stream(frames, stop=stop)) as results:
                items = [item async for item in results]
    finally:
        await pipeline.aclose()
    assert [item.seq for item in items if isinstance(item, FrameResult)] == [1]
    assert len(items) == 1
    assert ("detect", 2) in journal.entries
    assert ("read start", 2) not in journal.entries
    assert ("detect", 3) not in journal.entries
    assert "frame 2 dropped" in caplog.text


class UnevenReader(WaitingReader):
    """Reads crops wider than 45 pixels slowly and the others at once."""

    def read(self, image: Image, cancellation: Cancellation | None = None) -> Reading:
        seq = int(image[0, 0, 0])
        self.journal.add("read start", seq)
        time.sleep(0.3 if image.shape[1] > 45 else 0.0)
        self.journal.add("read end", seq)
        return Reading()


async def test_next_frame_reads_fill_free_slots() -> None:
    """Frame 2's reads start once all of frame 1's have, in the slot its fast read frees."""
    journal = Journal()
    options = PipelineOptions(full_frame_codes="never", reuse_unchanged=False, op_timeout=30)
    reader = UnevenReader(journal, wait_below=0)
    pipeline = Pipeline(JournalDetector(journal), {"text": reader}, options=options)
    try:
        first, second = await asyncio.gather(
            pipeline.process(_frame(1)), pipeline.process(_frame(2))
        )
    finally:
        await pipeline.aclose()
    reads = [entry for entry in journal.entries if entry[0].startswith("read")]
    assert [seq for action, seq in reads if action == "read start"] == [1, 1, 2, 2]
    # Frame 2's slow read started while frame 1's slow read still ran.
    last_end_of_first = max(i for i, entry in enumerate(reads) if entry == ("read end", 1))
    assert reads.index(("read start", 2)) < last_end_of_first
    assert first.seq == 1
    assert second.seq == 2


def _stop_loop_from_read(frame_loop: list[_FrameLoop]) -> Callable[[], None]:
    loop = asyncio.get_running_loop()

    def request_stop() -> None:
        loop.call_soon_threadsafe(frame_loop[0]._request_stop, signal.SIGTERM)

    return request_stop


class StopRequestingReader(WaitingReader):
    """Requests a stop of the frame loop from its read of frame 1, then goes on reading."""

    def __init__(self, journal: Journal, request_stop: Callable[[], None]) -> None:
        super().__init__(journal, wait_below=0)
        self.request_stop = request_stop

    def read(self, image: Image, cancellation: Cancellation | None = None) -> Reading:
        if int(image[0, 0, 0]) == 1 and self.journal.event(2).wait(WAIT):
            self.request_stop()
            time.sleep(0.2)
        return super().read(image, cancellation)


async def test_frame_loop_stop_publishes_frame_being_read() -> None:
    journal = Journal()
    holder: list[_FrameLoop] = []
    options = PipelineOptions(full_frame_codes="never", reuse_unchanged=False, op_timeout=30)
    reader = StopRequestingReader(journal, _stop_loop_from_read(holder))
    pipeline = Pipeline(JournalDetector(journal), {"text": reader}, options=options)
    camera = ListCamera([_frame(seq) for seq in (1, 2, 3)])
    published: list[FrameResult] = []
    summary = RunSummary()
    frame_loop = _FrameLoop(
        Config(), camera, pipeline, None, summary, max_frames=None, stdout=False,
        observe=published.append,
    )  # fmt: skip
    holder.append(frame_loop)
    try:
        await frame_loop.run_until_stopped()
    finally:
        await pipeline.aclose()
    assert [result.seq for result in published] == [1]
    assert summary.frames == 1
    # Frame 2 was detected before the stop, and dropped before its reads began.
    assert ("detect", 2) in journal.entries
    assert ("read start", 2) not in journal.entries


async def test_frame_loop_second_reload_rereads_file(tmp_path: Path) -> None:
    """A SIGHUP during a reload reads the file again, and the newest valid file wins."""
    config_path = tmp_path / "edge.toml"
    config_path.write_text('[device]\nid = "first"\n')
    summary = RunSummary()
    frame_loop = _FrameLoop(
        Config(), ListCamera([]), _pipeline(Journal()), None, summary, max_frames=None,
        stdout=False, config_path=config_path,
    )  # fmt: skip
    frame_loop._request_reload()
    first = summary.reload_config
    config_path.write_text('[device]\nid = "second"\n')
    frame_loop._request_reload()
    config_path.write_text("[mqtt]\nport = 0\n")
    frame_loop._request_reload()
    assert first is not None
    assert first.device.id == "first"
    assert summary.reload_config is not None
    assert summary.reload_config.device.id == "second"
