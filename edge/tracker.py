"""Read events: repeated reads of one value across frames become one track.

A read is a decoded code, or the text lines of a text region joined by newlines. A read in a
new frame continues a track when it has the same class and value and its box overlaps the
track's last box. Each track yields ``first_seen`` once, ``seen_again`` at most every
``tracker.seen_again_interval`` seconds, and ``gone`` once no read continued it for
``tracker.gone_after`` seconds of capture time. The payloads follow ``events.schema.json``.
"""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass
from typing import Any

from edge.config import TrackerConfig
from edge.results import SCHEMA_VERSION, Box, FrameResult, RegionStatus, format_timestamp

FIRST_SEEN = "first_seen"
SEEN_AGAIN = "seen_again"
GONE = "gone"


@dataclass(frozen=True, slots=True)
class Read:
    """One value read in one frame.

    Attributes:
        class_name: Detector class of the region.
        value: Code text, ``base64:`` and the payload bytes for binary codes, or the text lines.
        format: Code symbology (``QRCODE``, ``EAN13``); ``None`` for text.
        box: Where the value is, in frame pixels.
    """

    class_name: str
    value: str
    format: str | None
    box: Box


@dataclass(slots=True)
class _Track:
    id: str
    read: Read
    first_seen_at: float
    last_seen_at: float
    last_event_at: float
    seq: int
    count: int


def reads_of(result: FrameResult) -> list[Read]:
    """Return the values read in a frame, in region order."""
    reads: list[Read] = []
    for region in result.regions:
        if region.status is not RegionStatus.OK:
            continue
        class_name = region.region.class_name
        for code in region.reading.codes:
            value = code.text
            if value is None:
                value = "base64:" + base64.b64encode(code.data).decode("ascii")
            reads.append(Read(class_name, value, code.format, code.box or region.region.box))
        text = "\n".join(line.text for line in region.reading.lines if line.text)
        if text:
            reads.append(Read(class_name, text, None, region.region.box))
    return reads


def iou(a: Box, b: Box) -> float:
    """Return the intersection over union of two boxes, 0 when they do not overlap."""
    width = min(a.x + a.w, b.x + b.w) - max(a.x, b.x)
    height = min(a.y + a.h, b.y + b.h) - max(a.y, b.y)
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    return inter / (a.area + b.area - inter)


class Tracker:
    """Turns frame results into ``first_seen``, ``seen_again`` and ``gone`` events.

    Args:
        config: Overlap threshold, ``seen_again`` interval and ``gone`` delay.
        device_id: ``device_id`` of every event.
    """

    def __init__(self, config: TrackerConfig, device_id: str) -> None:
        self._config = config
        self._device_id = device_id
        self._tracks: list[_Track] = []

    @property
    def active(self) -> int:
        """Number of tracks that have not ended."""
        return len(self._tracks)

    def update(self, result: FrameResult) -> list[dict[str, Any]]:
        """Match the frame's reads to tracks and return the events, in order."""
        now = result.captured_at
        events: list[dict[str, Any]] = []
        continued: set[str] = set()
        for read in reads_of(result):
            track = self._match(read, continued)
            if track is None:
                track = _Track(uuid.uuid4().hex[:16], read, now, now, now, result.seq, 1)
                self._tracks.append(track)
                continued.add(track.id)
                events.append(self._event(FIRST_SEEN, track, result.captured_at))
                continue
            continued.add(track.id)
            track.read = read
            track.last_seen_at = now
            track.seq = result.seq
            track.count += 1
            if now - track.last_event_at >= self._config.seen_again_interval:
                track.last_event_at = now
                events.append(self._event(SEEN_AGAIN, track, result.captured_at))
        for track in list(self._tracks):
            if track.id not in continued and now - track.last_seen_at >= self._config.gone_after:
                self._tracks.remove(track)
                events.append(self._event(GONE, track, track.last_seen_at))
        return events

    def finish(self) -> list[dict[str, Any]]:
        """End every track with ``gone``, for a clean exit."""
        events = [self._event(GONE, track, track.last_seen_at) for track in self._tracks]
        self._tracks.clear()
        return events

    def _match(self, read: Read, continued: set[str]) -> _Track | None:
        best: _Track | None = None
        best_iou = -1.0
        for track in self._tracks:
            if track.id in continued:
                continue
            if track.read.class_name != read.class_name or track.read.value != read.value:
                continue
            overlap = iou(track.read.box, read.box)
            if overlap <= 0 or overlap < self._config.min_iou:
                continue
            if overlap > best_iou:
                best, best_iou = track, overlap
        return best

    def _event(self, kind: str, track: _Track, captured_at: float) -> dict[str, Any]:
        read = track.read
        return {
            "schema_version": SCHEMA_VERSION,
            "device_id": self._device_id,
            "replayed": False,
            "event": kind,
            "track_id": track.id,
            "class": read.class_name,
            "value": read.value,
            "format": read.format,
            "box": read.box.as_list(),
            "frame": {"seq": track.seq, "captured_at": format_timestamp(captured_at)},
            "first_seen_at": format_timestamp(track.first_seen_at),
            "last_seen_at": format_timestamp(track.last_seen_at),
            "count": track.count,
        }
