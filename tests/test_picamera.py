"""Tests for the picamera2 camera backend against the fake picamera2 module in fake_picamera2/."""

from __future__ import annotations

import asyncio
import importlib
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from edge.camera.factory import create_camera
from edge.camera.picamera import Picamera2Camera, to_bgr_frame
from edge.errors import CameraError, ConfigError, ImageError

if TYPE_CHECKING:
    from picamera2 import FakeState

FAKE_DIR = Path(__file__).resolve().parent / "fake_picamera2"
WIDTH = 64
HEIGHT = 48
#: Long enough that a loaded machine still delivers a frame in time, short enough for tests.
CAPTURE_TIMEOUT = 1.0


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeState]:
    """The fake picamera2 module on sys.path, with fresh state; returns that state."""
    monkeypatch.syspath_prepend(str(FAKE_DIR))
    sys.modules.pop("picamera2", None)
    module = importlib.import_module("picamera2")
    state: FakeState = module.reset()
    yield state
    sys.modules.pop("picamera2", None)


@pytest.fixture
async def opened(fake: FakeState) -> AsyncIterator[Picamera2Camera]:
    """An open 64x48 camera on the fake, closed after the test."""
    camera = Picamera2Camera(0, width=WIDTH, height=HEIGHT, capture_timeout=CAPTURE_TIMEOUT)
    await camera.open()
    yield camera
    await camera.close()


async def test_picamera_frame_shape_and_dtype(opened: Picamera2Camera) -> None:
    """A frame is H x W x 3 uint8 at the configured size."""
    frame = await opened.read()

    assert frame.image.shape == (HEIGHT, WIDTH, 3)
    assert frame.image.dtype == np.uint8


async def test_picamera_channels_in_bgr_order(opened: Picamera2Camera) -> None:
    """RGB888 bytes (B, G, R) reach the frame unswapped: blue is channel 0, red channel 2."""
    frame = await opened.read()

    assert np.array_equal(frame.image[0, :, 0], np.arange(WIDTH))
    assert np.array_equal(frame.image[:, 0, 1], np.arange(HEIGHT))
    assert np.all(frame.image[:, :, 2] == frame.image[0, 0, 2])


async def test_picamera_configures_rgb888_main(fake: FakeState, opened: Picamera2Camera) -> None:
    """The main stream is requested as RGB888 at the given size."""
    config = fake.instances[0].camera_configuration()

    assert config["main"]["format"] == "RGB888"
    assert config["main"]["size"] == (WIDTH, HEIGHT)
    assert config["buffer_count"] == 4


async def test_picamera_fps_sets_frame_duration(fake: FakeState) -> None:
    """fps becomes FrameDurationLimits in microseconds."""
    camera = Picamera2Camera(0, fps=4.0, capture_timeout=CAPTURE_TIMEOUT)
    await camera.open()
    try:
        controls = fake.instances[0].camera_configuration()["controls"]
    finally:
        await camera.close()

    assert controls["FrameDurationLimits"] == (250000, 250000)


async def test_picamera_default_size_used(fake: FakeState) -> None:
    """Without width and height the camera's video default size is used."""
    camera = Picamera2Camera(0, capture_timeout=CAPTURE_TIMEOUT)
    await camera.open()
    try:
        frame = await camera.read()
    finally:
        await camera.close()

    assert (frame.width, frame.height) == (1280, 720)


@pytest.mark.parametrize(
    ("layout", "padding"),
    [("view", 32), ("padded", 30), ("rows", 32)],
    ids=["strided-view", "padding-pixels", "raw-rows"],
)
async def test_picamera_padded_stride_removed(fake: FakeState, layout: str, padding: int) -> None:
    """Rows with a stride wider than width * 3 are cropped to a contiguous W x 3 image."""
    fake.stride_padding = padding
    fake.array_layout = layout  # type: ignore[assignment]
    camera = Picamera2Camera(0, width=WIDTH, height=HEIGHT, capture_timeout=CAPTURE_TIMEOUT)
    await camera.open()
    try:
        frame = await camera.read()
    finally:
        await camera.close()

    assert frame.image.shape == (HEIGHT, WIDTH, 3)
    assert frame.image.flags.c_contiguous
    assert np.array_equal(frame.image[HEIGHT - 1, :, 0], np.arange(WIDTH))


async def test_picamera_requests_released(fake: FakeState, opened: Picamera2Camera) -> None:
    """Every request the capture thread takes is released."""
    for _ in range(3):
        await opened.read()
    await opened.close()

    assert fake.outstanding == 0


async def test_picamera_slow_consumer_drops(opened: Picamera2Camera) -> None:
    """A consumer slower than the camera gets the newest frame; the others count as dropped."""
    first = await opened.read()
    await asyncio.sleep(0.2)
    second = await opened.read()

    assert second.seq > first.seq + 1
    assert opened.dropped > 0


async def test_picamera_no_camera_raises(fake: FakeState) -> None:
    """An empty camera list raises CameraError saying no camera was found."""
    fake.cameras = []
    camera = Picamera2Camera(0)

    with pytest.raises(CameraError, match="no camera found by libcamera"):
        await camera.open()


async def test_picamera_camera_number_missing(fake: FakeState) -> None:
    """A camera number beyond the list raises CameraError naming the valid range."""
    camera = Picamera2Camera(1)

    with pytest.raises(CameraError, match=r"camera 1 not found; libcamera lists 1 camera"):
        await camera.open()


async def test_picamera_busy_raises(fake: FakeState) -> None:
    """A camera held by another process raises CameraError saying it is busy."""
    fake.busy = {0}
    camera = Picamera2Camera(0)

    with pytest.raises(CameraError, match="camera 0 is busy: another process holds it"):
        await camera.open()


async def test_picamera_second_open_busy(opened: Picamera2Camera) -> None:
    """A second camera object on the same camera fails as busy while the first is open."""
    second = Picamera2Camera(0)

    with pytest.raises(CameraError, match="is busy"):
        await second.open()


async def test_picamera_close_frees_camera(fake: FakeState, opened: Picamera2Camera) -> None:
    """After close() the camera is released and can be opened again."""
    await opened.close()
    again = Picamera2Camera(0, capture_timeout=CAPTURE_TIMEOUT)
    await again.open()
    await again.close()

    assert not fake.instances[0].is_open
    assert len(fake.instances) == 2


async def test_picamera_reopens_after_stall(fake: FakeState) -> None:
    """A capture that blocks past capture_timeout closes and reopens the camera once."""
    fake.stall_after = {0: 2}
    camera = Picamera2Camera(0, width=WIDTH, height=HEIGHT, capture_timeout=CAPTURE_TIMEOUT)
    await camera.open()
    try:
        frames = [await camera.read() for _ in range(3)]
    finally:
        await camera.close()

    assert len(frames) == 3
    assert camera.reopens == 1
    assert len(fake.instances) == 2
    assert not fake.instances[0].is_open


async def test_picamera_stall_logged(fake: FakeState, caplog: pytest.LogCaptureFixture) -> None:
    """A stall logs a warning naming the camera and the capture timeout."""
    fake.stall_after = {0: 1}
    camera = Picamera2Camera(0, width=WIDTH, height=HEIGHT, capture_timeout=CAPTURE_TIMEOUT)
    await camera.open()
    try:
        await camera.read()
        await camera.read()
    finally:
        await camera.close()

    assert "Camera 0: no frame within 1 s (capture stalled); reopening it" in caplog.text


async def test_picamera_stall_persists_raises(fake: FakeState) -> None:
    """A camera that still stalls after reopening raises CameraError."""
    fake.stall_after = {0: 1, 1: 0}
    camera = Picamera2Camera(0, width=WIDTH, height=HEIGHT, capture_timeout=CAPTURE_TIMEOUT)
    await camera.open()
    try:
        await camera.read()
        with pytest.raises(CameraError, match="still delivers no frames after reopening"):
            await camera.read()
    finally:
        await camera.close()


async def test_picamera_reopen_failure_raises(fake: FakeState) -> None:
    """A stall followed by a failed reopen raises CameraError with both reasons."""
    fake.stall_after = {0: 1}
    camera = Picamera2Camera(0, width=WIDTH, height=HEIGHT, capture_timeout=CAPTURE_TIMEOUT)
    await camera.open()
    try:
        await camera.read()
        fake.cameras = []
        with pytest.raises(CameraError, match="reopening it failed: no camera found"):
            await camera.read()
    finally:
        await camera.close()


async def test_picamera_read_after_failed_reopen(fake: FakeState) -> None:
    """After a failed reopen the camera is closed and read() raises that it is not open."""
    fake.stall_after = {0: 1}
    camera = Picamera2Camera(0, width=WIDTH, height=HEIGHT, capture_timeout=CAPTURE_TIMEOUT)
    await camera.open()
    await camera.read()
    fake.cameras = []
    with pytest.raises(CameraError):
        await camera.read()

    with pytest.raises(CameraError, match="is not open"):
        await camera.read()


async def test_picamera_read_before_open_raises(fake: FakeState) -> None:
    """read() before open() raises CameraError."""
    with pytest.raises(CameraError, match="is not open; call open"):
        await Picamera2Camera(0).read()


async def test_picamera_module_missing_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without picamera2 installed, open() raises CameraError saying how to install it."""
    monkeypatch.setitem(sys.modules, "picamera2", None)
    camera = Picamera2Camera(0)

    with pytest.raises(CameraError, match="picamera2 is not installed"):
        await camera.open()


def test_picamera_import_leaves_picamera2_alone() -> None:
    """Importing the backend does not import picamera2."""
    code = "import sys, edge.camera.picamera; print('picamera2' in sys.modules)"
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )

    assert completed.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"width": 640}, "set width and height together"),
        ({"device": "cam0"}, "camera number such as 0"),
        ({"device": -1}, "must not be negative"),
        ({"capture_timeout": 0.0}, "capture_timeout must be a positive"),
        ({"fps": 1.0, "capture_timeout": 0.5}, "must exceed one frame interval"),
        ({"buffer_count": 1}, "buffer_count must be at least 2"),
    ],
    ids=[
        "width-only",
        "device-name",
        "negative-device",
        "zero-timeout",
        "timeout-short",
        "one-buffer",
    ],
)
def test_picamera_invalid_options_raise(options: dict[str, object], message: str) -> None:
    """Invalid constructor options raise ValueError naming the option."""
    with pytest.raises(ValueError, match=message):
        Picamera2Camera(**options)  # type: ignore[arg-type]


def test_factory_picamera2_kind(fake: FakeState) -> None:
    """The picamera2 kind builds a Picamera2Camera when picamera2 is importable."""
    camera = create_camera("picamera2", device="0", width=WIDTH, height=HEIGHT, fps=2.0)

    assert isinstance(camera, Picamera2Camera)


def test_factory_picamera2_invalid_option(fake: FakeState) -> None:
    """An invalid picamera2 option raises ConfigError."""
    with pytest.raises(ConfigError, match="set width and height together"):
        create_camera("picamera2", device="0", width=WIDTH)


def test_to_bgr_frame_wrong_shape_raises() -> None:
    """An array that cannot be a W x H RGB888 frame raises ImageError naming its shape."""
    with pytest.raises(ImageError, match=r"unexpected frame shape \(48, 10\)"):
        to_bgr_frame(np.zeros((HEIGHT, 10), dtype=np.uint8), (WIDTH, HEIGHT))


def test_to_bgr_frame_wrong_dtype_raises() -> None:
    """A non-uint8 array raises ImageError naming the dtype."""
    with pytest.raises(ImageError, match="uint16"):
        to_bgr_frame(np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint16), (WIDTH, HEIGHT))
