"""Frame and region types shared by the camera, pipeline, scan and publisher.

The JSON form of a :class:`FrameResult` is the payload of the MQTT ``frames`` topic and the
output of ``edge scan``; ``edge/schemas/frame.schema.json`` describes it, and
:data:`SCHEMA_VERSION` changes whenever a field changes meaning or disappears.
"""

from __future__ import annotations

import base64
import datetime as dt
import enum
import json
import math
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

import numpy as np
import numpy.typing as npt

SCHEMA_VERSION = 1

Image = npt.NDArray[np.uint8]


@dataclass(frozen=True, slots=True, eq=False)
class Frame:
    """One captured image.

    Attributes:
        seq: Sequence number from the camera, starting at 0 and never reused while it runs.
        captured_at: Capture time as Unix time in seconds (sensor time where the camera has it).
        image: Pixels, H x W x 3, uint8, BGR channel order.
        source: The file a simulated frame came from (a video's path with ``#`` and the
            frame's index), or the device name; ``None`` if unknown.
    """

    seq: int
    captured_at: float
    image: Image
    source: str | None = None

    @property
    def width(self) -> int:
        """Frame width in pixels."""
        return int(self.image.shape[1])

    @property
    def height(self) -> int:
        """Frame height in pixels."""
        return int(self.image.shape[0])


@dataclass(frozen=True, slots=True)
class Box:
    """Axis-aligned box in frame pixels: left, top, width and height."""

    x: int
    y: int
    w: int
    h: int

    def __post_init__(self) -> None:
        if self.w < 0 or self.h < 0:
            msg = f"box size must not be negative, got {self.w}x{self.h}"
            raise ValueError(msg)

    @property
    def area(self) -> int:
        """Area in square pixels."""
        return self.w * self.h

    def as_list(self) -> list[int]:
        """Return ``[x, y, w, h]``."""
        return [self.x, self.y, self.w, self.h]


@dataclass(frozen=True, slots=True)
class Region:
    """A detection: a class name, a confidence score in 0..1 and a box in frame pixels."""

    class_name: str
    score: float
    box: Box


@dataclass(frozen=True, slots=True)
class Code:
    """A decoded QR code or barcode.

    Attributes:
        format: Symbology as zbar names it (``QRCODE``, ``EAN13``, ``CODE128``, ...).
        data: The payload bytes exactly as decoded.
        text: The payload as text when it decodes cleanly as UTF-8 (or the symbol declares
            another encoding that decodes cleanly); ``None`` for binary payloads.
        box: Where the symbol is in the frame, if the decoder reports it.
    """

    format: str
    data: bytes
    text: str | None
    box: Box | None = None


@dataclass(frozen=True, slots=True)
class TextLine:
    """One recognised line of text with the recogniser's confidence in 0..1."""

    text: str
    score: float
    box: Box | None = None


@dataclass(frozen=True, slots=True)
class Reading:
    """Reader output for one crop. Both tuples empty means nothing was found."""

    codes: tuple[Code, ...] = ()
    lines: tuple[TextLine, ...] = ()

    @property
    def empty(self) -> bool:
        """Whether nothing was found."""
        return not self.codes and not self.lines


class RegionStatus(enum.StrEnum):
    """Outcome of reading one region."""

    OK = "ok"
    EMPTY = "empty"
    TIMEOUT = "timeout"
    ERROR = "error"


class Origin(enum.StrEnum):
    """Where a region came from."""

    DETECTOR = "detector"
    FULL_FRAME = "full_frame"
    DOCUMENT = "document"


@dataclass(frozen=True, slots=True)
class RegionResult:
    """A region with the outcome of reading it.

    Attributes:
        region: The detection.
        reader: Name of the reader that handled it (``text``, ``codes``), or ``None`` when no
            reader is routed for its class.
        status: Outcome of the read.
        reading: What was read; empty unless ``status`` is ``OK``.
        elapsed_ms: Time spent reading, in milliseconds (queue time excluded).
        origin: Whether the detector found the region, the full-frame code decode did, or
            the region is a document frame whose text was read whole.
        error: A one-line description of the failure for ``ERROR`` and ``TIMEOUT``.
        reused: The reading is the previous frame's, handed over again because the region's
            pixels did not change; nothing was read this frame.
    """

    region: Region
    reader: str | None
    status: RegionStatus
    reading: Reading = field(default_factory=Reading)
    elapsed_ms: float = 0.0
    origin: Origin = Origin.DETECTOR
    error: str | None = None
    reused: bool = False


@dataclass(frozen=True, slots=True)
class FrameResult:
    """Everything the pipeline produced for one frame.

    Attributes:
        seq: The frame's sequence number.
        captured_at: Capture time, Unix seconds.
        width: Frame width in pixels.
        height: Frame height in pixels.
        source: The frame's source file or device.
        regions: One entry per region, detector regions first, in detection order. On a
            document frame, one whole-frame region replaces the text regions it covers.
        timings_ms: Milliseconds per stage: ``detect``, ``queue`` (the wait for the previous
            frame's reads), ``read`` and ``total``.
        rejected_regions: Detections discarded before reading (degenerate boxes).
    """

    seq: int
    captured_at: float
    width: int
    height: int
    source: str | None
    regions: tuple[RegionResult, ...]
    timings_ms: dict[str, float]
    rejected_regions: int = 0

    def to_dict(self, device_id: str, *, replayed: bool = False) -> dict[str, Any]:
        """Build the JSON-ready payload described by ``frame.schema.json``."""
        return {
            "schema_version": SCHEMA_VERSION,
            "device_id": device_id,
            "replayed": replayed,
            "frame": {
                "seq": self.seq,
                "captured_at": format_timestamp(self.captured_at),
                "width": self.width,
                "height": self.height,
                "source": self.source,
            },
            "regions": [_region_to_dict(r) for r in self.regions],
            "rejected_regions": self.rejected_regions,
            "timings_ms": {k: round(v, 2) for k, v in self.timings_ms.items()},
        }

    def to_json(self, device_id: str, *, replayed: bool = False) -> str:
        """Serialise :meth:`to_dict` compactly, keeping non-ASCII text as UTF-8."""
        return json.dumps(
            self.to_dict(device_id, replayed=replayed), ensure_ascii=False, separators=(",", ":")
        )


def format_timestamp(unix_seconds: float) -> str:
    """Format Unix time as RFC 3339 UTC with milliseconds, e.g. ``2026-12-04T20:00:00.123Z``."""
    moment = dt.datetime.fromtimestamp(unix_seconds, tz=dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _score(value: float) -> float:
    return round(value, 4) if math.isfinite(value) else 0.0


def _code_to_dict(code: Code) -> dict[str, Any]:
    return {
        "format": code.format,
        "text": code.text,
        "bytes_b64": base64.b64encode(code.data).decode("ascii"),
        "box": code.box.as_list() if code.box else None,
    }


def _region_to_dict(result: RegionResult) -> dict[str, Any]:
    return {
        "class": result.region.class_name,
        "score": _score(result.region.score),
        "box": result.region.box.as_list(),
        "origin": str(result.origin),
        "reader": result.reader,
        "status": str(result.status),
        "codes": [_code_to_dict(c) for c in result.reading.codes],
        "lines": [
            {
                "text": line.text,
                "score": _score(line.score),
                "box": line.box.as_list() if line.box else None,
            }
            for line in result.reading.lines
        ],
        "elapsed_ms": round(result.elapsed_ms, 2),
        "error": result.error,
        "reused": result.reused,
    }


@cache
def load_schema(name: str) -> dict[str, Any]:
    """Load a bundled JSON Schema by file stem (``"frame"``)."""
    text = resources.files("edge.schemas").joinpath(f"{name}.schema.json").read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema
