"""A fake ``picamera2`` module for tests: the documented API, no camera and no libcamera.

Tests put ``tests/fake_picamera2`` first on ``sys.path`` and drive the fake through
:data:`state`. It follows picamera2's public API: ``Picamera2(camera_num)``,
``Picamera2.global_camera_info()``, ``create_video_configuration``, ``configure``,
``camera_configuration``, ``start``, ``capture_request`` (a request with ``make_array``,
``get_metadata`` and ``release``), ``capture_array``, ``cancel_all_and_flush``, ``stop`` and
``close``. Failures are raised the way picamera2 raises them: ``Picamera2()`` wraps every
open failure in ``RuntimeError("Camera __init__ sequence did not complete.")`` with the
libcamera error as its context, and a cancelled capture raises
:class:`concurrent.futures.CancelledError`.

Frames are RGB888 (B, G, R bytes): pixel ``(y, x)`` of frame ``n`` contains blue ``x % 256``,
green ``y % 256`` and red ``n % 256``. Row padding bytes are 255.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

DEFAULT_SIZE = (1280, 720)
PADDING_BYTE = 255


class FakeState:
    """What the fake camera system does; tests change the attributes.

    Attributes:
        cameras: What ``global_camera_info()`` returns; empty means no camera is connected.
        busy: Camera numbers another process holds, so ``Picamera2()`` fails as busy.
        stride_padding: Bytes of padding at the end of each row.
        array_layout: What ``make_array`` returns: ``view`` is ``(H, W, 3)`` whose rows are
            a stride apart, ``padded`` is ``(H, stride // 3, 3)`` with the padding pixels,
            ``rows`` is the raw ``(H, stride)`` bytes.
        stall_after: Instance index (0 for the first opened) to the number of frames after
            which that instance's captures block until cancelled.
        frame_interval: Seconds between frames.
        instances: Every successfully opened camera, in order.
        outstanding: Requests handed out and not released yet.
    """

    def __init__(self) -> None:
        self.cameras: list[dict[str, Any]] = [
            {"Model": "imx708", "Location": 2, "Rotation": 180, "Id": "/base/fake/imx708@1a"}
        ]
        self.busy: set[int] = set()
        self.stride_padding = 0
        self.array_layout: Literal["view", "padded", "rows"] = "view"
        self.stall_after: dict[int, int] = {}
        self.frame_interval = 0.005
        self.instances: list[Picamera2] = []
        self.outstanding = 0
        self.lock = threading.Lock()


state = FakeState()


def reset() -> FakeState:
    """Replace :data:`state` with a fresh one and return it."""
    global state
    state = FakeState()
    return state


class CompletedRequest:
    """A completed request holding one frame of the main stream."""

    def __init__(self, camera: Picamera2, buffer: npt.NDArray[np.uint8], seq: int) -> None:
        self._camera = camera
        self._buffer = buffer
        self._seq = seq
        self.released = False

    def make_array(self, name: str) -> npt.NDArray[np.uint8]:
        """Return a copy of the named stream as an array shaped by the fake's layout."""
        if self.released:
            msg = "CompletedRequest: request already released"
            raise RuntimeError(msg)
        if name != "main":
            msg = f"Stream {name!r} is not defined"
            raise RuntimeError(msg)
        stream = self._camera.camera_configuration()["main"]
        width, height = stream["size"]
        stride = stream["stride"]
        rows = self._buffer.copy().reshape(height, stride)
        if state.array_layout == "rows":
            return rows
        if state.array_layout == "padded":
            return rows[:, : (stride // 3) * 3].reshape(height, stride // 3, 3)
        return np.lib.stride_tricks.as_strided(
            rows, shape=(height, width, 3), strides=(stride, 3, 1), writeable=False
        )

    def get_metadata(self) -> dict[str, Any]:
        """Return frame metadata as picamera2 names it."""
        return {"SensorTimestamp": time.monotonic_ns(), "FrameDuration": 33333}

    def release(self) -> None:
        """Return the buffer to the camera system."""
        if self.released:
            msg = "CompletedRequest: lock now has negative ref_count"
            raise RuntimeError(msg)
        self.released = True
        with state.lock:
            state.outstanding -= 1


class Picamera2:
    """A fake camera with picamera2's constructor and methods."""

    camera_num: int
    is_open: bool

    def __init__(self, camera_num: int = 0, tuning: Any = None) -> None:
        try:
            if camera_num >= len(state.cameras):
                msg = "list index out of range"
                raise IndexError(msg)
            if camera_num in state.busy or any(
                c.camera_num == camera_num and c.is_open for c in state.instances
            ):
                msg = "Failed to acquire camera: Device or resource busy"
                raise RuntimeError(msg)
        except (IndexError, RuntimeError):
            # picamera2 raises this without "from", so the cause is only the context.
            msg = "Camera __init__ sequence did not complete."
            raise RuntimeError(msg)  # noqa: B904
        self.camera_num = camera_num
        self.index = len(state.instances)
        self.is_open = True
        self.started = False
        self.frames = 0
        self.camera_config: dict[str, Any] | None = None
        self._cancel = threading.Event()
        state.instances.append(self)

    @staticmethod
    def global_camera_info() -> list[dict[str, Any]]:
        """Return one dict per connected camera."""
        return [dict(info, Num=num) for num, info in enumerate(state.cameras)]

    def create_video_configuration(
        self,
        main: dict[str, Any] | None = None,
        lores: dict[str, Any] | None = None,
        raw: dict[str, Any] | None = None,
        transform: Any = None,
        colour_space: Any = None,
        buffer_count: int = 6,
        controls: dict[str, Any] | None = None,
        display: str | None = "main",
        encode: str | None = "main",
        queue: bool = True,
    ) -> dict[str, Any]:
        """Return a video configuration: XBGR8888 at 1280x720 unless ``main`` sets them."""
        stream = {"format": "XBGR8888", "size": DEFAULT_SIZE}
        stream.update(main or {})
        return {
            "use_case": "video",
            "main": stream,
            "lores": lores,
            "raw": raw,
            "buffer_count": buffer_count,
            "controls": {"FrameDurationLimits": (33333, 33333), **(controls or {})},
            "display": display,
            "encode": encode,
            "queue": queue,
        }

    def configure(self, camera_config: dict[str, Any]) -> None:
        """Apply a configuration, filling in the stride and frame size of the main stream."""
        if self.started:
            msg = "Camera must be stopped before configuring"
            raise RuntimeError(msg)
        main = dict(camera_config["main"])
        width, height = main["size"]
        bytes_per_pixel = 3 if main["format"] in ("RGB888", "BGR888") else 4
        main["stride"] = width * bytes_per_pixel + state.stride_padding
        main["framesize"] = main["stride"] * height
        self.camera_config = {**camera_config, "main": main}

    def camera_configuration(self) -> dict[str, Any]:
        """Return the configuration applied by :meth:`configure`."""
        if self.camera_config is None:
            msg = "Camera has not been configured"
            raise RuntimeError(msg)
        return self.camera_config

    def start(self) -> None:
        """Start streaming."""
        self.camera_configuration()
        self.started = True

    def capture_request(self, flush: Any = None, wait: Any = None) -> CompletedRequest:
        """Wait for the next frame and return its request; the caller must release it."""
        if not self.started:
            msg = "Camera has not been started"
            raise RuntimeError(msg)
        stall_at = state.stall_after.get(self.index)
        if stall_at is not None and self.frames >= stall_at:
            # Bounded so that a backend that never cancels fails the test instead of hanging.
            if not self._cancel.wait(60):
                msg = "fake stall was never cancelled with cancel_all_and_flush()"
                raise RuntimeError(msg)
            raise CancelledError
        if self._cancel.wait(state.frame_interval):
            raise CancelledError
        request = CompletedRequest(self, self._render(), self.frames)
        self.frames += 1
        with state.lock:
            state.outstanding += 1
        return request

    def capture_array(self, name: str = "main") -> npt.NDArray[np.uint8]:
        """Capture the next frame of the named stream as an array."""
        request = self.capture_request()
        try:
            return request.make_array(name)
        finally:
            request.release()

    def cancel_all_and_flush(self) -> None:
        """Cancel pending captures; they raise CancelledError."""
        self._cancel.set()

    def stop(self) -> None:
        """Stop streaming."""
        self.started = False

    def close(self) -> None:
        """Stop and release the camera so that another instance can open it."""
        self.stop()
        self.is_open = False

    def _render(self) -> npt.NDArray[np.uint8]:
        stream = self.camera_configuration()["main"]
        width, height = stream["size"]
        stride = stream["stride"]
        rows = np.full((height, stride), PADDING_BYTE, dtype=np.uint8)
        rows[:, 0 : width * 3 : 3] = (np.arange(width) % 256)[np.newaxis, :]
        rows[:, 1 : width * 3 : 3] = (np.arange(height) % 256)[:, np.newaxis]
        rows[:, 2 : width * 3 : 3] = self.frames % 256
        return rows.reshape(-1)
