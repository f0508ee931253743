"""Reuse of readings for regions whose pixels did not change between frames."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
import pytest
import segno

from edge.pipeline import Pipeline, PipelineOptions
from edge.readers.base import Cancellation, Reader
from edge.readers.codes import decode_codes
from edge.results import (
    Box,
    Frame,
    FrameResult,
    Image,
    Origin,
    Reading,
    Region,
    RegionStatus,
)
from edge.reuse import (
    SIGNATURE_SIDE,
    ReuseCache,
    Signature,
    box_iou,
    frame_signature,
    signature,
)
from edge.synth import Scene, render_scene


@dataclass
class FixedDetector:
    """Returns the same regions for every frame."""

    regions: list[Region]

    def detect_counted(self, image: Image) -> tuple[list[Region], int]:
        return list(self.regions), 0

    def close(self) -> None:
        pass


@dataclass
class SequenceDetector:
    """Returns the regions of each call in turn, then those of the last call again."""

    calls: list[list[Region]]

    def detect_counted(self, image: Image) -> tuple[list[Region], int]:
        regions = self.calls.pop(0) if len(self.calls) > 1 else self.calls[0]
        return list(regions), 0

    def close(self) -> None:
        pass


class CountingCodeReader(Reader):
    """A thread reader that decodes codes with zbar, counts its calls and records their spans."""

    name = "codes"
    kind = "thread"
    crop_margin = 0.3

    def __init__(self, *, fail: bool = False, seconds: float = 0.0) -> None:
        self.calls = 0
        self.fail = fail
        self.seconds = seconds
        self.spans: list[tuple[float, float]] = []

    def read(self, image: Image, cancellation: Cancellation | None = None) -> Reading:
        self.calls += 1
        started = time.perf_counter()
        try:
            time.sleep(self.seconds)
            if self.fail:
                msg = "decoder failed"
                raise RuntimeError(msg)
            return decode_codes(image)
        finally:
            self.spans.append((started, time.perf_counter()))


class RecordingReader(Reader):
    """A thread reader that waits, records the spans of its calls and reads nothing."""

    name = "labels"
    kind = "thread"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.spans: list[tuple[float, float]] = []

    def read(self, image: Image, cancellation: Cancellation | None = None) -> Reading:
        started = time.perf_counter()
        time.sleep(self.seconds)
        self.spans.append((started, time.perf_counter()))
        return Reading()


def _scene(seed: int) -> Scene:
    return render_scene(np.random.default_rng(seed), labels=(0, 0), codes=(1, 1), distortions=False)


def _regions(scene: Scene) -> list[Region]:
    return [Region(o.class_name, 0.9, Box(*(round(v) for v in o.box))) for o in scene.objects]


def _pipeline(scene: Scene, reader: Reader, *, reuse: bool = True) -> Pipeline:
    options = PipelineOptions(full_frame_codes="never", reuse_unchanged=reuse)
    routes = {o.class_name: reader for o in scene.objects}
    return Pipeline(FixedDetector(_regions(scene)), routes, options=options)


def _qr(content: str, *, scale: int) -> Image:
    """Render a QR code with a 4-module quiet zone as an H x W x 3 BGR image."""
    buffer = io.BytesIO()
    segno.make_qr(content).save(buffer, kind="png", scale=scale, border=4)
    encoded = np.frombuffer(buffer.getvalue(), dtype=np.uint8)
    return np.ascontiguousarray(cv2.imdecode(encoded, cv2.IMREAD_COLOR))


def _frame(image: Image, seq: int) -> Frame:
    return Frame(seq=seq, captured_at=time.time(), image=image)


async def test_reuse_unchanged_region_not_read_again() -> None:
    """The same frame twice: the second result repeats the reading and the reader is not called."""
    scene = _scene(21)
    reader = CountingCodeReader()
    pipeline = _pipeline(scene, reader)
    try:
        first = await pipeline.process(_frame(scene.image, 0))
        second = await pipeline.process(_frame(scene.image.copy(), 1))
    finally:
        await pipeline.aclose()
    assert reader.calls == 1
    assert first.regions[0].reused is False
    assert second.regions[0].reused is True
    assert second.regions[0].reading == first.regions[0].reading
    assert second.regions[0].status is RegionStatus.OK


async def test_reuse_tolerates_sensor_noise() -> None:
    """Mild noise, as a camera adds between frames, still counts as unchanged."""
    scene = _scene(23)
    noisy = np.clip(
        scene.image + np.random.default_rng(0).normal(0, 3, scene.image.shape), 0, 255
    ).astype(np.uint8)
    reader = CountingCodeReader()
    pipeline = _pipeline(scene, reader)
    try:
        await pipeline.process(_frame(scene.image, 0))
        second = await pipeline.process(_frame(noisy, 1))
    finally:
        await pipeline.aclose()
    assert second.regions[0].reused is True
    assert reader.calls == 1


async def test_reuse_changed_pixels_read_again() -> None:
    """A different code at the same place is read again, with its new payload."""
    first_scene = _scene(25)
    box = _regions(first_scene)[0].box
    other = _scene(27)
    changed = first_scene.image.copy()
    other_box = _regions(other)[0].box
    patch = other.image[
        other_box.y : other_box.y + other_box.h, other_box.x : other_box.x + other_box.w
    ]
    changed[box.y : box.y + box.h, box.x : box.x + box.w] = cv2.resize(patch, (box.w, box.h))
    reader = CountingCodeReader()
    pipeline = _pipeline(first_scene, reader)
    try:
        await pipeline.process(_frame(first_scene.image, 0))
        second = await pipeline.process(_frame(changed, 1))
    finally:
        await pipeline.aclose()
    assert reader.calls == 2
    assert second.regions[0].reused is False


async def test_reuse_waits_for_read_in_flight() -> None:
    """A frame whose reads begin while the last frame reads the same pixels reuses that read."""
    scene = _scene(35)
    reader = CountingCodeReader(seconds=0.3)
    pipeline = _pipeline(scene, reader)
    try:
        first, second = await asyncio.gather(
            pipeline.process(_frame(scene.image, 0)), pipeline.process(_frame(scene.image, 1))
        )
    finally:
        await pipeline.aclose()
    assert reader.calls == 1
    assert second.regions[0].reused is True
    assert second.regions[0].reading == first.regions[0].reading
    assert second.regions[0].status is RegionStatus.OK


async def test_reuse_in_flight_read_failed() -> None:
    """When the read a frame waited for fails, the frame reads the region itself."""
    scene = _scene(37)
    reader = CountingCodeReader(fail=True, seconds=0.3)
    pipeline = _pipeline(scene, reader)
    try:
        results = await asyncio.gather(
            pipeline.process(_frame(scene.image, 0)), pipeline.process(_frame(scene.image, 1))
        )
    finally:
        await pipeline.aclose()
    assert reader.calls == 2
    assert [r.regions[0].status for r in results] == [RegionStatus.ERROR] * 2
    assert [r.regions[0].reused for r in results] == [False, False]


async def test_reuse_disabled_reads_every_frame() -> None:
    """With reuse_unchanged off, every frame is read."""
    scene = _scene(29)
    reader = CountingCodeReader()
    pipeline = _pipeline(scene, reader, reuse=False)
    try:
        for seq in range(3):
            await pipeline.process(_frame(scene.image, seq))
    finally:
        await pipeline.aclose()
    assert reader.calls == 3


async def test_reuse_skips_failed_reads() -> None:
    """A read that failed is tried again on the next frame, never repeated as a result."""
    scene = _scene(31)
    reader = CountingCodeReader(fail=True)
    pipeline = _pipeline(scene, reader)
    try:
        await pipeline.process(_frame(scene.image, 0))
        second = await pipeline.process(_frame(scene.image, 1))
    finally:
        await pipeline.aclose()
    assert reader.calls == 2
    assert second.regions[0].status is RegionStatus.ERROR


def _full_frame_pipeline(
    reader: Reader, *calls: list[Region], reuse: bool = True, concurrency: int = 2
) -> Pipeline:
    """Return a pipeline whose detector returns ``calls`` in turn, no region if none."""
    options = PipelineOptions(
        concurrency=concurrency, full_frame_codes="when_none_read", reuse_unchanged=reuse
    )
    routes: dict[str, Reader] = {r.class_name: reader for c in calls for r in c}
    detector = SequenceDetector(list(calls) or [[]])
    return Pipeline(detector, routes, code_reader=reader, options=options)


async def test_reuse_full_frame_unchanged_frame() -> None:
    """An unchanged frame with no code region repeats the full-frame decode's reading."""
    scene = _scene(33)
    reader = CountingCodeReader()
    pipeline = _full_frame_pipeline(reader)
    try:
        first = await pipeline.process(_frame(scene.image, 0))
        second = await pipeline.process(_frame(scene.image.copy(), 1))
    finally:
        await pipeline.aclose()
    assert reader.calls == 1
    assert [r.reused for r in first.regions] == [False]
    assert [r.reused for r in second.regions] == [True]
    assert [r.reading for r in second.regions] == [r.reading for r in first.regions]
    assert {c.text for r in second.regions for c in r.reading.codes} == {scene.objects[0].value}


async def test_reuse_whole_crop_new_code_beside_box() -> None:
    """A small code beside a whole-frame code crop's box is decoded, though the crop is reused.

    The crop's one signature misses the code, so its empty reading is repeated. The
    full-frame decode compares tiles instead, and runs again.
    """
    image = np.random.default_rng(5).integers(120, 136, (1080, 1920, 3), dtype=np.uint8)
    changed = image.copy()
    # 58 pixels square: too small to change the crop's signature, not a tile's.
    code = _qr("EDGE-42", scale=2)
    changed[60 : 60 + code.shape[0], 60 : 60 + code.shape[1]] = code
    # With the 0.3 margin, the crop of this box is the whole frame.
    box = Box(300, 170, 1320, 740)
    reader = CountingCodeReader()
    pipeline = _full_frame_pipeline(reader, [Region("qr_code", 0.9, box)])
    try:
        first = await pipeline.process(_frame(image, 0))
        second = await pipeline.process(_frame(changed, 1))
    finally:
        await pipeline.aclose()
    assert [r.origin for r in first.regions] == [Origin.DETECTOR]
    assert [r.reused for r in second.regions if r.origin is Origin.DETECTOR] == [True]
    found = [
        c.text for r in second.regions if r.origin is Origin.FULL_FRAME for c in r.reading.codes
    ]
    assert found == ["EDGE-42"]


class SlowCallReader(Reader):
    """A code reader that finds nothing, and sleeps for a second on one given call."""

    name = "codes"
    kind = "thread"
    crop_margin = 0.3

    def __init__(self, slow_call: int) -> None:
        self.calls = 0
        self.slow_call = slow_call

    def read(self, image: Image, cancellation: Cancellation | None = None) -> Reading:
        self.calls += 1
        if self.calls == self.slow_call:
            time.sleep(1.0)
        return Reading()


async def test_reuse_full_frame_kept_past_deadline() -> None:
    """A repeated full-frame reading stays in the result when a region read misses the deadline.

    The frame is unchanged, so the last decode's reading is in hand, but the late decode
    waits for the code region reads, and a moved region's read runs past the deadline.
    """
    image = np.full((480, 640, 3), 200, np.uint8)
    code = _qr("EDGE-7", scale=4)
    image[300 : 300 + code.shape[0], 420 : 420 + code.shape[1]] = code
    still = Region("qr_code", 0.9, Box(10, 10, 40, 40))
    moved = [Region("barcode", 0.9, Box(100, y, 40, 40)) for y in (10, 60)]
    # Calls 1 and 2 read the first frame, and call 3 reads the moved region on the second.
    regions = SlowCallReader(slow_call=3)
    full_frame = CountingCodeReader()
    options = PipelineOptions(concurrency=2, op_timeout=30.0, frame_deadline=0.4)
    pipeline = Pipeline(
        SequenceDetector([[still, moved[0]], [still, moved[1]]]),
        {"qr_code": regions, "barcode": regions},
        code_reader=full_frame,
        options=options,
    )
    try:
        await pipeline.process(_frame(image, 0))
        second = await pipeline.process(_frame(image.copy(), 1))
    finally:
        await pipeline.aclose()
    repeated = [r for r in second.regions if r.origin is Origin.FULL_FRAME]
    assert full_frame.calls == 1
    assert [c.text for r in repeated for c in r.reading.codes] == ["EDGE-7"]
    assert [r.reused for r in repeated] == [True]
    statuses = {
        r.region.class_name: r.status for r in second.regions if r.origin is Origin.DETECTOR
    }
    assert statuses == {"qr_code": RegionStatus.EMPTY, "barcode": RegionStatus.TIMEOUT}


async def test_reuse_full_frame_decode_in_flight() -> None:
    """A frame whose decode would start while the last frame's decode runs reuses it."""
    scene = _scene(41)
    reader = CountingCodeReader(seconds=0.3)
    pipeline = _full_frame_pipeline(reader)
    try:
        first, second = await asyncio.gather(
            pipeline.process(_frame(scene.image, 0)), pipeline.process(_frame(scene.image, 1))
        )
    finally:
        await pipeline.aclose()
    assert reader.calls == 1
    assert [r.reused for r in second.regions] == [True]
    assert [r.reading for r in second.regions] == [r.reading for r in first.regions]


async def test_reuse_decode_in_flight_holds_no_region() -> None:
    """Waiting for the last frame's full-frame decode does not hold back region reads.

    The label region moves between the frames, so the second frame reads it again.
    """
    scene = _scene(53)
    label = Region("label", 0.9, Box(0, 0, 60, 60))
    moved = Region("label", 0.9, Box(20, 0, 60, 60))
    labels = RecordingReader(0.3)
    codes = CountingCodeReader(seconds=0.3)
    options = PipelineOptions(concurrency=3, full_frame_codes="when_none_read")
    detector = SequenceDetector([[label], [moved]])
    pipeline = Pipeline(detector, {"label": labels}, code_reader=codes, options=options)
    try:
        _, second = await asyncio.gather(
            pipeline.process(_frame(scene.image, 0)), pipeline.process(_frame(scene.image, 1))
        )
    finally:
        await pipeline.aclose()
    assert codes.calls == 1
    full_frame = [r for r in second.regions if r.origin is Origin.FULL_FRAME]
    assert [r.reused for r in full_frame] == [True]
    ((_, decode_end),) = codes.spans
    _, (second_label_start, _) = sorted(labels.spans)
    assert second_label_start < decode_end


async def test_reuse_failed_decode_in_flight_retried() -> None:
    """A frame that waited for the last frame's full-frame decode decodes if that one failed."""
    scene = _scene(55)
    reader = CountingCodeReader(fail=True, seconds=0.3)
    pipeline = _full_frame_pipeline(reader)
    try:
        results = await asyncio.gather(
            pipeline.process(_frame(scene.image, 0)), pipeline.process(_frame(scene.image, 1))
        )
    finally:
        await pipeline.aclose()
    assert reader.calls == 2
    for result in results:
        assert [r.status for r in result.regions] == [RegionStatus.ERROR]
        assert [r.reused for r in result.regions] == [False]


async def test_reuse_full_frame_after_empty_region() -> None:
    """After a code region that reads nothing, an unchanged frame repeats the late decode."""
    scene = _scene(39)
    code_box = _regions(scene)[0].box
    # A code region in the top-left corner, away from the code, so its read finds nothing.
    corner = Region(scene.objects[0].class_name, 0.9, Box(0, 0, 60, 60))
    assert code_box.x > 80 or code_box.y > 80
    reader = CountingCodeReader()
    pipeline = _full_frame_pipeline(reader, [corner])
    try:
        first = await pipeline.process(_frame(scene.image, 0))
        second = await pipeline.process(_frame(scene.image.copy(), 1))
    finally:
        await pipeline.aclose()
    assert reader.calls == 2
    for result, reused in ((first, False), (second, True)):
        by_origin = {r.origin: r for r in result.regions}
        assert by_origin[Origin.DETECTOR].status is RegionStatus.EMPTY
        assert by_origin[Origin.DETECTOR].reused is reused
        assert by_origin[Origin.FULL_FRAME].reused is reused
        codes = [c.text for c in by_origin[Origin.FULL_FRAME].reading.codes]
        assert codes == [scene.objects[0].value]


async def test_reuse_full_frame_new_code_decoded() -> None:
    """A small code that appears in an otherwise unchanged frame is decoded."""
    qr = _qr("appeared", scale=2)
    blank = np.full((1080, 1920, 3), int(qr.mean()), np.uint8)
    with_code = blank.copy()
    with_code[300 : 300 + qr.shape[0], 700 : 700 + qr.shape[1]] = qr
    reader = CountingCodeReader()
    pipeline = _full_frame_pipeline(reader)
    try:
        first = await pipeline.process(_frame(blank, 0))
        second = await pipeline.process(_frame(with_code, 1))
    finally:
        await pipeline.aclose()
    assert reader.calls == 2
    assert first.regions == ()
    assert [c.text for r in second.regions for c in r.reading.codes] == ["appeared"]
    assert [r.reused for r in second.regions] == [False]


async def test_reuse_late_decode_in_flight() -> None:
    """A late decode due while the last frame's decode of the same pixels runs reuses it.

    The empty code region moves between the first two frames, so the second frame reads it
    again and reaches its late decode while the first frame's is running. The third frame
    repeats the reading the second one reused.
    """
    scene = _scene(51)
    corner = Region(scene.objects[0].class_name, 0.9, Box(0, 0, 60, 60))
    moved = Region(corner.class_name, 0.9, Box(20, 0, 60, 60))
    assert all(r.box.x > 100 or r.box.y > 80 for r in _regions(scene))
    reader = CountingCodeReader(seconds=0.3)
    pipeline = _full_frame_pipeline(reader, [corner], [moved])
    try:
        first, second = await asyncio.gather(
            pipeline.process(_frame(scene.image, 0)), pipeline.process(_frame(scene.image, 1))
        )
        third = await pipeline.process(_frame(scene.image, 2))
    finally:
        await pipeline.aclose()
    assert reader.calls == 3
    for result, reused in ((first, False), (second, True), (third, True)):
        full_frame = [r for r in result.regions if r.origin is Origin.FULL_FRAME]
        assert [r.reused for r in full_frame] == [reused]
        assert [c.text for r in full_frame for c in r.reading.codes] == [scene.objects[0].value]


async def test_reuse_late_decode_follows_slow_fade() -> None:
    """A code that fades in by less than the tolerance a frame is decoded once it shows.

    The empty code region moves every frame, so each frame has a late decode, due while the
    previous frame's may still run. Each frame must be compared with the pixels the reused
    reading came from, not only with the frame before it.
    """
    qr = _qr("faded", scale=4).astype(np.float32)
    height, width = qr.shape[:2]

    def faded(alpha: float) -> Image:
        image = np.full((480, 640, 3), 255, np.float32)
        image[200 : 200 + height, 300 : 300 + width] = 255 * (1 - alpha) + qr * alpha
        return np.ascontiguousarray(image.round().astype(np.uint8))

    # 0.04 of the 255 levels between module colours is 10 levels a frame, under the 12 of
    # the tolerance.
    frames = [_frame(faded(min(1.0, seq * 0.04)), seq) for seq in range(30)]
    corners = [[Region("qr_code", 0.9, Box(seq % 2 * 20, 0, 60, 60))] for seq in range(30)]
    reader = CountingCodeReader(seconds=0.05)
    pipeline = _full_frame_pipeline(reader, *corners, concurrency=1)
    try:
        results = [r async for r in pipeline.stream(frames)]
    finally:
        await pipeline.aclose()
    last = results[-1]
    assert isinstance(last, FrameResult)
    codes = [c.text for r in last.regions if r.origin is Origin.FULL_FRAME for c in r.reading.codes]
    assert codes == ["faded"]


async def test_reuse_full_frame_dropped_once_region_reads() -> None:
    """A repeated full-frame reading is not reported once a code region finds a code.

    Of two codes, the full-frame decode of the first frame finds both. On the second, the
    region on one code reads it, so the other must not come from the first frame's decode.
    """
    scene = render_scene(np.random.default_rng(43), labels=(0, 0), codes=(2, 2), distortions=False)
    on_code = _regions(scene)[0]
    corner = Region(on_code.class_name, 0.9, Box(0, 0, 60, 60))
    assert all(r.box.x > 80 or r.box.y > 80 for r in _regions(scene))
    reader = CountingCodeReader()
    pipeline = _full_frame_pipeline(reader, [corner], [on_code])
    try:
        first = await pipeline.process(_frame(scene.image, 0))
        second = await pipeline.process(_frame(scene.image.copy(), 1))
    finally:
        await pipeline.aclose()
    assert reader.calls == 3
    first_codes = {c.text for r in first.regions for c in r.reading.codes}
    assert first_codes == {o.value for o in scene.objects}
    assert [r.origin for r in second.regions] == [Origin.DETECTOR]
    assert [c.text for c in second.regions[0].reading.codes] == [scene.objects[0].value]


async def test_reuse_full_frame_failed_decode_retried() -> None:
    """A full-frame decode that failed runs again on the unchanged next frame."""
    scene = _scene(45)
    reader = CountingCodeReader(fail=True)
    pipeline = _full_frame_pipeline(reader)
    try:
        first = await pipeline.process(_frame(scene.image, 0))
        second = await pipeline.process(_frame(scene.image.copy(), 1))
    finally:
        await pipeline.aclose()
    assert reader.calls == 2
    for result in (first, second):
        assert [r.status for r in result.regions] == [RegionStatus.ERROR]
        assert [r.reused for r in result.regions] == [False]


async def test_reuse_full_frame_disabled_decodes_every_frame() -> None:
    """With reuse_unchanged off, the full-frame decode runs on every frame."""
    scene = _scene(47)
    reader = CountingCodeReader()
    pipeline = _full_frame_pipeline(reader, reuse=False)
    try:
        for seq in range(3):
            result = await pipeline.process(_frame(scene.image, seq))
            assert [r.reused for r in result.regions] == [False]
    finally:
        await pipeline.aclose()
    assert reader.calls == 3


async def test_reuse_late_decode_no_early_wait() -> None:
    """A frame does not wait for a late decode of the last frame that may never run.

    The code region moves between frames, so it is read again, and finds its code each time.
    """
    scene = _scene(49)
    region = _regions(scene)[0]
    box = region.box
    moved = Region(region.class_name, region.score, Box(box.x + box.w // 4, box.y, box.w, box.h))
    reader = CountingCodeReader(seconds=0.3)
    pipeline = _full_frame_pipeline(reader, [region], [moved])
    try:
        results = await asyncio.gather(
            pipeline.process(_frame(scene.image, 0)), pipeline.process(_frame(scene.image, 1))
        )
    finally:
        await pipeline.aclose()
    assert reader.calls == 2
    for result in results:
        assert [r.origin for r in result.regions] == [Origin.DETECTOR]
        assert [r.reused for r in result.regions] == [False]
    (_, first_end), (second_start, _) = sorted(reader.spans)
    assert second_start < first_end


@pytest.mark.parametrize(("make", "sees_code"), [(frame_signature, True), (signature, False)])
def test_frame_signature_sees_small_code(
    make: Callable[[Image], Signature], sees_code: bool
) -> None:
    """Tiles catch a small code as grey on average as the frame, which one signature misses."""
    qr = _qr("appeared", scale=2)
    blank = np.full((1080, 1920, 3), int(qr.mean()), np.uint8)
    with_code = blank.copy()
    with_code[300 : 300 + qr.shape[0], 700 : 700 + qr.shape[1]] = qr
    noisy = np.clip(blank + np.random.default_rng(0).normal(0, 3, blank.shape), 0, 255)
    box = Box(0, 0, 1920, 1080)
    cache = ReuseCache()
    cache.store("frame", box, make(blank), Reading())
    cache.next_frame()
    changed = cache.lookup("frame", box, make(with_code)) is None
    assert changed is sees_code
    assert cache.lookup("frame", box, make(noisy.astype(np.uint8))) is not None


@pytest.mark.parametrize(("height", "width", "tiles"), [(1080, 1920, 40), (480, 640, 6), (5, 7, 1)])
def test_frame_signature_tiles(height: int, width: int, tiles: int) -> None:
    """A frame signature stacks one signature per tile of at most 256 pixels square."""
    noise = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    # Smooth, because tiles of 640 / 3 pixels share their edge columns with their neighbours.
    image = np.asarray(cv2.GaussianBlur(noise, (0, 0), 4), dtype=np.uint8)
    stacked = frame_signature(image)
    assert stacked.shape == (tiles * SIGNATURE_SIDE, SIGNATURE_SIDE)
    # Tiles run along the top row first, and the last one is the bottom-right one.
    rows, columns = -(-height // 256), -(-width // 256)
    tile_height, tile_width = height // rows, width // columns
    last = signature(image[height - tile_height :, width - tile_width :])
    assert np.abs(stacked[-SIGNATURE_SIDE:] - last).max() <= 2
    if columns > 1:
        second = signature(image[:tile_height, tile_width : 2 * tile_width])
        assert np.abs(stacked[SIGNATURE_SIDE : 2 * SIGNATURE_SIDE] - second).max() <= 2


async def test_reuse_moves_boxes_with_region() -> None:
    """A code that moved a few pixels is reused with its box shifted by the same amount."""
    scene = _scene(35)
    region = _regions(scene)[0]
    moved_image = np.roll(scene.image, (3, 5), axis=(0, 1))
    box = region.box
    moved = Region(region.class_name, region.score, Box(box.x + 5, box.y + 3, box.w, box.h))
    reader = CountingCodeReader()
    options = PipelineOptions(full_frame_codes="never")
    detector = FixedDetector([region])
    pipeline = Pipeline(detector, {region.class_name: reader}, options=options)
    try:
        first = await pipeline.process(_frame(scene.image, 0))
        detector.regions = [moved]
        second = await pipeline.process(_frame(moved_image, 1))
    finally:
        await pipeline.aclose()
    first_box = first.regions[0].reading.codes[0].box
    second_box = second.regions[0].reading.codes[0].box
    assert second.regions[0].reused is True
    assert first_box is not None
    assert second_box is not None
    assert (second_box.x - first_box.x, second_box.y - first_box.y) == (5, 3)


def test_reuse_cache_requires_overlapping_box() -> None:
    """A matching signature at a box that moved away is not a match."""
    image = np.full((40, 40, 3), 200, np.uint8)
    cache = ReuseCache()
    cache.store("text", Box(0, 0, 40, 40), signature(image), Reading())
    cache.next_frame()
    cached = cache.lookup("text", Box(0, 0, 40, 40), signature(image))
    assert cached is not None
    assert cached.reading == Reading()
    assert cache.lookup("text", Box(30, 30, 40, 40), signature(image)) is None
    assert cache.lookup("qr_code", Box(0, 0, 40, 40), signature(image)) is None


def test_reuse_cache_stacked_signatures() -> None:
    """Stacked signatures match crop by crop, and never match a stack of another size."""
    plain = signature(np.full((40, 40, 3), 200, np.uint8))
    marked = plain.copy()
    marked[:3, :4] = 0  # 12 of 4096 pixels: over 0.2% of this crop, under it of the stack
    box = Box(0, 0, 40, 40)
    cache = ReuseCache()
    cache.store("text", box, np.concatenate([plain, plain]), Reading())
    cache.next_frame()

    assert cache.lookup("text", box, np.concatenate([plain, plain])) is not None
    assert cache.lookup("text", box, np.concatenate([plain, marked])) is None
    assert cache.lookup("text", box, np.concatenate([plain, plain, plain])) is None
    assert cache.lookup("text", box, plain) is None


def test_box_iou_values() -> None:
    """IoU is 1 for equal boxes, 0 for disjoint ones and 1/3 for half-shifted squares."""
    assert box_iou(Box(0, 0, 10, 10), Box(0, 0, 10, 10)) == 1.0
    assert box_iou(Box(0, 0, 10, 10), Box(20, 20, 10, 10)) == 0.0
    assert abs(box_iou(Box(0, 0, 10, 10), Box(5, 0, 10, 10)) - 1 / 3) < 1e-9


def test_reuse_cache_pending_entry() -> None:
    """A pending entry is found as pending, then holds its reading or is dropped."""
    image = np.full((40, 40, 3), 128, np.uint8)
    cache = ReuseCache()
    read = cache.store("text", Box(0, 0, 40, 40), signature(image), None)
    failed = cache.store("qr_code", Box(0, 0, 40, 40), signature(image), None)
    cache.next_frame()
    found = cache.lookup("text", Box(0, 0, 40, 40), signature(image))
    assert found is read
    assert found.pending
    cache.resolve(read, Reading())
    cache.resolve(failed, None)
    assert not read.pending
    assert cache.lookup("text", Box(0, 0, 40, 40), signature(image)) is read
    assert cache.lookup("qr_code", Box(0, 0, 40, 40), signature(image)) is None
