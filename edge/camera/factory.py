"""Build a camera backend from its configured kind."""

from __future__ import annotations

import importlib.util
from typing import Any

from edge.camera.base import Camera
from edge.errors import CameraError, ConfigError

#: Camera kinds accepted by :func:`create_camera`.
CAMERA_KINDS = ("simulated", "opencv", "picamera2")


def create_camera(kind: str, **options: Any) -> Camera:
    """Create the camera backend named by ``kind`` with backend-specific options.

    Args:
        kind: ``simulated`` (:class:`~edge.camera.simulated.SimulatedCamera`), ``opencv``
            (:class:`~edge.camera.opencv.OpenCVCamera`) or ``picamera2``
            (:class:`~edge.camera.picamera.Picamera2Camera`).
        **options: Keyword arguments of the backend's constructor, such as ``path`` and
            ``fps`` for ``simulated`` or ``device`` and ``width`` for ``opencv``.

    Raises:
        ConfigError: ``kind`` is unknown, or an option is missing, unknown or invalid for it.
        CameraError: ``picamera2`` is requested but the picamera2 module is not installed.
    """
    if kind == "simulated":
        from edge.camera.simulated import SimulatedCamera

        return _construct(kind, SimulatedCamera, options)
    if kind == "opencv":
        from edge.camera.opencv import OpenCVCamera

        return _construct(kind, OpenCVCamera, options)
    if kind == "picamera2":
        # Checked here, without importing picamera2, so that a missing package fails at
        # start with the fix instead of at the first open.
        if importlib.util.find_spec("picamera2") is None:
            msg = (
                "the picamera2 camera backend is not available: the picamera2 module is not "
                "installed; install python3-picamera2 with apt and create the virtual "
                "environment with --system-site-packages, or use camera.kind opencv"
            )
            raise CameraError(msg, source="picamera2")
        from edge.camera.picamera import Picamera2Camera

        return _construct(kind, Picamera2Camera, options)
    msg = f"unknown camera kind {kind!r}; expected one of {', '.join(CAMERA_KINDS)}"
    raise ConfigError(msg, key="camera.kind")


def _construct(kind: str, backend: type[Camera], options: dict[str, Any]) -> Camera:
    try:
        return backend(**options)
    except TypeError as exc:
        msg = f"invalid options {sorted(options)} for camera kind {kind!r}: {exc}"
        raise ConfigError(msg, key="camera") from exc
    except ValueError as exc:
        raise ConfigError(str(exc), key="camera") from exc
