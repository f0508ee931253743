"""Tests for the simulated and OpenCV cameras and the camera factory, on files made here."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from edge.camera.factory import create_camera
from edge.camera.opencv import OpenCVCamera
from edge.camera.simulated import SimulatedCamera, read_image
from edge.errors import CameraError, ConfigError, ImageError, SourceExhausted
from edge.images import to_bgr8
from edge.results import Frame

WIDTH = 64
HEIGHT = 48


def write_image(path: Path, level: int = 100) -> Path:
    """Write a uniform BGR image whose pixels all equal ``level``."""
    image = np.full((HEIGHT, WIDTH, 3), level, dtype=np.uint8)
    assert cv2.imwrite(str(path), image)
    return path


def write_noise_jpeg(path: Path) -> Path:
    """Write a JPEG of random pixels, so most of the file is scan data."""
    image = np.random.default_rng(1).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), image)
    return path


def write_video(path: Path, frame_count: int) -> Path:
    """Write an MJPG video whose frame i is uniformly grey at level 8 * i."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 25.0, (WIDTH, HEIGHT))
    assert writer.isOpened()
    for index in range(frame_count):
        writer.write(np.full((HEIGHT, WIDTH, 3), 8 * index, dtype=np.uint8))
    writer.release()
    return path


async def read_all(camera: SimulatedCamera | OpenCVCamera, limit: int = 1000) -> list[Frame]:
    """Read frames until the camera raises CameraError (SourceExhausted included)."""
    frames: list[Frame] = []
    for _ in range(limit):
        try:
            frames.append(await camera.read())
        except CameraError:
            return frames
    pytest.fail(f"camera still delivering after {limit} frames")


def names(frames: list[Frame]) -> list[str]:
    return [Path(frame.source or "").name for frame in frames]


async def test_simulated_folder_name_order(tmp_path: Path) -> None:
    """Images in a folder are replayed in file name order, other files ignored."""
    for name in ("b.png", "a.jpg", "c.bmp"):
        write_image(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image", encoding="utf-8")

    async with SimulatedCamera(tmp_path) as camera:
        frames = [await camera.read() for _ in range(3)]

    assert names(frames) == ["a.jpg", "b.png", "c.bmp"]
    assert [frame.seq for frame in frames] == [0, 1, 2]
    assert frames[0].source == str(tmp_path / "a.jpg")


async def test_simulated_frame_is_bgr_uint8(tmp_path: Path) -> None:
    """A replayed frame is H x W x 3 uint8 with a capture time."""
    write_image(tmp_path / "a.png", level=7)

    async with SimulatedCamera(tmp_path / "a.png") as camera:
        frame = await camera.read()

    assert frame.image.shape == (HEIGHT, WIDTH, 3)
    assert frame.image.dtype == np.uint8
    assert int(frame.image[0, 0, 0]) == 7
    assert frame.captured_at > 0


async def test_simulated_exhausted_after_last(tmp_path: Path) -> None:
    """Without loop, the read after the last image raises SourceExhausted."""
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png")

    async with SimulatedCamera(tmp_path) as camera:
        await camera.read()
        await camera.read()
        with pytest.raises(SourceExhausted):
            await camera.read()


async def test_simulated_loop_restarts(tmp_path: Path) -> None:
    """With loop, replay starts over at the first image and seq keeps counting."""
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png")

    async with SimulatedCamera(tmp_path, loop=True) as camera:
        frames = [await camera.read() for _ in range(5)]

    assert names(frames) == ["a.png", "b.png", "a.png", "b.png", "a.png"]
    assert [frame.seq for frame in frames] == [0, 1, 2, 3, 4]


async def test_simulated_without_fps_never_drops(tmp_path: Path) -> None:
    """Without an fps a slow consumer still gets every frame and nothing is dropped."""
    for index in range(4):
        write_image(tmp_path / f"{index}.png")

    async with SimulatedCamera(tmp_path, fps=0) as camera:
        frames = []
        for _ in range(4):
            frames.append(await camera.read())
            await asyncio.sleep(0.02)

    assert [frame.seq for frame in frames] == [0, 1, 2, 3]
    assert camera.dropped == 0


async def test_simulated_fps_slow_consumer_drops(tmp_path: Path) -> None:
    """A consumer slower than the fps gets the newest frame, and the skipped ones count."""
    for index in range(5):
        write_image(tmp_path / f"{index}.png", level=index)

    async with SimulatedCamera(tmp_path, fps=50, loop=True) as camera:
        frames = []
        for _ in range(3):
            await asyncio.sleep(0.15)
            frames.append(await camera.read())
            # Every frame before the one just read was either read or replaced, so the
            # count is exact whatever the machine load.
            assert camera.dropped == frames[-1].seq + 1 - len(frames)

    seqs = [frame.seq for frame in frames]
    assert seqs == sorted(set(seqs))
    assert camera.dropped >= 1


async def test_simulated_fps_paces_reads(tmp_path: Path) -> None:
    """At 20 fps, six frames take at least about five frame periods of loop time."""
    for index in range(6):
        write_image(tmp_path / f"{index}.png")
    loop = asyncio.get_running_loop()

    async with SimulatedCamera(tmp_path, fps=20) as camera:
        started = loop.time()
        frames = await read_all(camera)
        elapsed = loop.time() - started

    assert len(frames) + camera.dropped == 6
    assert elapsed >= 5 * 0.05 * 0.8


async def test_simulated_fps_exhausted_raises(tmp_path: Path) -> None:
    """With an fps, reading past the last image raises SourceExhausted."""
    write_image(tmp_path / "a.png")

    async with SimulatedCamera(tmp_path, fps=100) as camera:
        await camera.read()
        with pytest.raises(SourceExhausted):
            await camera.read()


async def test_simulated_corrupt_files_skipped(tmp_path: Path) -> None:
    """An undecodable and a truncated file are skipped, logged and counted."""
    write_image(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"\x89PNG not really")
    good_jpeg = write_noise_jpeg(tmp_path / "c.jpg").read_bytes()
    (tmp_path / "c.jpg").write_bytes(good_jpeg[:-10])
    write_image(tmp_path / "d.png")

    async with SimulatedCamera(tmp_path) as camera:
        frames = await read_all(camera)

    assert names(frames) == ["a.png", "d.png"]
    assert camera.skipped == 2


async def test_simulated_corrupt_file_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A skipped file is logged at ERROR with its path."""
    write_image(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"garbage")

    async with SimulatedCamera(tmp_path) as camera:
        await read_all(camera)

    errors = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    assert any(str(tmp_path / "b.png") in message for message in errors)


async def test_simulated_all_corrupt_raises(tmp_path: Path) -> None:
    """When every file of a looping pass fails, read raises CameraError, not SourceExhausted."""
    (tmp_path / "a.png").write_bytes(b"garbage")
    (tmp_path / "b.png").write_bytes(b"garbage")

    async with SimulatedCamera(tmp_path, loop=True) as camera:
        with pytest.raises(CameraError, match="whole pass") as caught:
            await camera.read()

    assert not isinstance(caught.value, SourceExhausted)


async def test_simulated_missing_path_raises(tmp_path: Path) -> None:
    """Opening a path that does not exist raises CameraError naming it."""
    camera = SimulatedCamera(tmp_path / "absent")

    with pytest.raises(CameraError, match="absent does not exist"):
        await camera.open()


async def test_simulated_empty_folder_raises(tmp_path: Path) -> None:
    """Opening a folder without images raises CameraError naming the folder."""
    (tmp_path / "notes.txt").write_text("no images here", encoding="utf-8")
    camera = SimulatedCamera(tmp_path)

    with pytest.raises(CameraError, match="has no images"):
        await camera.open()


async def test_simulated_read_before_open_raises(tmp_path: Path) -> None:
    """Reading a camera that was never opened raises CameraError."""
    camera = SimulatedCamera(write_image(tmp_path / "a.png"))

    with pytest.raises(CameraError, match="not open"):
        await camera.read()


async def test_simulated_video_source(tmp_path: Path) -> None:
    """A video is replayed frame by frame with path#index sources, then exhausted."""
    video = write_video(tmp_path / "clip.avi", 5)

    async with SimulatedCamera(video) as camera:
        frames = await read_all(camera)

    assert [frame.source for frame in frames] == [f"{video}#{index}" for index in range(5)]
    assert [frame.seq for frame in frames] == [0, 1, 2, 3, 4]
    assert frames[3].image.mean() == pytest.approx(24, abs=3)


async def test_simulated_video_loop_restarts(tmp_path: Path) -> None:
    """A looping video starts again at frame 0 after its last frame."""
    video = write_video(tmp_path / "clip.avi", 3)

    async with SimulatedCamera(video, loop=True) as camera:
        frames = [await camera.read() for _ in range(5)]

    assert [frame.source for frame in frames] == [
        f"{video}#0",
        f"{video}#1",
        f"{video}#2",
        f"{video}#0",
        f"{video}#1",
    ]
    assert frames[3].image.mean() == pytest.approx(0, abs=3)


async def test_simulated_invalid_video_raises(tmp_path: Path) -> None:
    """A file that is neither an image nor a video raises CameraError at open."""
    path = tmp_path / "clip.avi"
    path.write_bytes(b"not a video")
    camera = SimulatedCamera(path)

    with pytest.raises(CameraError, match=r"clip\.avi"):
        await camera.open()


async def test_simulated_grey_image_converted(tmp_path: Path) -> None:
    """A single-channel image is replayed as three equal BGR channels."""
    path = tmp_path / "grey.png"
    assert cv2.imwrite(str(path), np.full((HEIGHT, WIDTH), 90, dtype=np.uint8))

    async with SimulatedCamera(path) as camera:
        frame = await camera.read()

    assert frame.image.shape == (HEIGHT, WIDTH, 3)
    assert frame.image[0, 0].tolist() == [90, 90, 90]


async def test_simulated_bgra_image_converted(tmp_path: Path) -> None:
    """A BGRA image loses its alpha channel and keeps its colour."""
    path = tmp_path / "alpha.png"
    pixels = np.zeros((HEIGHT, WIDTH, 4), dtype=np.uint8)
    pixels[:] = (10, 20, 30, 128)
    assert cv2.imwrite(str(path), pixels)

    async with SimulatedCamera(path) as camera:
        frame = await camera.read()

    assert frame.image.shape == (HEIGHT, WIDTH, 3)
    assert frame.image[0, 0].tolist() == [10, 20, 30]


async def test_simulated_16bit_image_scaled(tmp_path: Path) -> None:
    """A 16-bit image is scaled by 255/65535 with rounding, not by dropping the low byte."""
    path = tmp_path / "deep.png"
    pixels = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint16)
    pixels[:, :, 0] = 65535
    pixels[:, :, 1] = 128 * 257
    pixels[:, :, 2] = 255 * 256
    assert cv2.imwrite(str(path), pixels)

    async with SimulatedCamera(path) as camera:
        frame = await camera.read()

    assert frame.image.dtype == np.uint8
    assert frame.image[0, 0].tolist() == [255, 128, 254]


def test_read_image_truncated_jpeg_rejected(tmp_path: Path) -> None:
    """A JPEG cut inside its scan data raises ImageError instead of decoding grey rows."""
    path = write_noise_jpeg(tmp_path / "cut.jpg")
    path.write_bytes(path.read_bytes()[:-10])

    with pytest.raises(ImageError, match="end-of-image marker"):
        read_image(path)


def test_read_image_trailing_bytes_accepted(tmp_path: Path) -> None:
    """A complete JPEG with bytes appended after its end-of-image marker still decodes."""
    path = write_noise_jpeg(tmp_path / "tail.jpg")
    path.write_bytes(path.read_bytes() + b"camera maker trailer")

    assert read_image(path).shape == (HEIGHT, WIDTH, 3)


def test_to_bgr8_float_image_scaled() -> None:
    """A float image in 0..1 becomes uint8 0..255, out-of-range values clipped."""
    pixels: npt.NDArray[np.float32] = np.array([[0.0, 0.5, 1.0, 2.0]], dtype=np.float32)

    converted = to_bgr8(pixels)

    assert converted[0, :, 0].tolist() == [0, 128, 255, 255]


async def test_opencv_video_file_frames(tmp_path: Path) -> None:
    """A video file as device gives BGR frames in increasing seq, then CameraError."""
    video = write_video(tmp_path / "clip.avi", 30)

    async with OpenCVCamera(str(video), read_timeout=5.0) as camera:
        frames = await read_all(camera)

    seqs = [frame.seq for frame in frames]
    assert frames
    assert seqs == sorted(set(seqs))
    assert frames[0].image.shape == (HEIGHT, WIDTH, 3)
    assert frames[0].source == str(video)
    assert len(frames) + camera.dropped == 30


async def test_opencv_slow_consumer_gets_newest(tmp_path: Path) -> None:
    """A consumer that waits gets the newest frame, and every earlier one counts as dropped."""
    video = write_video(tmp_path / "clip.avi", 20)

    async with OpenCVCamera(str(video)) as camera:
        # The capture thread decodes the 20 small frames in well under a second.
        await asyncio.sleep(1.0)
        frame = await camera.read()

    assert frame.seq == camera.dropped
    assert frame.seq == 19


async def test_opencv_missing_device_raises(tmp_path: Path) -> None:
    """Opening a device path that does not exist raises CameraError."""
    camera = OpenCVCamera(str(tmp_path / "absent.avi"))

    with pytest.raises(CameraError, match="cannot open camera"):
        await camera.open()


class StalledCapture:
    """A VideoCapture stand-in whose read blocks until released, like a stalled webcam."""

    def __init__(self, *args: Any) -> None:
        self.released = threading.Event()

    def isOpened(self) -> bool:
        return True

    def set(self, prop: int, value: float) -> bool:
        return True

    def get(self, prop: int) -> float:
        return 0.0

    def read(self) -> tuple[bool, None]:
        self.released.wait(5.0)
        return False, None

    def release(self) -> None:
        self.released.set()


async def test_opencv_read_timeout_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """A device that delivers nothing makes read raise CameraError after read_timeout."""
    captures: list[StalledCapture] = []

    def make_capture(*args: Any) -> StalledCapture:
        capture = StalledCapture(*args)
        captures.append(capture)
        return capture

    monkeypatch.setattr(cv2, "VideoCapture", make_capture)
    camera = OpenCVCamera(0, read_timeout=0.2)
    await camera.open()
    loop = asyncio.get_running_loop()
    started = loop.time()

    with pytest.raises(CameraError, match=r"no frame from camera 0 within 0\.2 s"):
        await camera.read()

    elapsed = loop.time() - started
    captures[0].released.set()
    await camera.close()
    assert elapsed >= 0.15


async def test_opencv_read_before_open_raises() -> None:
    """Reading a camera that was never opened raises CameraError."""
    with pytest.raises(CameraError, match="not open"):
        await OpenCVCamera(0).read()


def test_factory_simulated_kind(tmp_path: Path) -> None:
    """The simulated kind builds a SimulatedCamera with the given options."""
    camera = create_camera("simulated", path=tmp_path, fps=2.0, loop=True)

    assert isinstance(camera, SimulatedCamera)


def test_factory_opencv_kind() -> None:
    """The opencv kind builds an OpenCVCamera with the given options."""
    camera = create_camera("opencv", device="0", width=640, height=480)

    assert isinstance(camera, OpenCVCamera)


def test_factory_unknown_kind_raises() -> None:
    """An unknown kind raises ConfigError with the key camera.kind."""
    with pytest.raises(ConfigError, match="unknown camera kind 'ip'") as caught:
        create_camera("ip")

    assert caught.value.key == "camera.kind"


def test_factory_picamera2_not_available() -> None:
    """The picamera2 kind raises CameraError saying the backend is not in this build."""
    with pytest.raises(CameraError, match="picamera2 camera backend is not available"):
        create_camera("picamera2")


def test_factory_unknown_option_raises(tmp_path: Path) -> None:
    """An option the backend does not take raises ConfigError."""
    with pytest.raises(ConfigError, match="invalid options"):
        create_camera("simulated", path=tmp_path, colour=True)


def test_factory_invalid_value_raises(tmp_path: Path) -> None:
    """A negative fps raises ConfigError naming fps."""
    with pytest.raises(ConfigError, match="fps"):
        create_camera("simulated", path=tmp_path, fps=-1.0)
