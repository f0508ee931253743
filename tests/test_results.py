"""Frame result serialisation against the JSON Schema."""

from __future__ import annotations

import base64
import json

import jsonschema
import numpy as np
import pytest

from edge.results import (
    Box,
    Code,
    FrameResult,
    Origin,
    Reading,
    Region,
    RegionResult,
    RegionStatus,
    TextLine,
    format_timestamp,
)


def _result() -> FrameResult:
    code = Code("QRCODE", b"\x00\xffbin", None, Box(10, 10, 50, 50))
    label = TextLine("Crème brûlée 250 g", 0.93, Box(100, 100, 80, 20))
    return FrameResult(
        seq=3,
        captured_at=1_764_878_400.1234,
        width=640,
        height=480,
        source="frames/a.jpg",
        regions=(
            RegionResult(
                Region("qr_code", 0.9, Box(5, 5, 60, 60)),
                "codes",
                RegionStatus.OK,
                Reading(codes=(code,)),
                1.5,
            ),
            RegionResult(
                Region("text", 0.8, Box(90, 90, 100, 40)),
                "text",
                RegionStatus.OK,
                Reading(lines=(label,)),
                80.0,
            ),
            RegionResult(
                Region("text", 0.5, Box(0, 0, 4, 4)),
                "text",
                RegionStatus.TIMEOUT,
                error="timed out (operation timeout) after 5000 ms",
            ),
            RegionResult(
                Region("barcode", 1.0, Box(1, 2, 3, 4)),
                "codes",
                RegionStatus.EMPTY,
                origin=Origin.FULL_FRAME,
            ),
        ),
        timings_ms={"detect": 12.0, "read": 80.0, "total": 92.0},
    )


def test_frame_result_validates_against_schema(
    frame_validator: jsonschema.Draft202012Validator,
) -> None:
    """A result with every status, origin and payload kind is valid."""
    payload = json.loads(_result().to_json("pi-1"))
    frame_validator.validate(payload)


def test_frame_result_keeps_bytes_and_unicode() -> None:
    """Binary payloads survive base64 exactly and non-ASCII text stays UTF-8."""
    text = _result().to_json("pi-1")
    payload = json.loads(text)
    assert base64.b64decode(payload["regions"][0]["codes"][0]["bytes_b64"]) == b"\x00\xffbin"
    assert payload["regions"][0]["codes"][0]["text"] is None
    assert "Crème brûlée" in text


def test_schema_rejects_missing_and_extra_fields(
    frame_validator: jsonschema.Draft202012Validator,
) -> None:
    """The schema is strict: a missing field or an unknown one fails validation."""
    payload = _result().to_dict("pi-1")
    del payload["regions"][0]["status"]
    assert not frame_validator.is_valid(payload)
    payload = _result().to_dict("pi-1")
    payload["regions"][0]["colour"] = "red"
    assert not frame_validator.is_valid(payload)


def test_timestamp_format_is_utc_with_milliseconds() -> None:
    """Capture times are RFC 3339 UTC with exactly three decimals."""
    assert format_timestamp(0.5) == "1970-01-01T00:00:00.500Z"


def test_box_rejects_negative_size() -> None:
    """A box with a negative width is a programming error."""
    with pytest.raises(ValueError, match="negative"):
        Box(0, 0, -1, 5)


def test_nan_score_serialises_as_zero() -> None:
    """A non-finite score never reaches JSON (where NaN is invalid)."""
    result = RegionResult(Region("text", float(np.nan), Box(0, 0, 5, 5)), None, RegionStatus.EMPTY)
    frame = FrameResult(0, 0.0, 5, 5, None, (result,), {"detect": 0, "read": 0, "total": 0})
    assert json.loads(frame.to_json("d"))["regions"][0]["score"] == 0.0
