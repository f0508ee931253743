"""Exceptions raised by the daemon.

Hierarchy::

    EdgeError
    ├── ConfigError          invalid or unreadable configuration
    ├── CameraError          a camera cannot be opened or stops delivering frames
    │   └── SourceExhausted  a finite source (image files, a video) has no more frames
    ├── ModelError           a detector model cannot be loaded or has an unknown layout
    ├── ReaderError          a reader cannot be set up (OCR engine, zbar library)
    ├── ImageError           a frame or crop has a shape or dtype no stage accepts
    └── PublishError         the MQTT publisher cannot be set up
"""

from __future__ import annotations


class EdgeError(Exception):
    """Base class of every error the daemon raises on purpose."""


class ConfigError(EdgeError):
    """Raised when a configuration file is missing, unreadable or has an invalid value.

    Attributes:
        key: Dotted key path of the invalid value (``"mqtt.port"``), or ``None`` when the
            whole file is at fault.
    """

    def __init__(self, message: str, *, key: str | None = None) -> None:
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


class CameraError(EdgeError):
    """Raised when a camera cannot be opened, or a capture fails or times out.

    Attributes:
        source: The device or path the camera reads from.
    """

    def __init__(self, message: str, *, source: str | None = None) -> None:
        self.source = source
        super().__init__(message)


class SourceExhausted(CameraError):
    """Raised by a finite camera source (files, a video without looping) after its last frame."""


class ModelError(EdgeError):
    """Raised when a detector model file is missing, invalid or has an output layout not handled.

    Attributes:
        path: The model file.
    """

    def __init__(self, message: str, *, path: str | None = None) -> None:
        self.path = path
        super().__init__(message)


class ReaderError(EdgeError):
    """Raised when a reader (OCR engine, code decoder) cannot be set up."""


class ImageError(EdgeError):
    """Raised when a frame or crop has a shape, dtype or channel count that cannot be converted."""


class PublishError(EdgeError):
    """Raised when the publisher cannot be set up (invalid broker address, TLS files)."""
