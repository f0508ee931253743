"""Pipeline: routing, fault isolation, timeouts and the full-frame code fallback.

The detector here is an oracle that returns the true boxes of a generated scene, so these tests
check the pipeline's own logic; the real detector runs in test_end_to_end.py.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from edge.pipeline import Pipeline, PipelineOptions, _union_area
from edge.readers.base import Cancellation, Reader
from edge.readers.codes import CodeReader, decode_codes
from edge.readers.text import TextReader
from edge.results import Box, Frame, Image, Origin, Reading, Region, RegionStatus, TextLine
from edge.synth import Scene, render_scene


@dataclass
class OracleDetector:
    """Returns fixed regions, whatever the image."""

    regions: list[Region]

    def detect_counted(self, image: Image) -> tuple[list[Region], int]:
        return list(self.regions), 0

    def close(self) -> None:
        pass


def _regions(scene: Scene) -> list[Region]:
    return [Region(o.class_name, 0.9, Box(*(round(v) for v in o.box))) for o in scene.objects]


def _scene(seed: int, *, labels: tuple[int, int], codes: tuple[int, int]) -> Scene:
    return render_scene(np.random.default_rng(seed), labels=labels, codes=codes, distortions=False)


def _frame(scene: Scene, seq: int = 0) -> Frame:
    return Frame(seq=seq, captured_at=time.time(), image=scene.image, source="synthetic")


class SleepingReader(Reader):
    """A thread reader that sleeps for a given time, then finds nothing."""

    name = "sleepy"
    kind = "thread"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def read(self, image: Image, cancellation: Cancellation | None = None) -> Reading:
        time.sleep(self.seconds)
        return Reading()


class FailingReader(Reader):
    """A thread reader that raises on crops wider than a threshold."""

    name = "failing"
    kind = "thread"

    def read(self, image: Image, cancellation: Cancellation | None = None) -> Reading:
        msg = f"cannot read a {image.shape[1]} px wide crop"
        raise ValueError(msg)


class AbortingReader(Reader):
    """A process reader that kills its worker process on every read, as a zbar abort does."""

    name = "aborting"
    kind = "process"

    def read(self, image: Image, cancellation: Cancellation | None = None) -> Reading:
        os.abort()


@pytest.fixture
def code_reader() -> CodeReader:
    return CodeReader()


@pytest.fixture(scope="module")
def text_reader() -> Iterator[TextReader]:
    reader = TextReader()
    reader.warm_up()
    yield reader
    reader.close()


async def test_pipeline_reads_codes_and_text(
    code_reader: CodeReader, text_reader: TextReader
) -> None:
    """Each region goes to its reader; codes decode to their payload and text lines are read."""
    scene = _scene(3, labels=(1, 1), codes=(2, 2))
    routes: dict[str, Reader] = {
        "text": text_reader,
        "qr_code": code_reader,
        "barcode": code_reader,
    }
    pipeline = Pipeline(OracleDetector(_regions(scene)), routes, code_reader=code_reader)
    try:
        result = await pipeline.process(_frame(scene))
    finally:
        await pipeline.aclose()
    expected_codes = {o.value for o in scene.objects if o.class_name != "text"}
    read_codes = {c.text for r in result.regions for c in r.reading.codes}
    assert read_codes == expected_codes
    text_regions = [r for r in result.regions if r.region.class_name == "text"]
    assert [r.status for r in text_regions] == [RegionStatus.OK]
    # PP-OCR's recogniser often drops the spaces of small print, so words are looked up in
    # the read text with its spaces removed.
    read_text = "".join(line.text for line in text_regions[0].reading.lines).lower()
    expected_words = next(o.value for o in scene.objects if o.class_name == "text").lower().split()
    found = sum(1 for word in expected_words if word in read_text.replace(" ", ""))
    assert found >= len(expected_words) // 2


async def test_pipeline_code_boxes_in_frame_pixels(code_reader: CodeReader) -> None:
    """Code boxes from a crop are shifted into frame coordinates, inside their region."""
    scene = _scene(5, labels=(0, 0), codes=(1, 1))
    regions = _regions(scene)
    pipeline = Pipeline(OracleDetector(regions), {regions[0].class_name: code_reader})
    try:
        result = await pipeline.process(_frame(scene))
    finally:
        await pipeline.aclose()
    code_box = result.regions[0].reading.codes[0].box
    region_box = regions[0].box
    assert code_box is not None
    assert region_box.x - 20 <= code_box.x <= region_box.x + region_box.w
    assert region_box.y - 20 <= code_box.y <= region_box.y + region_box.h


async def test_pipeline_failing_reader_costs_one_region(code_reader: CodeReader) -> None:
    """A reader that raises marks its own regions as error; code regions are still read."""
    scene = _scene(7, labels=(2, 2), codes=(1, 1))
    routes: dict[str, Reader] = {
        "text": FailingReader(),
        "qr_code": code_reader,
        "barcode": code_reader,
    }
    pipeline = Pipeline(OracleDetector(_regions(scene)), routes)
    try:
        result = await pipeline.process(_frame(scene))
    finally:
        await pipeline.aclose()
    text = [r for r in result.regions if r.region.class_name == "text"]
    codes = [r for r in result.regions if r.region.class_name != "text"]
    assert {r.status for r in text} == {RegionStatus.ERROR}
    assert all(r.error and "ValueError" in r.error for r in text)
    assert {r.status for r in codes} == {RegionStatus.OK}


async def test_pipeline_slow_reader_times_out_and_next_frame_flows() -> None:
    """A read over op_timeout reports timeout at the timeout; the next frame is processed."""
    scene = _scene(9, labels=(1, 1), codes=(0, 0))
    reader = SleepingReader(1.5)
    options = PipelineOptions(
        concurrency=2, op_timeout=0.2, frame_deadline=5.0, full_frame_codes="never"
    )
    pipeline = Pipeline(OracleDetector(_regions(scene)), {"text": reader}, options=options)
    try:
        started = time.perf_counter()
        first = await pipeline.process(_frame(scene, 0))
        first_seconds = time.perf_counter() - started
        reader.seconds = 0.0
        second = await pipeline.process(_frame(scene, 1))
    finally:
        await pipeline.aclose()
    assert first.regions[0].status is RegionStatus.TIMEOUT
    assert first_seconds < 1.2
    assert second.regions[0].status is RegionStatus.EMPTY


class BlockingReader(Reader):
    """A cancellable thread reader that blocks until its read is cancelled."""

    name = "blocking"
    kind = "thread"
    cancellable = True

    def __init__(self) -> None:
        self.cancelled = 0

    def read(self, image: Image, cancellation: Cancellation | None = None) -> Reading:
        assert cancellation is not None
        stopped = threading.Event()
        with cancellation.registered(stopped.set):
            if not stopped.wait(30):
                return Reading()
        self.cancelled += 1
        cancellation.raise_if_cancelled()
        return Reading()


async def test_pipeline_frame_deadline_ends_frame() -> None:
    """At the frame deadline, running reads time out and queued reads are not started."""
    scene = _scene(15, labels=(3, 3), codes=(0, 0))
    reader = BlockingReader()
    options = PipelineOptions(
        concurrency=2, op_timeout=30.0, frame_deadline=0.3, full_frame_codes="never"
    )
    pipeline = Pipeline(OracleDetector(_regions(scene)), {"text": reader}, options=options)
    try:
        started = time.perf_counter()
        first = await pipeline.process(_frame(scene, 0))
        seconds = time.perf_counter() - started
    finally:
        await pipeline.aclose()
    errors = sorted(r.error or "" for r in first.regions)
    assert {r.status for r in first.regions} == {RegionStatus.TIMEOUT}
    assert errors[0] == "not started before the frame deadline"
    assert all("(frame deadline)" in error for error in errors[1:])
    assert reader.cancelled == 2
    assert seconds < 5.0


async def test_pipeline_crashing_process_reader_costs_one_region(code_reader: CodeReader) -> None:
    """A process reader whose worker aborts yields error for its region; the rest is published."""
    scene = _scene(11, labels=(1, 1), codes=(1, 1))
    routes: dict[str, Reader] = {
        "text": AbortingReader(),
        "qr_code": code_reader,
        "barcode": code_reader,
    }
    options = PipelineOptions(op_timeout=10.0, frame_deadline=20.0, full_frame_codes="never")
    pipeline = Pipeline(OracleDetector(_regions(scene)), routes, options=options)
    try:
        first = await pipeline.process(_frame(scene, 0))
        second = await pipeline.process(_frame(scene, 1))
    finally:
        await pipeline.aclose()
    for result in (first, second):
        statuses = {r.region.class_name: r.status for r in result.regions}
        assert statuses["text"] is RegionStatus.ERROR
        assert {s for c, s in statuses.items() if c != "text"} == {RegionStatus.OK}


async def test_pipeline_full_frame_fallback_when_nothing_detected(code_reader: CodeReader) -> None:
    """With no detection at all, codes in the frame are still found by the full-frame decode."""
    scene = _scene(13, labels=(0, 0), codes=(2, 2))
    pipeline = Pipeline(OracleDetector([]), {"qr_code": code_reader}, code_reader=code_reader)
    try:
        result = await pipeline.process(_frame(scene))
    finally:
        await pipeline.aclose()
    assert {r.origin for r in result.regions} == {Origin.FULL_FRAME}
    assert {c.text for r in result.regions for c in r.reading.codes} == {
        o.value for o in scene.objects
    }


class RecordingTextReader(Reader):
    """A text reader that records the shape of every crop and reads one line from each."""

    name = "text"
    crop_margin = 0.0

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def read(self, image: Image, cancellation: Cancellation | None = None) -> Reading:
        self.shapes.append(image.shape)
        return Reading(lines=(TextLine("TOTAL 12.50", 0.9, Box(10, 20, 60, 12)),))


def _document_pipeline(
    scene: Scene, detected: list[Region], reader: Reader, code_reader: CodeReader
) -> Pipeline:
    routes: dict[str, Reader] = {"text": reader, "qr_code": code_reader, "barcode": code_reader}
    options = PipelineOptions(document_share=0.5, document_classes=frozenset({"text"}))
    return Pipeline(OracleDetector(detected), routes, code_reader=code_reader, options=options)


def _text_boxes(width: int, bottom: int) -> list[Region]:
    """Two overlapping text boxes across the frame, from row 0 to ``bottom``."""
    return [
        Region("text", 0.7, Box(0, 0, width, 200)),
        Region("text", 0.8, Box(0, 180, width, bottom - 180)),
    ]


@pytest.mark.parametrize(("bottom", "whole"), [(400, True), (360, True), (320, False)])
async def test_pipeline_reads_a_document_whole(
    code_reader: CodeReader, bottom: int, whole: bool
) -> None:
    """Text boxes that cover document_share of a frame are read as one region, the frame.

    The two boxes overlap, and their union covers 400, 360 or 320 of the 720 rows: 56%, 50%
    (the share itself) or 44%. The code region is still read on its own.
    """
    scene = _scene(15, labels=(0, 0), codes=(1, 1))
    assert scene.image.shape[:2] == (720, 1280)
    width, height = 1280, 720
    code = _regions(scene)[0]
    reader = RecordingTextReader()
    pipeline = _document_pipeline(scene, [*_text_boxes(width, bottom), code], reader, code_reader)
    try:
        result = await pipeline.process(_frame(scene))
    finally:
        await pipeline.aclose()

    texts = [r for r in result.regions if r.region.class_name == "text"]
    codes = [r for r in result.regions if r.region.class_name == code.class_name]
    assert [c.text for r in codes for c in r.reading.codes] == [scene.objects[0].value]
    assert [r.origin for r in codes] == [Origin.DETECTOR]
    if whole:
        assert reader.shapes == [scene.image.shape]
        assert [(r.region.box, r.region.score, r.origin) for r in texts] == [
            (Box(0, 0, width, height), 0.8, Origin.DOCUMENT)
        ]
        assert texts[0].reading.lines[0].box == Box(10, 20, 60, 12)
    else:
        assert sorted(reader.shapes) == [(bottom - 180, width, 3), (200, width, 3)]
        assert {r.origin for r in texts} == {Origin.DETECTOR}


async def test_pipeline_document_kept_near_the_share() -> None:
    """After a document frame, a frame of the same stream stays one down to 0.8 of the share.

    The text boxes cover 400, 320, 270 and 320 of the 720 rows: 56%, 44%, 38% and 44%, with
    a share of 50% that a document keeps down to 40%. The frames of a video are one stream.
    """
    scene = _scene(15, labels=(0, 0), codes=(0, 0))
    detector = OracleDetector(_text_boxes(1280, 400))
    options = PipelineOptions(document_share=0.5, document_classes=frozenset({"text"}))
    pipeline = Pipeline(detector, {"text": RecordingTextReader()}, options=options)
    documents = []
    try:
        for seq, bottom in enumerate([400, 320, 270, 320], 1):
            detector.regions = _text_boxes(1280, bottom)
            frame = Frame(seq, time.time(), scene.image, f"clip.mp4#{seq}")
            documents.append((await pipeline.detect(frame)).document is not None)
    finally:
        await pipeline.aclose()
    assert documents == [True, True, False, False]


@pytest.mark.parametrize(
    ("source", "size"),
    [("other.png", (720, 1280)), ("first.png", (720, 1200)), (None, (720, 1280))],
    ids=["other source", "other size", "no source"],
)
async def test_pipeline_document_margin_needs_same_stream(
    source: str | None, size: tuple[int, int]
) -> None:
    """A frame of another source, of another size or of no source is a document from 50%."""
    scene = _scene(15, labels=(0, 0), codes=(0, 0))
    detector = OracleDetector(_text_boxes(1280, 400))
    options = PipelineOptions(document_share=0.5, document_classes=frozenset({"text"}))
    pipeline = Pipeline(detector, {"text": RecordingTextReader()}, options=options)
    try:
        first = await pipeline.detect(Frame(1, time.time(), scene.image, "first.png"))
        detector.regions = _text_boxes(1200, 320)
        image = np.ascontiguousarray(scene.image[: size[0], : size[1]])
        second = await pipeline.detect(Frame(2, time.time(), image, source))
        third = await pipeline.detect(Frame(3, time.time(), scene.image, "first.png"))
    finally:
        await pipeline.aclose()
    assert first.document is not None
    assert second.document is None
    # The frame in between was no document, so the first source has lost its margin too.
    assert third.document is None


async def test_pipeline_document_beside_full_frame_decode(code_reader: CodeReader) -> None:
    """A document frame with no code region still gets the full-frame code decode."""
    scene = _scene(15, labels=(0, 0), codes=(1, 1))
    reader = RecordingTextReader()
    pipeline = _document_pipeline(scene, _text_boxes(1280, 400), reader, code_reader)
    try:
        result = await pipeline.process(_frame(scene))
    finally:
        await pipeline.aclose()

    by_origin = {r.origin: r for r in result.regions}
    assert sorted(by_origin) == sorted([Origin.DOCUMENT, Origin.FULL_FRAME])
    assert by_origin[Origin.DOCUMENT].reading.lines[0].text == "TOTAL 12.50"
    codes = [c.text for c in by_origin[Origin.FULL_FRAME].reading.codes]
    assert codes == [scene.objects[0].value]


async def test_pipeline_document_reused_until_a_part_changes(code_reader: CodeReader) -> None:
    """A document is read again when one of its text boxes changes, and reused otherwise.

    The change, a 24 x 16 dark patch, is under 0.05% of the frame's pixels.
    """
    scene = _scene(15, labels=(0, 0), codes=(0, 0))
    changed = scene.image.copy()
    changed[100:116, 300:324] = 0
    reader = RecordingTextReader()
    pipeline = _document_pipeline(scene, _text_boxes(1280, 400), reader, code_reader)
    try:
        first = await pipeline.process(_frame(scene, 1))
        second = await pipeline.process(_frame(scene, 2))
        third = await pipeline.process(Frame(3, time.time(), changed, "synthetic"))
    finally:
        await pipeline.aclose()

    assert len(reader.shapes) == 2
    assert [r.reused for r in first.regions] == [False]
    assert [r.reused for r in second.regions] == [True]
    assert [r.reused for r in third.regions] == [False]
    assert second.regions[0].reading == first.regions[0].reading


def test_union_area() -> None:
    """Pixels covered by several boxes count once."""
    assert _union_area([]) == 0
    assert _union_area([Box(0, 0, 10, 10)]) == 100
    assert _union_area([Box(0, 0, 10, 10), Box(5, 5, 10, 10)]) == 175
    assert _union_area([Box(0, 0, 10, 10), Box(20, 0, 10, 10), Box(2, 2, 3, 3)]) == 200
    assert _union_area([Box(0, 0, 10, 10), Box(10, 0, 10, 10)]) == 200


class RecordingCodeReader(Reader):
    """A code reader that records its calls and finds nothing."""

    name = "codes"
    crop_margin = CodeReader.crop_margin

    def __init__(self) -> None:
        self.calls = 0

    def read(self, image: Image, cancellation: Cancellation | None = None) -> Reading:
        self.calls += 1
        return Reading()


async def test_pipeline_fallback_skipped_when_region_read(code_reader: CodeReader) -> None:
    """When a detected region yields its code, the full-frame decode does not run.

    The full-frame reader is another instance, as the factory builds it: regions routed to
    a reader of the same name count as code regions.
    """
    scene = _scene(15, labels=(0, 0), codes=(1, 1))
    regions = _regions(scene)
    routes: dict[str, Reader] = {regions[0].class_name: code_reader}
    full_frame = RecordingCodeReader()
    pipeline = Pipeline(OracleDetector(regions), routes, code_reader=full_frame)
    try:
        result = await pipeline.process(_frame(scene))
    finally:
        await pipeline.aclose()
    assert [r.origin for r in result.regions] == [Origin.DETECTOR]
    assert result.regions[0].reading.codes
    assert full_frame.calls == 0


def _noise_frame(seq: int = 0) -> Frame:
    """A 200 x 200 frame of grey noise, in which zbar finds no code."""
    image = np.random.default_rng(7).integers(90, 170, (200, 200, 3), dtype=np.uint8)
    return Frame(seq=seq, captured_at=time.time(), image=image, source="noise")


@pytest.mark.parametrize(
    ("box", "decodes"),
    [
        # The 0.3 margin of a 140-pixel box reaches every edge of the 200-pixel frame.
        (Box(30, 30, 140, 140), 0),
        (Box(60, 60, 80, 80), 1),
        (Box(0, 30, 200, 140), 0),
        (Box(0, 40, 200, 100), 1),
    ],
)
async def test_fallback_skipped_whole_frame_crop(
    code_reader: CodeReader, box: Box, decodes: int
) -> None:
    """A code region whose crop is the whole frame and reads nothing stands for the decode."""
    full_frame = RecordingCodeReader()
    pipeline = Pipeline(
        OracleDetector([Region("qr_code", 0.9, box)]),
        {"qr_code": code_reader},
        code_reader=full_frame,
    )
    try:
        result = await pipeline.process(_noise_frame())
    finally:
        await pipeline.aclose()
    assert full_frame.calls == decodes
    detected = [r for r in result.regions if r.origin is Origin.DETECTOR]
    assert [r.status for r in detected] == [RegionStatus.EMPTY]


async def test_fallback_runs_after_failed_whole_crop() -> None:
    """A failed read of a whole-frame code crop scanned nothing, so the decode still runs."""

    class FailingCodeReader(FailingReader):
        name = "codes"
        crop_margin = CodeReader.crop_margin

    full_frame = RecordingCodeReader()
    pipeline = Pipeline(
        OracleDetector([Region("qr_code", 0.9, Box(30, 30, 140, 140))]),
        {"qr_code": FailingCodeReader()},
        code_reader=full_frame,
    )
    try:
        result = await pipeline.process(_noise_frame())
    finally:
        await pipeline.aclose()
    assert full_frame.calls == 1
    assert [r.status for r in result.regions if r.origin is Origin.DETECTOR] == [RegionStatus.ERROR]


async def test_fallback_skipped_reused_whole_crop() -> None:
    """An unchanged frame repeats the empty reading of its whole-frame crop and decodes nothing."""
    region_reader, full_frame = RecordingCodeReader(), RecordingCodeReader()
    pipeline = Pipeline(
        OracleDetector([Region("qr_code", 0.9, Box(30, 30, 140, 140))]),
        {"qr_code": region_reader},
        code_reader=full_frame,
    )
    try:
        first = await pipeline.process(_noise_frame(0))
        second = await pipeline.process(_noise_frame(1))
    finally:
        await pipeline.aclose()
    assert region_reader.calls == 1
    assert full_frame.calls == 0
    assert [r.reused for r in first.regions] == [False]
    assert [r.reused for r in second.regions] == [True]


class SleepingCodeReader(SleepingReader):
    """A code reader that sleeps for a given time, then finds nothing."""

    name = "codes"


@pytest.mark.parametrize(("code_seconds", "text_seconds"), [(0.0, 1.0), (1.0, 0.0)])
async def test_late_decode_missed_reported_timeout(
    code_seconds: float, text_seconds: float
) -> None:
    """A due full-frame decode that the deadline keeps from starting is reported as a timeout.

    Either the text reads hold both slots past the deadline after the code region read
    nothing, or the code region read itself runs past it.
    """
    regions = [
        Region("qr_code", 0.9, Box(20, 20, 100, 100)),
        Region("text", 0.9, Box(130, 10, 40, 40)),
        Region("text", 0.9, Box(130, 60, 40, 40)),
    ]
    routes: dict[str, Reader] = {
        "qr_code": SleepingCodeReader(code_seconds),
        "text": SleepingReader(text_seconds),
    }
    full_frame = RecordingCodeReader()
    options = PipelineOptions(concurrency=2, op_timeout=30.0, frame_deadline=0.4)
    pipeline = Pipeline(OracleDetector(regions), routes, code_reader=full_frame, options=options)
    try:
        result = await pipeline.process(_noise_frame())
    finally:
        await pipeline.aclose()
    missed = [r for r in result.regions if r.origin is Origin.FULL_FRAME]
    assert full_frame.calls == 0
    assert [r.status for r in missed] == [RegionStatus.TIMEOUT]
    assert [r.error for r in missed] == ["not started before the frame deadline"]
    assert [r.region.class_name for r in missed] == ["frame"]


async def test_late_decode_not_reported_after_code_read() -> None:
    """No full-frame timeout is reported once a code region read its code.

    Another code region's read runs past the deadline, so the decode never starts, but it
    was not needed.
    """
    scene = _scene(15, labels=(0, 0), codes=(1, 1))
    regions = [*_regions(scene), Region("slow_code", 0.9, Box(0, 0, 30, 30))]
    routes: dict[str, Reader] = {
        regions[0].class_name: ThreadCodeReader(),
        "slow_code": SleepingCodeReader(1.0),
    }
    full_frame = RecordingCodeReader()
    options = PipelineOptions(concurrency=2, op_timeout=30.0, frame_deadline=0.4)
    pipeline = Pipeline(OracleDetector(regions), routes, code_reader=full_frame, options=options)
    try:
        result = await pipeline.process(_frame(scene))
    finally:
        await pipeline.aclose()
    statuses = [(r.origin, r.status) for r in result.regions]
    assert statuses == [
        (Origin.DETECTOR, RegionStatus.OK),
        (Origin.DETECTOR, RegionStatus.TIMEOUT),
    ]
    assert full_frame.calls == 0


async def test_pipeline_rejects_degenerate_regions(code_reader: CodeReader) -> None:
    """Boxes a few pixels thin are counted as rejected and never read."""
    scene = _scene(17, labels=(0, 0), codes=(0, 0))
    regions = [Region("qr_code", 0.9, Box(10, 10, 2, 50)), Region("qr_code", 0.9, Box(0, 0, 80, 1))]
    options = PipelineOptions(full_frame_codes="never")
    pipeline = Pipeline(OracleDetector(regions), {"qr_code": code_reader}, options=options)
    try:
        result = await pipeline.process(_frame(scene))
    finally:
        await pipeline.aclose()
    assert result.rejected_regions == 2
    assert result.regions == ()


async def test_pipeline_unrouted_class_reported_without_reader() -> None:
    """A class with no route is reported as empty with no reader."""
    scene = _scene(19, labels=(1, 1), codes=(0, 0))
    options = PipelineOptions(full_frame_codes="never")
    pipeline = Pipeline(OracleDetector(_regions(scene)), {}, options=options)
    try:
        result = await pipeline.process(_frame(scene))
    finally:
        await pipeline.aclose()
    assert [(r.reader, r.status) for r in result.regions] == [(None, RegionStatus.EMPTY)]


@pytest.mark.parametrize("workers", [1, 2])
async def test_pipeline_code_workers_bound_processes(code_reader: CodeReader, workers: int) -> None:
    """Concurrent code reads share ``code_workers`` processes and all decode."""
    scene = _scene(11, labels=(0, 0), codes=(4, 4))
    regions = _regions(scene)
    routes: dict[str, Reader] = {r.class_name: code_reader for r in regions}
    options = PipelineOptions(concurrency=4, code_workers=workers)
    pipeline = Pipeline(OracleDetector(regions), routes, options=options)
    try:
        result = await pipeline.process(_frame(scene))
        pids = pipeline.decoders.worker_pids()
    finally:
        await pipeline.aclose()

    expected = sorted(o.value for o in scene.objects)
    assert sorted(c.text or "" for r in result.regions for c in r.reading.codes) == expected
    assert 1 <= len(pids) <= workers


class ShapeDetector:
    """Returns the regions listed for the frame's height, none for other frames."""

    def __init__(self, regions: dict[int, list[Region]]) -> None:
        self.regions = regions

    def detect_counted(self, image: Image) -> tuple[list[Region], int]:
        return list(self.regions.get(image.shape[0], [])), 0

    def close(self) -> None:
        pass


class ThreadCodeReader(Reader):
    """Decodes codes with zbar on a thread, so that no worker process has to start."""

    name = "codes"
    kind = "thread"

    def read(self, image: Image, cancellation: Cancellation | None = None) -> Reading:
        return decode_codes(image)


async def test_pipeline_late_decode_before_next_frame() -> None:
    """A frame's full-frame decode goes ahead of the next frame's queued reads."""
    scene = _scene(17, labels=(0, 0), codes=(1, 1))
    height, width = scene.image.shape[:2]
    code_box = _regions(scene)[0].box
    # The code region misses the code, so only the full-frame decode that follows finds it.
    corner = code_box.x > 60 or code_box.y > 60
    empty_box = Box(0, 0, 40, 40) if corner else Box(width - 40, height - 40, 40, 40)
    blank = np.full((120, 160, 3), 255, np.uint8)

    text_boxes = [Box(0, 0, 80, 60), Box(80, 60, 80, 60)]
    detector = ShapeDetector(
        {
            height: [Region("qr_code", 0.9, empty_box)],
            120: [Region("text", 0.9, box) for box in text_boxes],
        }
    )
    options = PipelineOptions(
        concurrency=2, op_timeout=1.0, frame_deadline=1.0, reuse_unchanged=False
    )

    codes = ThreadCodeReader()
    routes: dict[str, Reader] = {"qr_code": codes, "text": SleepingReader(1.5)}
    pipeline = Pipeline(detector, routes, code_reader=codes, options=options)
    try:
        first, _ = await asyncio.gather(
            pipeline.process(_frame(scene, 1)),
            pipeline.process(Frame(seq=2, captured_at=time.time(), image=blank)),
        )
    finally:
        await pipeline.aclose()
    full_frame = [r for r in first.regions if r.origin is Origin.FULL_FRAME]
    assert [r.status for r in full_frame] == [RegionStatus.OK]
    assert [c.text for r in full_frame for c in r.reading.codes] == [scene.objects[0].value]


async def test_pipeline_no_reads_after_deadline() -> None:
    """A frame that waited past its deadline for the previous frame's read starts none."""
    reader = SlowStopReader(stop_seconds=0.5)
    image = np.full((120, 160, 3), 200, np.uint8)
    options = PipelineOptions(
        concurrency=2, op_timeout=5.0, frame_deadline=1.0, full_frame_codes="never"
    )
    detector = OracleDetector([Region("text", 0.9, Box(10, 10, 60, 40))])
    pipeline = Pipeline(detector, {"text": reader}, options=options)
    try:
        first, second = await asyncio.gather(
            pipeline.process(Frame(seq=0, captured_at=time.time(), image=image)),
            pipeline.process(Frame(seq=1, captured_at=time.time(), image=image.copy())),
        )
    finally:
        await pipeline.aclose()
    assert reader.calls == 1
    assert "(frame deadline)" in (first.regions[0].error or "")
    assert second.regions[0].error == "not started before the frame deadline"


class SlowStopReader(Reader):
    """A cancellable thread reader that blocks until cancelled, then takes a while to stop."""

    name = "slow-stop"
    kind = "thread"
    cancellable = True

    def __init__(self, stop_seconds: float) -> None:
        self.stop_seconds = stop_seconds
        self.calls = 0

    def read(self, image: Image, cancellation: Cancellation | None = None) -> Reading:
        assert cancellation is not None
        self.calls += 1
        stopped = threading.Event()
        with cancellation.registered(stopped.set):
            stopped.wait(30)
        time.sleep(self.stop_seconds)
        cancellation.raise_if_cancelled()
        return Reading()


class TimedDecoder(Reader):
    """A process reader that takes 0.5 s and reports when it ended, on the system clock."""

    name = "timed-codes"
    kind = "process"

    def read(self, image: Image, cancellation: Cancellation | None = None) -> Reading:
        time.sleep(0.5)
        return Reading(lines=(TextLine(str(time.monotonic()), 1.0),))


class TimedReader(Reader):
    """A thread reader that reports when it started, on the system clock."""

    name = "timed-text"
    kind = "thread"

    def read(self, image: Image, cancellation: Cancellation | None = None) -> Reading:
        return Reading(lines=(TextLine(str(time.monotonic()), 1.0),))


def _timed_pipeline(concurrency: int) -> Pipeline:
    """Two code regions read by a 0.5 s decoder in one worker, and a small text region."""
    regions = [
        Region("qr_code", 0.9, Box(0, 0, 100, 100)),
        Region("barcode", 0.9, Box(100, 0, 100, 100)),
        Region("text", 0.9, Box(0, 100, 20, 10)),
    ]
    decoder = TimedDecoder()
    routes: dict[str, Reader] = {"qr_code": decoder, "barcode": decoder, "text": TimedReader()}
    options = PipelineOptions(
        concurrency=concurrency, code_workers=1, full_frame_codes="never", reuse_unchanged=False
    )
    return Pipeline(OracleDetector(regions), routes, options=options)


async def _read_times(pipeline: Pipeline) -> dict[str, float]:
    """Read one frame after a warm-up that starts the worker; return each region's time."""
    image = np.full((120, 200, 3), 255, np.uint8)
    try:
        await pipeline.process(Frame(seq=0, captured_at=time.time(), image=image))
        result = await pipeline.process(Frame(seq=1, captured_at=time.time(), image=image))
    finally:
        await pipeline.aclose()
    return {r.region.class_name: float(r.reading.lines[0].text) for r in result.regions}


async def test_pipeline_text_read_beside_waiting_codes() -> None:
    """Code reads waiting for the one code worker leave the read slots to text reads."""
    times = await _read_times(_timed_pipeline(concurrency=2))
    # The larger code crops are submitted first: the first decode ends 0.5 s in.
    assert times["text"] < min(times["qr_code"], times["barcode"])


async def test_pipeline_one_slot_bounds_all_reads() -> None:
    """With one read slot, a text read waits for the code read that has it."""
    times = await _read_times(_timed_pipeline(concurrency=1))
    assert times["text"] > min(times["qr_code"], times["barcode"])
    assert times["text"] < max(times["qr_code"], times["barcode"])


class WidthSleepingReader(Reader):
    """A thread reader that sleeps 1.2 s on crops wider than 100 pixels and 0.3 s on others."""

    name = "sleepy-width"
    kind = "thread"

    def read(self, image: Image, cancellation: Cancellation | None = None) -> Reading:
        time.sleep(1.2 if image.shape[1] > 100 else 0.3)
        return Reading()


async def test_pipeline_code_read_settles_frame() -> None:
    """Once a frame's code read found a code, the next frame's reads queue beside its text read."""
    scene = _scene(19, labels=(0, 0), codes=(1, 1))
    height = scene.image.shape[0]
    code_region = _regions(scene)[0]
    blank = np.full((120, 160, 3), 255, np.uint8)
    narrow = [Box(0, 0, 50, 60), Box(60, 0, 50, 60)]
    detector = ShapeDetector(
        {
            height: [code_region, Region("text", 0.9, Box(0, 0, 200, 60))],
            120: [Region("text", 0.9, box) for box in narrow],
        }
    )
    options = PipelineOptions(
        concurrency=2, op_timeout=1.5, frame_deadline=1.5, reuse_unchanged=False
    )
    codes = ThreadCodeReader()
    routes: dict[str, Reader] = {code_region.class_name: codes, "text": WidthSleepingReader()}
    pipeline = Pipeline(detector, routes, code_reader=codes, options=options)
    try:
        first, second = await asyncio.gather(
            pipeline.process(_frame(scene, 1)),
            pipeline.process(Frame(seq=2, captured_at=time.time(), image=blank)),
        )
    finally:
        await pipeline.aclose()
    assert [c.text for r in first.regions for c in r.reading.codes] == [scene.objects[0].value]
    assert [r.status for r in second.regions] == [RegionStatus.EMPTY] * 2


async def test_pipeline_threads_match_concurrency() -> None:
    """Eight read slots run eight thread reads at once, more than the default thread pool."""
    regions = [Region("text", 0.9, Box(10 * i, 0, 10, 10)) for i in range(8)]
    reader = StartTimesReader()
    options = PipelineOptions(concurrency=8, full_frame_codes="never", reuse_unchanged=False)
    pipeline = Pipeline(OracleDetector(regions), {"text": reader}, options=options)
    image = np.full((20, 100, 3), 255, np.uint8)
    try:
        await pipeline.process(Frame(seq=0, captured_at=time.time(), image=image))
    finally:
        await pipeline.aclose()
    assert len(reader.starts) == 8
    assert max(reader.starts) - min(reader.starts) < 0.3


class StartTimesReader(Reader):
    """A thread reader that records when each read started, then sleeps 0.3 s."""

    name = "start-times"
    kind = "thread"

    def __init__(self) -> None:
        self.starts: list[float] = []

    def read(self, image: Image, cancellation: Cancellation | None = None) -> Reading:
        self.starts.append(time.monotonic())
        time.sleep(0.3)
        return Reading()
