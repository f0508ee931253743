"""A camera that replays an image file, a folder of images or a video file."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np

from edge.camera.base import Camera
from edge.errors import CameraError, ImageError, SourceExhausted
from edge.images import to_bgr8
from edge.results import Frame, Image

logger = logging.getLogger(__name__)

#: File name extensions read as still images, compared in lower case.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})

_JPEG_EXTENSIONS = frozenset({".jpg", ".jpeg"})
_JPEG_START_OF_SCAN = b"\xff\xda"
_JPEG_END_OF_IMAGE = b"\xff\xd9"

_T = TypeVar("_T")


class SimulatedCamera(Camera):
    """Replay image files or a video as if they came from a camera.

    Images in a folder are read in file name order. Decoding runs on one worker thread owned
    by the camera, never on the event loop. A file that cannot be decoded is logged, counted in
    :attr:`skipped` and passed over.

    Args:
        path: An image file, a folder of images (extensions in :data:`IMAGE_EXTENSIONS`) or a
            video file that OpenCV can open.
        fps: Capture rate in frames per second. ``None`` or 0 hands every frame over in
            order, as fast as :meth:`read` is called, and never drops one. A positive rate
            captures in a background task and keeps only the newest frame.
        loop: Start over after the last frame. When ``False``, :meth:`read` raises
            :class:`~edge.errors.SourceExhausted` after the last frame.

    Raises:
        ValueError: ``fps`` is negative or not finite.
    """

    def __init__(self, path: Path | str, *, fps: float | None = None, loop: bool = False) -> None:
        if fps is not None and not (0.0 <= fps < float("inf")):
            msg = f"fps must be 0 or a positive number of frames per second, got {fps}"
            raise ValueError(msg)
        self._path = Path(path)
        self._period = 1.0 / fps if fps else None
        self._loop = loop

        self._files: list[Path] = []
        self._video: cv2.VideoCapture | None = None
        self._video_index = 0
        self._video_frame_count = 0
        self._position = 0
        self._failures_in_row = 0
        self._seq = 0
        self._dropped = 0
        self._skipped = 0

        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._read_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._slot: Frame | None = None
        self._slot_filled = asyncio.Event()
        self._capture_error: CameraError | None = None

    @property
    def dropped(self) -> int:
        """Frames captured but replaced by a newer one before :meth:`read` took them."""
        return self._dropped

    @property
    def skipped(self) -> int:
        """Image files or video frames that could not be decoded and were passed over."""
        return self._skipped

    @property
    def description(self) -> str:
        """The replayed path."""
        return str(self._path)

    async def open(self) -> None:
        """List the source files and start capturing when an fps is set.

        Raises:
            CameraError: The path does not exist, the folder has no images, or the video
                cannot be opened.
        """
        if self._executor is not None:
            return
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="edge-camera"
        )
        self._position = 0
        self._failures_in_row = 0
        self._slot = None
        self._capture_error = None
        try:
            await self._open_source()
        except BaseException:
            await self.close()
            raise

        if self._period is not None:
            self._task = asyncio.create_task(self._capture_loop(), name="edge.camera")
        logger.info(
            "Simulated camera opened: %s, %s, %s",
            self._path,
            f"{1.0 / self._period:g} fps" if self._period else "every frame in order",
            "looping" if self._loop else "once",
        )

    async def read(self) -> Frame:
        """Return the next frame (without an fps) or the newest one not yet handed over.

        Raises:
            SourceExhausted: The source has no more frames and ``loop`` is off.
            CameraError: The camera is not open, or no file of a whole pass could be decoded.
        """
        if self._executor is None:
            msg = f"simulated camera {self._path} is not open; call open() first"
            raise CameraError(msg, source=str(self._path))
        if self._period is None:
            async with self._read_lock:
                return await self._capture()

        while self._slot is None:
            if self._capture_error is not None:
                raise self._capture_error
            self._slot_filled.clear()
            await self._slot_filled.wait()
        frame, self._slot = self._slot, None
        return frame

    async def close(self) -> None:
        """Stop the capture task and release the video and the decoding thread."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        executor, self._executor = self._executor, None
        if executor is not None:
            video, self._video = self._video, None
            if video is not None:
                await asyncio.get_running_loop().run_in_executor(executor, video.release)
            executor.shutdown(wait=False)
            logger.info(
                "Simulated camera closed: %s, %d frames, %d dropped, %d skipped",
                self._path,
                self._seq,
                self._dropped,
                self._skipped,
            )

    async def _capture_loop(self) -> None:
        """Capture at the configured rate into the one-frame slot until the source ends."""
        assert self._period is not None
        loop = asyncio.get_running_loop()
        next_tick = loop.time()
        try:
            while True:
                frame = await self._capture()
                if self._slot is not None:
                    self._dropped += 1
                    logger.debug(
                        "Dropped frame %d: replaced by frame %d", self._slot.seq, frame.seq
                    )
                self._slot = frame
                self._slot_filled.set()

                next_tick += self._period
                delay = next_tick - loop.time()
                if delay < -self._period:
                    # Decoding fell behind by more than a frame, so restart the clock rather
                    # than capturing a burst of frames to catch up.
                    next_tick = loop.time()
                    delay = 0.0
                await asyncio.sleep(max(delay, 0.0))
        except CameraError as exc:
            self._capture_error = exc
        except Exception as exc:
            logger.exception("Simulated camera %s capture failed", self._path)
            msg = f"simulated camera {self._path} failed: {exc}"
            self._capture_error = CameraError(msg, source=str(self._path))
        finally:
            self._slot_filled.set()

    async def _capture(self) -> Frame:
        """Decode the next frame, skipping files that fail and starting over when looping."""
        while True:
            if self._at_end_of_pass():
                await self._finish_pass()
            image, source = await self._decode_next()
            if image is None:
                self._failures_in_row += 1
                if self._failures_in_row >= self._pass_length():
                    msg = (
                        f"no frame of {self._path} could be decoded in a whole pass; "
                        "check that the files are valid images or video"
                    )
                    raise CameraError(msg, source=str(self._path))
                continue
            self._failures_in_row = 0
            frame = Frame(seq=self._seq, captured_at=time.time(), image=image, source=source)
            self._seq += 1
            return frame

    async def _open_source(self) -> None:
        files = await self._in_worker(list_images, self._path)
        if files is None:
            await self._open_video()
        else:
            self._files = files

    async def _open_video(self) -> None:
        video = await self._in_worker(cv2.VideoCapture, str(self._path))
        if not video.isOpened():
            msg = (
                f"cannot open {self._path} as a video; use an image, a folder of images or a "
                "video file that OpenCV can decode"
            )
            raise CameraError(msg, source=str(self._path))
        self._video = video
        self._video_index = 0
        self._video_frame_count = max(0, int(video.get(cv2.CAP_PROP_FRAME_COUNT)))

    def _pass_length(self) -> int:
        """Count the reads one pass takes: the files, or the video's frames (at least 1)."""
        if self._video is not None:
            return max(1, self._video_frame_count)
        return len(self._files)

    def _at_end_of_pass(self) -> bool:
        # A video's pass ends at its first failed read past the declared frame count, which
        # _decode_video_frame detects, because some containers declare too few frames.
        return self._video is None and self._position >= len(self._files)

    async def _finish_pass(self) -> None:
        """Start the next pass, or raise SourceExhausted when not looping."""
        if not self._loop:
            msg = f"simulated camera {self._path} has no more frames"
            raise SourceExhausted(msg, source=str(self._path))
        logger.debug("Simulated camera %s starting over", self._path)
        self._position = 0
        if self._video is not None:
            await self._in_worker(self._video.release)
            self._video = None
            await self._open_video()

    async def _decode_next(self) -> tuple[Image | None, str]:
        """Decode the next file or video frame; the image is ``None`` when it failed."""
        if self._video is not None:
            return await self._decode_video_frame()
        path = self._files[self._position]
        self._position += 1
        try:
            image = await self._in_worker(read_image, path)
        except (OSError, ImageError) as exc:
            self._skipped += 1
            logger.error("Skipping image %s: %s", path, exc)
            return None, str(path)
        return image, str(path)

    async def _decode_video_frame(self) -> tuple[Image | None, str]:
        assert self._video is not None
        index = self._video_index
        self._video_index += 1
        source = f"{self._path}#{index}"
        ok, image = await self._in_worker(self._video.read)
        if ok and image is not None:
            try:
                return to_bgr8(image), source
            except ImageError as exc:
                self._skipped += 1
                logger.error("Skipping video frame %s: %s", source, exc)
                return None, source

        # NOTE: OpenCV reports a corrupt frame and the end of the stream the same way. A failed
        # read before the frame count the container declares is taken as a corrupt frame, and
        # any failed read when the count is unknown as the end of the video.
        if self._video_frame_count == 0 or index >= self._video_frame_count:
            self._video_frame_count = index
            if index == 0:
                msg = f"video {self._path} has no readable frames; check the file"
                raise CameraError(msg, source=str(self._path))
            await self._finish_pass()
            return await self._decode_next()
        self._skipped += 1
        logger.error("Skipping unreadable video frame %s", source)
        return None, source

    async def _in_worker(self, function: Callable[..., _T], *args: object) -> _T:
        if self._executor is None:
            msg = f"simulated camera {self._path} was closed"
            raise CameraError(msg, source=str(self._path))
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, function, *args)


def list_images(path: Path) -> list[Path] | None:
    """List the images to replay from a path, in file name order.

    Returns:
        The path itself when it is an image file, the images in it when it is a folder, or
        ``None`` when it is another file, to be opened as a video.

    Raises:
        CameraError: The path does not exist, or the folder has no images.
    """
    if not path.exists():
        msg = (
            f"camera path {path} does not exist; set camera.path to an image, "
            "a folder of images or a video file"
        )
        raise CameraError(msg, source=str(path))
    if path.is_dir():
        files = sorted(
            (
                child
                for child in path.iterdir()
                if child.is_file() and child.suffix.lower() in IMAGE_EXTENSIONS
            ),
            key=lambda child: child.name,
        )
        if not files:
            extensions = " ".join(sorted(IMAGE_EXTENSIONS))
            msg = f"folder {path} has no images ({extensions}); add images to it"
            raise CameraError(msg, source=str(path))
        return files
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return [path]
    return None


def read_image(path: Path) -> Image:
    """Read an image file as H x W x 3 uint8 BGR.

    Raises:
        OSError: The file cannot be read.
        ImageError: The file is not a decodable image, or a JPEG is truncated.
    """
    data = path.read_bytes()
    if path.suffix.lower() in _JPEG_EXTENSIONS and _jpeg_truncated(data):
        msg = f"JPEG file {path} ends before its end-of-image marker, so it is truncated"
        raise ImageError(msg)
    decoded = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if decoded is None:
        msg = f"cannot decode {path} as an image ({len(data)} bytes)"
        raise ImageError(msg)
    return to_bgr8(decoded)


def _jpeg_truncated(data: bytes) -> bool:
    """Check whether the last scan of a JPEG lacks the end-of-image marker after it.

    Some libjpeg builds decode a truncated JPEG with only a warning and fill the missing rows
    with grey (OpenCV 5.1 rejects it), so the markers are checked first. Scan data escapes
    every 0xFF byte, so neither marker occurs inside it. An embedded thumbnail's markers come
    before the main scan, and bytes appended after the final marker are accepted.
    """
    return data.rfind(_JPEG_END_OF_IMAGE) < data.rfind(_JPEG_START_OF_SCAN)
