"""A camera backend for USB webcams read through OpenCV (V4L2 on Linux)."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time

import cv2

from edge.camera.base import Camera
from edge.errors import CameraError, ImageError
from edge.images import to_bgr8
from edge.results import Frame, Image

logger = logging.getLogger(__name__)

#: Seconds :meth:`OpenCVCamera.close` waits for the capture thread before leaving it behind.
_JOIN_TIMEOUT = 2.0


class OpenCVCamera(Camera):
    """Capture from a webcam with ``cv2.VideoCapture`` on a dedicated thread.

    The thread reads as fast as the device delivers and keeps only the newest frame. A slow
    consumer therefore gets the newest frame, and the frames it missed are counted in
    :attr:`dropped`. A failed
    read stops the thread, and :meth:`read` then raises :class:`~edge.errors.CameraError`.

    Args:
        device: Device index (``0`` is ``/dev/video0``) or a device or file path. A string
            of digits is taken as an index.
        width: Requested capture width in pixels; ``None`` or 0 keeps the device default.
        height: Requested capture height in pixels; ``None`` or 0 keeps the device default.
        fps: Requested device frame rate; ``None`` or 0 keeps the device default. The
            device may pick another rate, which is logged at :meth:`open`.
        read_timeout: Seconds :meth:`read` waits for a frame before raising CameraError.

    Raises:
        ValueError: ``read_timeout`` is not positive, or a size or rate is negative.
    """

    def __init__(
        self,
        device: int | str = 0,
        *,
        width: int | None = None,
        height: int | None = None,
        fps: float | None = None,
        read_timeout: float = 5.0,
    ) -> None:
        if read_timeout <= 0:
            msg = f"read_timeout must be a positive number of seconds, got {read_timeout}"
            raise ValueError(msg)
        for name, value in (("width", width), ("height", height), ("fps", fps)):
            if value is not None and value < 0:
                msg = f"{name} must not be negative, got {value}"
                raise ValueError(msg)
        if isinstance(device, str) and device.isdigit():
            device = int(device)
        self._device = device
        self._width = width or None
        self._height = height or None
        self._fps = fps or None
        self._read_timeout = read_timeout

        self._capture: cv2.VideoCapture | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._seq = 0
        self._dropped = 0
        self._slot: Frame | None = None
        self._slot_filled = asyncio.Event()
        self._capture_error: CameraError | None = None

    @property
    def dropped(self) -> int:
        """Frames captured but replaced by a newer one before :meth:`read` took them."""
        return self._dropped

    @property
    def description(self) -> str:
        """The device index or path."""
        return f"opencv:{self._device}"

    async def open(self) -> None:
        """Open the device, apply the requested format and start the capture thread.

        Raises:
            CameraError: The device cannot be opened.
        """
        if self._thread is not None:
            return
        capture = await asyncio.to_thread(self._open_capture)
        self._capture = capture
        self._stop.clear()
        self._slot = None
        self._capture_error = None
        loop = asyncio.get_running_loop()
        self._thread = threading.Thread(
            target=self._capture_frames,
            args=(capture, loop),
            name="edge-camera-opencv",
            daemon=True,
        )
        self._thread.start()

    async def read(self) -> Frame:
        """Return the newest frame not yet handed over, waiting up to ``read_timeout``.

        Raises:
            CameraError: The camera is not open, the device failed, or no frame arrived
                within ``read_timeout`` seconds.
        """
        if self._thread is None:
            msg = f"camera {self._device} is not open; call open() first"
            raise CameraError(msg, source=str(self._device))
        try:
            async with asyncio.timeout(self._read_timeout):
                while self._slot is None:
                    if self._capture_error is not None:
                        raise self._capture_error
                    self._slot_filled.clear()
                    await self._slot_filled.wait()
        except TimeoutError as exc:
            msg = (
                f"no frame from camera {self._device} within {self._read_timeout:g} s; "
                "check the cable and that no other program uses the device"
            )
            raise CameraError(msg, source=str(self._device)) from exc
        frame, self._slot = self._slot, None
        return frame

    async def close(self) -> None:
        """Stop the capture thread and release the device."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        await asyncio.to_thread(thread.join, _JOIN_TIMEOUT)
        if thread.is_alive():
            # NOTE: a read blocked inside the driver cannot be interrupted, so the daemon
            # thread is left to release the device when that read returns.
            logger.warning(
                "Camera %s capture thread still blocked after %.1f s; leaving it behind",
                self._device,
                _JOIN_TIMEOUT,
            )
        self._capture = None
        logger.info(
            "Camera %s closed: %d frames, %d dropped", self._device, self._seq, self._dropped
        )

    def _open_capture(self) -> cv2.VideoCapture:
        """Open and configure the device. Runs on a worker thread because opening can block."""
        if isinstance(self._device, int) and sys.platform.startswith("linux"):
            capture = cv2.VideoCapture(self._device, cv2.CAP_V4L2)
        else:
            capture = cv2.VideoCapture(self._device)
        if not capture.isOpened():
            capture.release()
            msg = (
                f"cannot open camera {self._device}; check that it is plugged in, that the "
                "user may read it (group video) and that camera.device is right"
            )
            raise CameraError(msg, source=str(self._device))

        if self._width:
            capture.set(cv2.CAP_PROP_FRAME_WIDTH, self._width)
        if self._height:
            capture.set(cv2.CAP_PROP_FRAME_HEIGHT, self._height)
        if self._fps:
            capture.set(cv2.CAP_PROP_FPS, self._fps)
        logger.info(
            "Camera %s opened: %dx%d at %.1f fps (requested %sx%s at %s fps)",
            self._device,
            int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
            int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
            capture.get(cv2.CAP_PROP_FPS),
            self._width or "default",
            self._height or "default",
            self._fps or "default",
        )
        return capture

    def _capture_frames(self, capture: cv2.VideoCapture, loop: asyncio.AbstractEventLoop) -> None:
        """Read frames until stopped or a read fails. Runs on the capture thread."""
        try:
            while not self._stop.is_set():
                ok, raw = capture.read()
                captured_at = time.time()
                if not ok or raw is None:
                    msg = f"camera {self._device} stopped delivering frames (read failed)"
                    self._post(loop, CameraError(msg, source=str(self._device)))
                    return
                try:
                    image = to_bgr8(raw)
                except ImageError as exc:
                    msg = f"camera {self._device} delivered an unusable frame: {exc}"
                    self._post(loop, CameraError(msg, source=str(self._device)))
                    return
                self._post(loop, image, captured_at)
        except RuntimeError:
            # call_soon_threadsafe raises RuntimeError once the event loop is closed, and then
            # no reader is left to take frames.
            logger.debug("Camera %s event loop closed; capture thread exits", self._device)
        finally:
            capture.release()

    def _post(
        self,
        loop: asyncio.AbstractEventLoop,
        item: Image | CameraError,
        captured_at: float = 0.0,
    ) -> None:
        if self._stop.is_set():
            return
        if isinstance(item, CameraError):
            loop.call_soon_threadsafe(self._fail, item)
        else:
            loop.call_soon_threadsafe(self._deliver, item, captured_at)

    def _deliver(self, image: Image, captured_at: float) -> None:
        """Put a frame in the slot. Runs on the event loop."""
        frame = Frame(seq=self._seq, captured_at=captured_at, image=image, source=str(self._device))
        self._seq += 1
        if self._slot is not None:
            self._dropped += 1
            logger.debug("Dropped frame %d: replaced by frame %d", self._slot.seq, frame.seq)
        self._slot = frame
        self._slot_filled.set()

    def _fail(self, error: CameraError) -> None:
        """Record why capturing stopped. Runs on the event loop."""
        logger.info("Camera %s capture thread stopped: %s", self._device, error)
        self._capture_error = error
        self._slot_filled.set()
