"""Faults injected into the readers: each costs its own region, never the pipeline."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from edge.pipeline import Pipeline, PipelineOptions
from edge.readers.base import Cancellation
from edge.readers.codes import CodeReader
from edge.readers.text import TextReader
from edge.results import Box, Frame, Image, Reading, Region, RegionStatus
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
    stats = pipeline.group.stats()
    assert stats.running == 0


async def test_ocr_timeout_terminates_onnxruntime_run() -> None:
    """An OCR read over its timeout is terminated, so its thread is free for the next frame.

    Detection of a 1280 x 1280 region takes seconds on one thread. Without termination the
    thread would run on past the 1 s cancel grace, and the group would count it abandoned.
    """
    image = np.full((1280, 1280, 3), 255, dtype=np.uint8)
    region = Region("text", 0.9, Box(0, 0, 1280, 1280))
    reader = TextReader(threads=1)
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
        detector.regions = [Region("text", 0.9, Box(0, 0, 200, 200))]
        small = np.full((200, 200, 3), 255, dtype=np.uint8)
        second = await pipeline.process(Frame(1, time.time(), small, "small"))
    finally:
        await pipeline.aclose()
    assert first.regions[0].status is RegionStatus.TIMEOUT
    assert stats.abandoned_in_flight == 0
    assert stats.abandoned_finished == 0
    assert second.regions[0].status is RegionStatus.EMPTY
