"""A camera backend for Raspberry Pi cameras through picamera2 (libcamera).

picamera2 is imported when the camera opens, never at module import, so ``import edge``
works on machines without it. On Raspberry Pi OS it comes from the ``python3-picamera2``
package, so the daemon's virtual environment must be created with
``--system-site-packages`` to see it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from typing import Any

import numpy as np
import numpy.typing as npt

from edge.camera.base import Camera
from edge.errors import CameraError, ImageError
from edge.results import Frame, Image

logger = logging.getLogger(__name__)

#: The pixel format requested for the main stream. In picamera2, "RGB888" is 3 bytes per
#: pixel stored B, G, R, the order OpenCV expects (picamera2/request.py maps "RGB888" to PIL's
#: raw mode "BGR"), so frames need no channel swap.
PIXEL_FORMAT = "RGB888"
#: Seconds :meth:`Picamera2Camera.close` waits for the device to stop and close.
_CLOSE_TIMEOUT = 5.0
#: Seconds :meth:`Picamera2Camera.close` waits for the capture thread to end.
_JOIN_TIMEOUT = 2.0


class Picamera2Camera(Camera):
    """Capture from a Raspberry Pi camera with picamera2 on a dedicated thread.

    The main stream is configured as ``RGB888`` (BGR byte order) at the requested size. A
    capture thread takes completed requests with ``capture_request()``, copies the main
    stream with ``make_array("main")`` and releases the request at once. Only the newest
    frame is kept, and frames the consumer missed are counted in :attr:`dropped`. Row padding
    (a stride wider than ``width * 3`` bytes) is cropped and every frame is contiguous.

    Every capture runs under a deadline: when no frame arrives within ``capture_timeout``
    seconds, or a capture fails, :meth:`read` closes and reopens the camera once. If that
    fails or still yields no frame, :meth:`read` raises :class:`~edge.errors.CameraError`,
    so the daemon exits non-zero and systemd restarts it.

    Args:
        device: Camera number as libcamera lists it (``0`` is the first camera); a string
            of digits is accepted too.
        width: Main stream width in pixels; ``None`` or 0 keeps picamera2's video default.
        height: Main stream height in pixels; ``None`` or 0 keeps the default. Set width and
            height together.
        fps: Frame rate in frames per second, applied as ``FrameDurationLimits``; ``None``
            or 0 keeps the default.
        capture_timeout: Seconds without a new frame after which the capture counts as
            stalled. Must exceed one frame interval.
        buffer_count: Frame buffers picamera2 allocates; at least 2, so the camera fills
            one while the capture thread copies another.

    Raises:
        ValueError: An argument is out of range or ``device`` is not a camera number.
    """

    def __init__(
        self,
        device: int | str = 0,
        *,
        width: int | None = None,
        height: int | None = None,
        fps: float | None = None,
        capture_timeout: float = 5.0,
        buffer_count: int = 4,
    ) -> None:
        self._camera_num = _camera_number(device)
        if bool(width) != bool(height):
            msg = f"set width and height together, got width {width} and height {height}"
            raise ValueError(msg)
        for name, value in (("width", width), ("height", height), ("fps", fps)):
            if value is not None and value < 0:
                msg = f"{name} must not be negative, got {value}"
                raise ValueError(msg)
        if not capture_timeout > 0:
            msg = f"capture_timeout must be a positive number of seconds, got {capture_timeout}"
            raise ValueError(msg)
        if fps and capture_timeout <= 1 / fps:
            msg = (
                f"capture_timeout {capture_timeout:g} s must exceed one frame interval "
                f"({1 / fps:g} s at {fps:g} fps)"
            )
            raise ValueError(msg)
        if buffer_count < 2:
            msg = f"buffer_count must be at least 2, got {buffer_count}"
            raise ValueError(msg)
        self._size = (width, height) if width and height else None
        self._fps = fps or None
        self._capture_timeout = capture_timeout
        self._buffer_count = buffer_count

        self._device: Any = None
        self._frame_size = (0, 0)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._seq = 0
        self._dropped = 0
        self._reopens = 0
        self._slot: Frame | None = None
        self._slot_filled = asyncio.Event()
        self._capture_error: CameraError | None = None

    @property
    def dropped(self) -> int:
        """Frames captured but replaced by a newer one before :meth:`read` took them."""
        return self._dropped

    @property
    def reopens(self) -> int:
        """Times the camera was closed and reopened after a stall or a failed capture."""
        return self._reopens

    @property
    def description(self) -> str:
        """The camera number."""
        return f"picamera2:{self._camera_num}"

    async def open(self) -> None:
        """Open and configure the camera and start the capture thread.

        Raises:
            CameraError: picamera2 is not installed, no camera is connected, the camera is
                busy, or configuring or starting it failed.
        """
        if self._thread is not None:
            return
        await self._start()

    async def read(self) -> Frame:
        """Return the newest frame not yet handed over, reopening the camera once on a stall.

        Raises:
            CameraError: The camera is not open, or it stalled or failed and reopening it did
                not bring frames back.
        """
        if self._thread is None:
            msg = f"camera {self._camera_num} is not open; call open() first"
            raise CameraError(msg, source=self.description)
        outcome = await self._next_frame()
        if isinstance(outcome, Frame):
            return outcome

        logger.warning("Camera %d: %s; reopening it", self._camera_num, outcome)
        await self._reopen(outcome)
        outcome = await self._next_frame()
        if isinstance(outcome, Frame):
            logger.info("Camera %d delivers frames again after reopening", self._camera_num)
            return outcome
        msg = (
            f"camera {self._camera_num} still delivers no frames after reopening ({outcome}); "
            "check the ribbon cable and the power supply"
        )
        raise CameraError(msg, source=self.description) from outcome

    async def close(self) -> None:
        """Stop the capture thread and release the camera. Safe to call more than once."""
        if self._thread is None:
            return
        await self._shutdown()
        logger.info(
            "Camera %d closed: %d frames, %d dropped, %d reopens",
            self._camera_num,
            self._seq,
            self._dropped,
            self._reopens,
        )

    async def _start(self) -> None:
        device = await asyncio.to_thread(self._open_device)
        self._device = device
        self._stop = threading.Event()
        self._slot = None
        self._capture_error = None
        self._thread = threading.Thread(
            target=self._capture_frames,
            args=(device, asyncio.get_running_loop(), self._stop),
            name="edge-camera-picamera2",
            daemon=True,
        )
        self._thread.start()

    async def _reopen(self, reason: CameraError) -> None:
        self._reopens += 1
        await self._shutdown()
        try:
            await self._start()
        except CameraError as exc:
            msg = f"camera {self._camera_num} failed ({reason}) and reopening it failed: {exc}"
            raise CameraError(msg, source=self.description) from exc

    async def _shutdown(self) -> None:
        thread, self._thread = self._thread, None
        device, self._device = self._device, None
        self._stop.set()
        if device is not None:
            try:
                await asyncio.wait_for(
                    asyncio.to_thread(self._close_device, device), _CLOSE_TIMEOUT
                )
            except TimeoutError:
                # NOTE: the stuck close keeps its worker thread and may keep the camera
                # acquired, so a reopen then fails as busy and the daemon exits.
                logger.warning(
                    "Camera %d did not close within %.1f s; leaving it behind",
                    self._camera_num,
                    _CLOSE_TIMEOUT,
                )
        if thread is not None:
            await asyncio.to_thread(thread.join, _JOIN_TIMEOUT)
            if thread.is_alive():
                logger.warning(
                    "Camera %d capture thread still blocked after %.1f s; leaving it behind",
                    self._camera_num,
                    _JOIN_TIMEOUT,
                )
        self._slot = None
        self._capture_error = None

    async def _next_frame(self) -> Frame | CameraError:
        """Wait up to ``capture_timeout`` for a frame; return it or the reason there is none."""
        try:
            async with asyncio.timeout(self._capture_timeout):
                while self._slot is None:
                    if self._capture_error is not None:
                        return self._capture_error
                    self._slot_filled.clear()
                    await self._slot_filled.wait()
        except TimeoutError:
            msg = f"no frame within {self._capture_timeout:g} s (capture stalled)"
            return CameraError(msg, source=self.description)
        frame, self._slot = self._slot, None
        return frame

    def _open_device(self) -> Any:
        """Open, configure and start the camera. Runs on a worker thread because it blocks."""
        try:
            from picamera2 import Picamera2
        except ImportError as exc:
            msg = (
                "picamera2 is not installed; install it with 'apt install python3-picamera2' "
                "and create the virtual environment with --system-site-packages"
            )
            raise CameraError(msg, source=self.description) from exc

        cameras = Picamera2.global_camera_info()
        if not cameras:
            msg = (
                "no camera found by libcamera; check the ribbon cable and that "
                "'rpicam-hello --list-cameras' lists the camera"
            )
            raise CameraError(msg, source=self.description)
        if self._camera_num >= len(cameras):
            models = ", ".join(str(info.get("Model", "?")) for info in cameras)
            msg = (
                f"camera {self._camera_num} not found; libcamera lists {len(cameras)} "
                f"camera(s) ({models}); set camera.device to 0 to {len(cameras) - 1}"
            )
            raise CameraError(msg, source=self.description)

        try:
            device = Picamera2(self._camera_num)
        except RuntimeError as exc:
            raise CameraError(self._open_failure(exc), source=self.description) from exc
        try:
            self._configure(device)
        except (RuntimeError, ValueError, CameraError) as exc:
            self._close_device(device)
            if isinstance(exc, CameraError):
                raise
            msg = f"cannot configure camera {self._camera_num}: {exc}"
            raise CameraError(msg, source=self.description) from exc
        return device

    def _configure(self, device: Any) -> None:
        """Apply the RGB888 video configuration and start streaming."""
        main: dict[str, Any] = {"format": PIXEL_FORMAT}
        if self._size is not None:
            main["size"] = self._size
        controls: dict[str, Any] = {}
        if self._fps:
            frame_duration = round(1_000_000 / self._fps)  # microseconds
            controls["FrameDurationLimits"] = (frame_duration, frame_duration)

        config = device.create_video_configuration(
            main=main, buffer_count=self._buffer_count, controls=controls
        )
        device.configure(config)

        stream = device.camera_configuration()["main"]
        if stream["format"] != PIXEL_FORMAT:
            msg = (
                f"camera {self._camera_num} was configured as {stream['format']}, "
                f"not {PIXEL_FORMAT}"
            )
            raise CameraError(msg, source=self.description)
        width, height = stream["size"]
        self._frame_size = (int(width), int(height))

        device.start()
        logger.info(
            "Camera %d opened: %dx%d %s, stride %s bytes, %d buffers (requested %s at %s fps)",
            self._camera_num,
            width,
            height,
            PIXEL_FORMAT,
            stream.get("stride", "?"),
            self._buffer_count,
            "x".join(map(str, self._size)) if self._size else "default size",
            self._fps or "default",
        )

    def _open_failure(self, exc: RuntimeError) -> str:
        """Describe a failed ``Picamera2()``, telling a busy camera apart from other faults."""
        # picamera2 wraps the libcamera error in its own RuntimeError ("Camera __init__
        # sequence did not complete"), so the cause sits in the exception chain.
        chain: list[BaseException] = []
        error: BaseException | None = exc
        while error is not None and len(chain) < 10:
            chain.append(error)
            error = error.__cause__ or error.__context__
        details = "; ".join(str(e) for e in chain)
        if "busy" in details.lower():
            return (
                f"camera {self._camera_num} is busy: another process holds it ({details}); "
                "stop that process (another edge instance, rpicam-apps, a Python script). "
                "'fuser -v /dev/media* /dev/video*' lists the holders"
            )
        return (
            f"cannot open camera {self._camera_num}: {details}; check that no other process "
            "uses it and that the user is in the video group"
        )

    def _close_device(self, device: Any) -> None:
        """Cancel pending captures, stop and close the camera. Runs on a worker thread."""
        # Without the cancel, a capture_request() job waiting on a stalled camera stays
        # first in picamera2's job queue and stop() waits behind it for ever.
        # cancel_all_and_flush() exists only in newer picamera2 releases.
        cancel = getattr(device, "cancel_all_and_flush", None)
        try:
            if cancel is not None:
                cancel()
            device.stop()
        except RuntimeError as exc:
            logger.warning("Camera %d failed to stop cleanly: %s", self._camera_num, exc)
        try:
            device.close()
        except RuntimeError as exc:
            logger.warning("Camera %d failed to close cleanly: %s", self._camera_num, exc)

    def _capture_frames(
        self, device: Any, loop: asyncio.AbstractEventLoop, stop: threading.Event
    ) -> None:
        """Capture until ``stop`` is set or a capture fails. Runs on the capture thread."""
        while not stop.is_set():
            try:
                request = device.capture_request()
            except (RuntimeError, concurrent.futures.CancelledError) as exc:
                msg = f"capture failed: {exc or type(exc).__name__}"
                self._post(loop, stop, CameraError(msg, source=self.description))
                return
            # NOTE: wall-clock time when the request came back, not the sensor's
            # SensorTimestamp, whose clock is not converted to Unix time here.
            captured_at = time.time()
            try:
                image = to_bgr_frame(request.make_array("main"), self._frame_size)
            except (RuntimeError, ImageError) as exc:
                msg = f"unusable frame: {exc}"
                self._post(loop, stop, CameraError(msg, source=self.description))
                return
            finally:
                request.release()
            if not self._post(loop, stop, image, captured_at):
                return

    def _post(
        self,
        loop: asyncio.AbstractEventLoop,
        stop: threading.Event,
        item: Image | CameraError,
        captured_at: float = 0.0,
    ) -> bool:
        """Hand a frame or an error to the event loop; return False once the loop is closed."""
        # A thread left behind by a reopen has its own stop event set, so it never
        # delivers into the slot of the camera opened after it.
        if stop.is_set():
            return True
        try:
            if isinstance(item, CameraError):
                loop.call_soon_threadsafe(self._fail, stop, item)
            else:
                loop.call_soon_threadsafe(self._deliver, stop, item, captured_at)
        except RuntimeError:
            # call_soon_threadsafe raises RuntimeError once the event loop is closed, and then
            # no reader is left to take frames.
            logger.debug("Camera %d event loop closed; capture thread exits", self._camera_num)
            return False
        return True

    def _deliver(self, stop: threading.Event, image: Image, captured_at: float) -> None:
        """Put a frame in the slot. Runs on the event loop."""
        if stop.is_set():
            return
        frame = Frame(seq=self._seq, captured_at=captured_at, image=image, source=self.description)
        self._seq += 1
        if self._slot is not None:
            self._dropped += 1
            logger.debug("Dropped frame %d: replaced by frame %d", self._slot.seq, frame.seq)
        self._slot = frame
        self._slot_filled.set()

    def _fail(self, stop: threading.Event, error: CameraError) -> None:
        """Record why capturing stopped. Runs on the event loop."""
        if stop.is_set():
            return
        self._capture_error = error
        self._slot_filled.set()


def to_bgr_frame(array: npt.NDArray[Any], size: tuple[int, int]) -> Image:
    """Convert a picamera2 ``RGB888`` main-stream array to a contiguous H x W x 3 BGR image.

    Accepts the shapes picamera2 releases return: ``(H, W, 3)`` (possibly a view whose rows
    are a stride apart), ``(H, W', 3)`` with padding pixels ``W' > W``, and raw rows
    ``(H, stride)`` with ``stride >= W * 3`` bytes. Padding columns are cropped.

    Args:
        array: The array from ``make_array("main")``.
        size: The configured stream size ``(width, height)`` in pixels.

    Raises:
        ImageError: The array's dtype or shape does not fit an RGB888 frame of ``size``.
    """
    width, height = size
    if array.dtype != np.uint8:
        msg = f"expected uint8 pixels from an {PIXEL_FORMAT} stream, got {array.dtype}"
        raise ImageError(msg)
    if array.ndim == 2 and array.shape[0] == height and array.shape[1] >= width * 3:
        image = array[:, : width * 3].reshape(height, width, 3)
    elif (
        array.ndim == 3
        and array.shape[0] == height
        and array.shape[1] >= width
        and array.shape[2] == 3
    ):
        image = array[:, :width]
    else:
        msg = (
            f"unexpected frame shape {array.shape} for a {width}x{height} {PIXEL_FORMAT} "
            "stream; expected (height, width, 3) or (height, stride)"
        )
        raise ImageError(msg)
    return np.ascontiguousarray(image, dtype=np.uint8)


def _camera_number(device: int | str) -> int:
    if isinstance(device, str):
        if not device.isdigit():
            msg = f"picamera2 takes a camera number such as 0, got device {device!r}"
            raise ValueError(msg)
        device = int(device)
    if device < 0:
        msg = f"camera number must not be negative, got {device}"
        raise ValueError(msg)
    return device
