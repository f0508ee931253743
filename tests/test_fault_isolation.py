"""Faults injected into the readers: each costs its own region, never the pipeline."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import pytest

from edge.camera.base import Camera
from edge.config import Config
from edge.errors import ImageError, SourceExhausted
from edge.pipeline import Pipeline, PipelineOptions
from edge.readers.base import Cancellation
from edge.readers.codes import CodeReader
from edge.readers.text import TextReader
from edge.results import Box, Frame, FrameResult, Image, Reading, Region, RegionStatus
from edge.service import RunSummary, _FrameLoop
from edge.synth import render_scene

#: Crops whose top-left pixel has this BGR value make the worker abort.
ABORT_MARK = (1, 2, 3)
#: Crops whose top-left pixel has this BGR value make the worker hang.
HANG_MARK = (4, 5, 6)


class FaultyCodeReader(CodeReader):
    """The real zbar reader, which aborts or hangs its worker on marked crops.

    It runs in the WaitGroup's worker process exactly as CodeReader does: the abort stands for
    a zbar assertion failure and the hang for a decoder stuck in a loop.
    """

    def read(self, image: Image, cancellation: Cancellation | None = None) -> Reading:
        mark = tuple(int(v) for v in image[0, 0])
        if mark == ABORT_MARK:
            os.abort()
        if mark == HANG_MARK:
            while True:
                time.sleep(1)
        return super().read(image)


@dataclass
class FixedDetector:
    regions: list[Region]

    def detect_counted(self, image: Image) -> tuple[list[Region], int]:
        return list(self.regions), 0

    def close(self) -> None:
        pass


def _frame_with_faults(seq: int) -> tuple[Frame, list[Region], str]:
    scene = render_scene(np.random.default_rng(41), labels=(0, 0), codes=(1, 1), distortions=False)
    image = scene.image.copy()
    code = scene.objects[0]
    code_box = Box(*(round(v) for v in code.box))
    # Two marked patches away from the code, each detected as a code region.
    image[0:40, 0:40] = ABORT_MARK
    image[0:40, image.shape[1] - 40 :] = HANG_MARK
    regions = [
        Region("qr_code", 0.9, Box(0, 0, 40, 40)),
        Region("qr_code", 0.9, Box(image.shape[1] - 40, 0, 40, 40)),
        Region(code.class_name, 0.9, code_box),
    ]
    return Frame(seq, time.time(), image, "faults"), regions, code.value


async def test_faulty_worker_costs_one_region_each() -> None:
    """An aborting and a hanging decode fail alone; the code is read; later frames flow."""
    frame, regions, payload = _frame_with_faults(0)
    reader = FaultyCodeReader()
    # Margins would move the marked pixel away from the crop's corner.
    reader.crop_margin = 0.0
    options = PipelineOptions(
        concurrency=2,
        op_timeout=3.0,
        frame_deadline=20.0,
        full_frame_codes="never",
        reuse_unchanged=False,
    )
    routes = {"qr_code": reader, "barcode": reader}
    detector = FixedDetector(regions)
    pipeline = Pipeline(detector, routes, options=options)
    try:
        first = await pipeline.process(frame)
        detector.regions = regions[2:]
        second = await pipeline.process(Frame(1, time.time(), frame.image, "faults"))
    finally:
        await pipeline.aclose()
    aborted, hung, good = first.regions
    assert aborted.status is RegionStatus.ERROR
    assert aborted.error is not None
    assert "WorkerDied" in aborted.error
    assert hung.status is RegionStatus.TIMEOUT
    assert good.status is RegionStatus.OK
    assert [c.text for c in good.reading.codes] == [payload]
    assert second.regions[0].status is RegionStatus.OK
    stats = pipeline.decoders.stats()
    assert stats.running == 0


async def test_ocr_timeout_terminates_onnxruntime_run() -> None:
    """An OCR read over its timeout is terminated, so its thread is free for the next frame.

    Text detection of a 2000 x 2000 region at full size takes several seconds on one thread.
    Without termination the thread would run on past the 1 s cancel grace, and the group would
    count it abandoned.
    """
    image = np.full((2000, 2000, 3), 255, dtype=np.uint8)
    region = Region("text", 0.9, Box(0, 0, 2000, 2000))
    reader = TextReader(threads=1, max_side=2048, max_detect_pixels=5_000_000)
    reader.warm_up()
    options = PipelineOptions(
        concurrency=1,
        op_timeout=0.2,
        frame_deadline=20.0,
        full_frame_codes="never",
        reuse_unchanged=False,
    )
    detector = FixedDetector([region])
    pipeline = Pipeline(detector, {"text": reader}, options=options)
    try:
        first = await pipeline.process(Frame(0, time.time(), image, "big"))
        stats = pipeline.group.stats()
        # A blank strip goes straight to the recogniser, one short model run well within
        # the 0.2 s timeout even on a loaded machine.
        detector.regions = [Region("text", 0.9, Box(0, 0, 96, 24))]
        small = np.full((24, 96, 3), 255, dtype=np.uint8)
        second = await pipeline.process(Frame(1, time.time(), small, "small"))
    finally:
        await pipeline.aclose()
    assert first.regions[0].status is RegionStatus.TIMEOUT
    assert stats.abandoned_in_flight == 0
    assert stats.abandoned_finished == 0
    assert second.regions[0].status is RegionStatus.EMPTY


class ListCamera(Camera):
    """Hands over a fixed list of frames, then reports the source exhausted."""

    def __init__(self, frames: list[Frame]) -> None:
        self._frames = list(frames)

    async def open(self) -> None:
        pass

    async def read(self) -> Frame:
        if not self._frames:
            msg = "no more frames"
            raise SourceExhausted(msg)
        return self._frames.pop(0)

    async def close(self) -> None:
        pass

    @property
    def dropped(self) -> int:
        return 0


def _code_scene() -> tuple[Image, Region, str]:
    scene = render_scene(np.random.default_rng(41), labels=(0, 0), codes=(1, 1), distortions=False)
    code = scene.objects[0]
    region = Region(code.class_name, 0.9, Box(*(round(v) for v in code.box)))
    return scene.image, region, code.value


def _strided_view(image: Image) -> Image:
    """Return a view with the same pixels whose columns are two pixels apart in memory."""
    wide = np.zeros((image.shape[0], image.shape[1] * 2, 3), dtype=np.uint8)
    wide[:, ::2] = image
    view = wide[:, ::2]
    assert not view.flags.c_contiguous
    return view


@pytest.mark.parametrize(
    "convert",
    [
        pytest.param(lambda image: image[:, :, 0].copy(), id="grey"),
        pytest.param(
            lambda image: np.dstack([image, np.full(image.shape[:2], 255, np.uint8)]), id="bgra"
        ),
        pytest.param(lambda image: image.astype(np.float32) / 255, id="float"),
        pytest.param(lambda image: image.astype(np.uint16) * 257, id="uint16"),
        pytest.param(lambda image: _strided_view(image), id="non-contiguous"),
    ],
)
async def test_pipeline_converts_frame_formats(convert: object) -> None:
    """Grey, BGRA, float, 16-bit and strided frames read like the 8-bit BGR original."""
    image, region, payload = _code_scene()
    converted = convert(image)  # type: ignore[operator]
    pipeline = Pipeline(
        FixedDetector([region]),
        {"qr_code": CodeReader(), "barcode": CodeReader()},
        options=PipelineOptions(full_frame_codes="never", reuse_unchanged=False),
    )
    try:
        result = await pipeline.process(Frame(0, time.time(), converted, "converted"))
    finally:
        await pipeline.aclose()
    assert result.regions[0].status is RegionStatus.OK
    assert [code.text for code in result.regions[0].reading.codes] == [payload]


@pytest.mark.parametrize("shape", [(0, 0), (0, 640, 4), (480, 0, 3)], ids=["grey", "bgra", "bgr"])
async def test_pipeline_empty_frame_rejected(shape: tuple[int, ...]) -> None:
    pipeline = Pipeline(FixedDetector([]), {}, options=PipelineOptions())
    try:
        with pytest.raises(ImageError, match="empty image"):
            await pipeline.process(Frame(0, time.time(), np.zeros(shape, np.uint8), "empty"))
    finally:
        await pipeline.aclose()


async def test_pipeline_channels_first_frame_rejected() -> None:
    image, region, _ = _code_scene()
    channels_first = np.ascontiguousarray(image.transpose(2, 0, 1))
    pipeline = Pipeline(FixedDetector([region]), {}, options=PipelineOptions())
    try:
        with pytest.raises(ImageError, match=r"shape \(3, "):
            await pipeline.process(Frame(0, time.time(), channels_first, "planar"))
    finally:
        await pipeline.aclose()


async def test_service_skips_failed_frame(caplog: pytest.LogCaptureFixture) -> None:
    """A frame the pipeline rejects is logged and skipped; the frames after it are processed."""
    image, region, payload = _code_scene()
    channels_first = np.ascontiguousarray(image.transpose(2, 0, 1))
    camera = ListCamera(
        [
            Frame(0, time.time(), image, "good"),
            Frame(1, time.time(), channels_first, "planar"),
            Frame(2, time.time(), image, "good"),
        ]
    )
    pipeline = Pipeline(
        FixedDetector([region]),
        {"qr_code": CodeReader(), "barcode": CodeReader()},
        options=PipelineOptions(full_frame_codes="never", reuse_unchanged=False),
    )
    results: list[FrameResult] = []
    summary = RunSummary()
    frame_loop = _FrameLoop(
        Config(), camera, pipeline, None, summary, max_frames=None, stdout=False,
        observe=results.append,
    )  # fmt: skip
    try:
        with caplog.at_level(logging.ERROR, logger="edge.service"):
            await frame_loop.run_until_stopped()
    finally:
        await pipeline.aclose()
    assert [result.seq for result in results] == [0, 2]
    assert summary.frames == 2
    assert summary.failed_frames == 1
    assert "frame 1 skipped" in caplog.text
    assert [c.text for c in results[1].regions[0].reading.codes] == [payload]
