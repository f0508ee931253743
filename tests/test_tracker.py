"""The read tracker: first_seen, seen_again and gone events across frames."""

from __future__ import annotations

from typing import Any

import jsonschema
from mqtt_helpers import synthetic_result

from edge.config import TrackerConfig
from edge.results import (
    Box,
    Code,
    FrameResult,
    Reading,
    Region,
    RegionResult,
    RegionStatus,
    load_schema,
)
from edge.tracker import Tracker, iou, reads_of


def _qr(seq: int, at: float, text: str, box: Box) -> FrameResult:
    code = Code("QRCODE", text.encode(), text, box)
    region = RegionResult(
        Region("qr_code", 0.9, box), "codes", RegionStatus.OK, Reading(codes=(code,))
    )
    return FrameResult(seq, at, 640, 480, None, (region,), {"detect": 1, "read": 1, "total": 2})


def _kinds(events: list[dict[str, Any]]) -> list[str]:
    return [event["event"] for event in events]


def test_tracker_first_read_is_first_seen() -> None:
    """A value read for the first time yields one first_seen event with its value and box."""
    tracker = Tracker(TrackerConfig(), "pi")
    events = tracker.update(_qr(0, 100.0, "A", Box(10, 10, 50, 50)))
    assert _kinds(events) == ["first_seen"]
    assert events[0]["value"] == "A"
    assert events[0]["box"] == [10, 10, 50, 50]


def test_tracker_repeated_read_is_quiet() -> None:
    """The same value in an overlapping box within the interval yields no event."""
    tracker = Tracker(TrackerConfig(seen_again_interval=60), "pi")
    tracker.update(_qr(0, 100.0, "A", Box(10, 10, 50, 50)))
    events = tracker.update(_qr(1, 101.0, "A", Box(15, 12, 50, 50)))
    assert events == []
    assert tracker.active == 1


def test_tracker_seen_again_is_rate_limited() -> None:
    """seen_again comes once per interval however many frames show the value."""
    tracker = Tracker(TrackerConfig(seen_again_interval=5, gone_after=100), "pi")
    events: list[dict[str, Any]] = []
    for step in range(21):
        events += tracker.update(_qr(step, 100.0 + step, "A", Box(10, 10, 50, 50)))
    assert _kinds(events) == ["first_seen"] + ["seen_again"] * 4
    assert events[-1]["count"] == 21


def test_tracker_gone_after_absence() -> None:
    """A value missing for gone_after seconds ends with gone, stamped with its last frame."""
    tracker = Tracker(TrackerConfig(gone_after=3), "pi")
    tracker.update(_qr(0, 100.0, "A", Box(10, 10, 50, 50)))
    quiet = tracker.update(_qr(1, 102.0, "B", Box(300, 300, 50, 50)))
    events = tracker.update(_qr(2, 104.0, "B", Box(300, 300, 50, 50)))
    assert _kinds(quiet) == ["first_seen"]
    assert _kinds(events) == ["gone"]
    assert events[0]["value"] == "A"
    assert events[0]["frame"]["seq"] == 0


def test_tracker_distant_box_is_new_track() -> None:
    """The same value in a box that does not overlap starts a second track."""
    tracker = Tracker(TrackerConfig(), "pi")
    tracker.update(_qr(0, 100.0, "A", Box(10, 10, 50, 50)))
    events = tracker.update(_qr(1, 100.5, "A", Box(400, 300, 50, 50)))
    assert _kinds(events) == ["first_seen"]
    assert tracker.active == 2


def test_tracker_other_value_is_new_track() -> None:
    """A different value in the same place is a new track."""
    tracker = Tracker(TrackerConfig(), "pi")
    first = tracker.update(_qr(0, 100.0, "A", Box(10, 10, 50, 50)))
    second = tracker.update(_qr(1, 100.5, "B", Box(10, 10, 50, 50)))
    assert first[0]["track_id"] != second[0]["track_id"]


def test_tracker_finish_ends_every_track() -> None:
    """finish() yields gone for every open track and leaves none."""
    tracker = Tracker(TrackerConfig(), "pi")
    tracker.update(synthetic_result(0, captured_at=100.0))
    events = tracker.finish()
    assert _kinds(events) == ["gone", "gone"]
    assert tracker.active == 0


def test_tracker_events_match_schema() -> None:
    """Every event kind validates against events.schema.json."""
    validator = jsonschema.Draft202012Validator(
        load_schema("events"), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    tracker = Tracker(TrackerConfig(seen_again_interval=0, gone_after=1), "pi")
    events = tracker.update(synthetic_result(0, captured_at=100.0))
    events += tracker.update(synthetic_result(1, captured_at=100.5))
    events += tracker.update(_qr(2, 200.0, "other", Box(500, 400, 10, 10)))
    assert set(_kinds(events)) == {"first_seen", "seen_again", "gone"}
    for event in events:
        validator.validate(event)


def test_tracker_binary_code_value_is_base64() -> None:
    """A code without text is read as base64: and its bytes."""
    code = Code("QRCODE", b"\xff\x00", None, None)
    region = RegionResult(
        Region("qr_code", 0.9, Box(0, 0, 10, 10)), "codes", RegionStatus.OK, Reading(codes=(code,))
    )
    result = FrameResult(0, 1.0, 10, 10, None, (region,), {"total": 1})
    assert reads_of(result)[0].value == "base64:/wA="


def test_iou_disjoint_boxes_zero() -> None:
    """Boxes that only touch have no overlap."""
    assert iou(Box(0, 0, 10, 10), Box(10, 0, 10, 10)) == 0.0


def test_iou_same_box_one() -> None:
    """A box overlaps itself completely."""
    assert iou(Box(3, 4, 10, 10), Box(3, 4, 10, 10)) == 1.0
