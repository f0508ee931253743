"""Tests for the zbar code reader on rendered codes and on real QR code images."""

from __future__ import annotations

import base64
import io
import json
import multiprocessing
import pickle
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import segno
from barcode import EAN13
from barcode.writer import ImageWriter
from pyzbar import pyzbar

from edge.errors import ImageError
from edge.readers import codes
from edge.readers.codes import CodeReader, decode_codes, payload_text, zbar_binary_mode
from edge.results import (
    Box,
    Code,
    FrameResult,
    Image,
    Reading,
    Region,
    RegionResult,
    RegionStatus,
)

CORPUS = Path("/work/shared/corpus")


def as_image(array: Any) -> Image:
    """Type an OpenCV result as a uint8 image (no copy)."""
    return np.asarray(array, dtype=np.uint8)


def render_qr(
    content: str | bytes,
    *,
    scale: int = 4,
    dark: str = "black",
    light: str = "white",
    **options: Any,
) -> Image:
    """Render a QR code with segno as an H x W x 3 BGR image with a 4-module quiet zone."""
    buffer = io.BytesIO()
    segno.make_qr(content, **options).save(
        buffer, kind="png", scale=scale, border=4, dark=dark, light=light
    )
    encoded = np.frombuffer(buffer.getvalue(), dtype=np.uint8)
    return as_image(cv2.imdecode(encoded, cv2.IMREAD_COLOR))


def render_ean13(digits: str) -> tuple[Image, str]:
    """Render an EAN-13 barcode and return the image and the full 13-digit number."""
    code = EAN13(digits, writer=ImageWriter())
    picture = code.render({"module_width": 0.3, "module_height": 12.0, "quiet_zone": 6.0})
    rgb = np.asarray(picture.convert("RGB"), dtype=np.uint8)
    return as_image(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)), code.get_fullcode()


def ean13_check_digit(first_twelve: str) -> int:
    """Compute the EAN-13 check digit (weights 1 and 3 from the left)."""
    total = sum(int(d) * (3 if i % 2 else 1) for i, d in enumerate(first_twelve))
    return (10 - total % 10) % 10


def only_code(reading: Reading) -> Code:
    assert len(reading.codes) == 1, f"expected one code, got {reading.codes}"
    return reading.codes[0]


def read_in_worker(payload: bytes, image: Image) -> Reading:
    reader = pickle.loads(payload)
    result: Reading = reader.read(image)
    return result


def test_zbar_binary_mode_available() -> None:
    """The installed zbar (0.23 or later) accepts ZBAR_CFG_BINARY."""
    assert zbar_binary_mode()


def test_decode_codes_utf8_payload_exact() -> None:
    """A UTF-8 QR payload with non-ASCII text keeps its bytes and decodes as text."""
    text = "Grüße aus Köln — 東京 ✓"
    code = only_code(decode_codes(render_qr(text, encoding="utf-8")))
    assert code.data == text.encode("utf-8")
    assert code.text == text
    assert code.format == "QRCODE"


def test_decode_codes_shift_jis_kanji_mode() -> None:
    """A Shift_JIS (kanji mode) payload keeps its raw bytes and decodes as Japanese text."""
    text = "賞味期限 こんにちは"
    code = only_code(decode_codes(render_qr(text, encoding="shift_jis")))
    assert code.data == text.encode("shift_jis")
    assert code.text == text


def test_decode_codes_shift_jis_byte_mode() -> None:
    """Shift_JIS bytes in a byte segment (half-width katakana) decode as Japanese text."""
    text = "ﾃﾞｻﾞｲﾝQR 価格"
    raw = text.encode("shift_jis")
    code = only_code(decode_codes(render_qr(raw, mode="byte")))
    assert code.data == raw
    assert code.text == text


def test_decode_codes_binary_payload_exact() -> None:
    """Binary bytes including 0x00 and 0xFF survive exactly and have no text."""
    raw = bytes([0x00, 0x01, 0xFF, 0xFE, 0x80, 0x00]) + b"tail\x00"
    code = only_code(decode_codes(render_qr(raw)))
    assert code.data == raw
    assert code.text is None


def test_decode_codes_binary_bytes_b64_in_json() -> None:
    """The frame JSON carries a binary payload's bytes exactly in bytes_b64."""
    raw = bytes(range(0, 256, 7)) + b"\x00"
    code = only_code(decode_codes(render_qr(raw)))
    region = Region("qr", 0.9, Box(0, 0, 10, 10))
    result = RegionResult(region, "codes", RegionStatus.OK, Reading(codes=(code,)))
    frame = FrameResult(1, 0.0, 10, 10, None, (result,), {})
    entry = frame.to_dict("test")["regions"][0]["codes"][0]
    assert base64.b64decode(entry["bytes_b64"]) == raw
    assert entry["text"] is None


def test_decode_codes_utf8_eci_segment() -> None:
    """A payload with a UTF-8 ECI designator decodes to the same bytes and text."""
    text = "Prix: 3,50 € — Ünïcode"
    code = only_code(decode_codes(render_qr(text, encoding="utf-8", eci=True)))
    assert code.data == text.encode("utf-8")
    assert code.text == text


@pytest.mark.xfail(
    strict=True, reason="zbar's binary mode hides the ECI charset, so Latin-1 reads as binary"
)
def test_decode_codes_latin1_eci_text() -> None:
    """A payload declared ISO-8859-1 through ECI decodes as text."""
    code = only_code(decode_codes(render_qr("café crème", encoding="iso-8859-1", eci=True)))
    assert code.text == "café crème"


def test_decode_codes_small_qr_needs_upscale() -> None:
    """A QR code with 1-pixel modules, missed by plain zbar, is found by the upscale retry."""
    image = render_qr("https://example.com/item/42", scale=1)
    assert pyzbar.decode(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)) == []
    code = only_code(decode_codes(image))
    assert code.data == b"https://example.com/item/42"


def test_decode_codes_upscaled_box_in_input_pixels() -> None:
    """A code found on an upscaled copy gets a box in the input's pixels."""
    qr = render_qr("box check", scale=1)
    canvas = np.full((qr.shape[0] + 30, qr.shape[1] + 50, 3), 255, dtype=np.uint8)
    canvas[20 : 20 + qr.shape[0], 40 : 40 + qr.shape[1]] = qr
    box = only_code(decode_codes(canvas)).box
    assert box is not None
    modules = qr.shape[0] - 8  # 4-module quiet zone on each side at 1 pixel per module
    assert abs(box.x - (40 + 4)) <= 2
    assert abs(box.y - (20 + 4)) <= 2
    assert abs(box.w - modules) <= 3
    assert abs(box.h - modules) <= 3


def test_decode_codes_box_inside_image() -> None:
    """A code touching the image edge gets a box clamped inside the image."""
    image = render_qr("edge", scale=3)[12:-12, 12:-12]
    box = only_code(decode_codes(image)).box
    assert box is not None
    assert box.x >= 0
    assert box.y >= 0
    assert box.x + box.w <= image.shape[1]
    assert box.y + box.h <= image.shape[0]


def test_decode_codes_inverted_qr() -> None:
    """A light-on-dark QR code is found by the inverted retry."""
    image = as_image(cv2.bitwise_not(render_qr("inverted payload")))
    assert pyzbar.decode(image) == []
    assert only_code(decode_codes(image)).data == b"inverted payload"


def test_code_reader_retry_max_pixels() -> None:
    """An image over retry_max_pixels is scanned once.

    A light-on-dark QR code, which needs the inverted retry, is missed over the limit and
    found at it. A plain one is found either way.
    """
    inverted = as_image(cv2.bitwise_not(render_qr("inverted payload")))
    plain = as_image(render_qr("plain payload"))
    pixels = inverted.shape[0] * inverted.shape[1]
    assert CodeReader(retry_max_pixels=pixels - 1).read(inverted).empty
    found = CodeReader(retry_max_pixels=pixels).read(inverted)
    assert only_code(found).data == b"inverted payload"
    assert only_code(CodeReader(retry_max_pixels=0).read(plain)).data == b"plain payload"


def test_decode_codes_try_harder_needs_retries() -> None:
    with pytest.raises(ValueError, match="try_harder runs every retry"):
        decode_codes(as_image(render_qr("x")), try_harder=True, retries=False)


def test_code_reader_negative_retry_max_pixels() -> None:
    with pytest.raises(ValueError, match="retry_max_pixels must be 0 or more, got -1"):
        CodeReader(retry_max_pixels=-1)


def test_decode_codes_low_contrast_qr() -> None:
    """A grey-on-grey QR code with a contrast of 24 levels is decoded."""
    image = render_qr("low contrast", dark="#707070", light="#888888")
    assert only_code(decode_codes(image)).data == b"low contrast"


@pytest.mark.parametrize("colour", ["#0000ff", "#ff0000", "#008000", "#ffd000"])
def test_decode_codes_coloured_qr_on_white(colour: str) -> None:
    """A QR code printed in blue, red, green or yellow on white is decoded."""
    image = render_qr(f"colour {colour}", dark=colour)
    assert only_code(decode_codes(image)).data == f"colour {colour}".encode()


@pytest.mark.parametrize(
    ("colour", "seed"),
    # Yellow needs the darkest colour channel, light blue the Otsu threshold: with these
    # seeds, no other scan of decode_codes finds them.
    [("#ffff00", 0), ("#ffff00", 1), ("#a0a0ff", 0), ("#a0a0ff", 3)],
)
def test_decode_codes_noisy_light_qr(colour: str, seed: int) -> None:
    """A light-coloured QR code under sensor noise is found by a retry, not by plain zbar."""
    payload = f"noisy {colour}"
    image = cv2.resize(render_qr(payload, dark=colour, scale=3), None, fx=0.8, fy=0.8)
    noise = np.random.default_rng(seed).normal(0.0, 24.0, image.shape)
    noisy = as_image(np.clip(image + noise, 0, 255))
    assert decode_codes(noisy, retries=False).empty
    assert only_code(decode_codes(noisy)).data == payload.encode()


def test_decode_codes_grey_and_bgra_inputs() -> None:
    """Grey and BGRA inputs decode to the same payload as BGR."""
    bgr = render_qr("channels")
    grey = as_image(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY))
    bgra = as_image(cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA))
    assert only_code(decode_codes(grey)).data == b"channels"
    assert only_code(decode_codes(bgra)).data == b"channels"
    assert only_code(decode_codes(grey[:, :, np.newaxis])).data == b"channels"


@pytest.mark.parametrize("channels", [3, 4])
def test_to_grey_matches_opencv_luma(channels: int) -> None:
    """The grey image is OpenCV's BT.601 luma within one level, in every row band."""
    rng = np.random.default_rng(channels)
    # 301 rows: two full bands of the conversion and a short last one.
    image = as_image(rng.integers(0, 256, (301, 97, channels), dtype=np.uint8))
    code = cv2.COLOR_BGR2GRAY if channels == 3 else cv2.COLOR_BGRA2GRAY
    grey = codes.to_grey(image)
    assert grey.shape == (301, 97)
    assert grey.flags.c_contiguous
    assert np.abs(grey.astype(np.int16) - cv2.cvtColor(image, code)).max() <= 1


@pytest.mark.parametrize("seed", range(4))
def test_otsu_matches_opencv(seed: int) -> None:
    """The Otsu retry picks OpenCV's threshold on smooth two-tone images."""
    rng = np.random.default_rng(seed)
    dark, light = sorted(rng.integers(0, 256, 2))
    image = np.where(rng.random((120, 160)) < 0.4, dark, light).astype(np.uint8)
    image = as_image(cv2.GaussianBlur(image, (7, 7), 0))
    blurred = as_image(cv2.GaussianBlur(image, (3, 3), 0))
    level, expected = cv2.threshold(blurred, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    assert codes._otsu_level(blurred) == int(level)
    assert np.array_equal(codes._otsu(image), expected)


def test_otsu_two_pixel_image_matches_opencv() -> None:
    """An image two pixels high gets OpenCV's border handling in the Otsu retry."""
    image = as_image(np.random.default_rng(0).integers(0, 256, (2, 600), dtype=np.uint8))
    blurred = cv2.GaussianBlur(image, (3, 3), 0)
    _, expected = cv2.threshold(blurred, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    assert np.array_equal(codes._otsu(image), expected)


def _worn_qr_grey(seed: int) -> Image:
    """Return a blurred, noisy, unevenly lit grey QR code, as the retries get them."""
    rng = np.random.default_rng(seed)
    grey = cv2.GaussianBlur(cv2.cvtColor(render_qr(f"worn {seed}"), cv2.COLOR_BGR2GRAY), (5, 5), 0)
    noisy = grey.astype(np.float64) + rng.normal(0, 12, grey.shape)
    light = np.linspace(0.6, 1.0, grey.shape[1])[np.newaxis, :]
    return as_image(np.clip(noisy * light, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_upscale_close_to_opencv_bicubic(factor: int) -> None:
    """Pillow's bicubic upscale stays within a few levels of OpenCV's."""
    grey = _worn_qr_grey(factor)
    height, width = grey.shape
    expected = cv2.resize(grey, (width * factor, height * factor), interpolation=cv2.INTER_CUBIC)
    difference = np.abs(codes._resize(grey, factor).astype(np.int16) - expected)
    # Measured on these images: 1.0 to 1.4 levels apart on average, and at most 10.
    assert difference.mean() <= 3
    assert difference.max() <= 16


@pytest.mark.parametrize("seed", range(3))
def test_equalise_close_to_opencv(seed: int) -> None:
    """The equalised retry is a monotonic map within 16 levels of OpenCV's."""
    grey = _worn_qr_grey(seed)
    equalised = codes._equalise(grey)
    difference = np.abs(equalised.astype(np.int16) - cv2.equalizeHist(grey))
    # Pillow spreads the histogram by another formula. Measured on these images: 8.5 to 10
    # levels apart on average, and at most 13.
    assert difference.max() <= 16
    order = np.argsort(grey.ravel(), kind="stable")
    assert np.all(np.diff(equalised.ravel()[order].astype(np.int16)) >= 0)


@pytest.mark.parametrize("seed", range(3))
def test_adaptive_close_to_opencv(seed: int) -> None:
    """The adaptive threshold differs from OpenCV's Gaussian one on few pixels."""
    grey = _worn_qr_grey(seed)
    block = max(11, (min(grey.shape) // 8) | 1)
    expected = cv2.adaptiveThreshold(
        grey, 255, cv2.ADAPTIVE_THRESH_GAUSSIAN_C, cv2.THRESH_BINARY, block, 5
    )
    # Measured on these images: 0.2% to 0.4% of the pixels.
    assert np.mean(codes._adaptive(grey) != expected) <= 0.01


def test_median_matches_opencv() -> None:
    """The median retry equals OpenCV's 3 x 3 median filter, borders included."""
    grey = as_image(np.random.default_rng(0).integers(0, 256, (50, 70), dtype=np.uint8))
    assert np.array_equal(codes._median(grey), cv2.medianBlur(grey, 3))


@pytest.mark.parametrize("shape", [(1, 600), (600, 1), (1, 600, 3)])
def test_decode_codes_one_pixel_thin_image(shape: tuple[int, ...]) -> None:
    """A crop one pixel thin runs every retry, including Otsu, and finds nothing."""
    image = as_image(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8))
    assert decode_codes(image, try_harder=True).empty
    assert set(np.unique(codes._otsu(codes.to_grey(image)))) <= {0, 255}


def test_darkest_channel_of_transposed_view() -> None:
    """A transposed view gives a row-major darkest channel, as zbar needs."""
    image = as_image(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8))
    view = image.transpose(1, 0, 2)
    darkest = codes._darkest_channel(view)
    assert darkest is not None
    assert darkest.flags.c_contiguous
    assert np.array_equal(darkest, view.min(axis=2))


def test_decode_codes_ean13_check_digit() -> None:
    """An EAN-13 barcode decodes to its 13 digits with a valid check digit."""
    image, full = render_ean13("400638133393")
    code = only_code(decode_codes(image))
    assert code.format == "EAN13"
    assert code.text == full
    assert int(full[-1]) == ean13_check_digit(full[:12])


@pytest.mark.parametrize(
    "image",
    [
        np.full((200, 200, 3), 255, dtype=np.uint8),
        np.zeros((1, 1, 3), dtype=np.uint8),
        np.full((2, 300, 3), 128, dtype=np.uint8),
        np.zeros((300, 2, 3), dtype=np.uint8),
    ],
    ids=["blank", "1x1", "2px-high line", "2px-wide column"],
)
def test_decode_codes_empty_crop(image: Image) -> None:
    """A crop without a code gives an empty reading and no exception."""
    assert decode_codes(image).empty


def test_decode_codes_float_image_rejected() -> None:
    """A float image raises ImageError naming the dtype."""
    with pytest.raises(ImageError, match="float32"):
        decode_codes(np.zeros((10, 10, 3), dtype=np.float32))


def test_code_reader_unknown_symbology() -> None:
    """An unknown symbology name raises ValueError listing it."""
    with pytest.raises(ValueError, match="QR-CODE"):
        CodeReader(symbologies=["QR-CODE"])


def test_code_reader_symbologies_restrict() -> None:
    """A reader limited to EAN13 ignores QR codes."""
    assert CodeReader(symbologies=["EAN13"]).read(render_qr("not wanted")).empty


def test_code_reader_try_harder_same_payload() -> None:
    """try_harder reports a code found by several retries once."""
    reading = CodeReader(try_harder=True).read(render_qr("once", scale=2))
    assert [code.data for code in reading.codes] == [b"once"]


def test_code_reader_spawn_process_read() -> None:
    """A pickled CodeReader reads a code in a fresh spawn process."""
    reader = CodeReader(symbologies=["QRCODE"])
    image = render_qr("ワーカー".encode() + b"\x00")
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        reading = pool.apply(read_in_worker, (pickle.dumps(reader), image))
    assert only_code(reading).data == "ワーカー".encode() + b"\x00"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"plain ascii", "plain ascii"),
        ("żółw".encode(), "żółw"),
        ("ﾃﾞｻﾞｲﾝ".encode("shift_jis"), "ﾃﾞｻﾞｲﾝ"),
        (b"a\tb\r\nc\x1dd", "a\tb\r\nc\x1dd"),
        (b"\x01\x10AD", None),
        (b"ok\x00", None),
        (b"caf\xe9", None),
        (b"\xff\xfe\xfd", None),
        ("x\u0085y".encode(), None),
    ],
    ids=["ascii", "utf8", "sjis", "allowed-controls", "soh", "nul", "latin1", "bytes", "c1"],
)
def test_payload_text_rule(data: bytes, expected: str | None) -> None:
    """payload_text returns UTF-8 or Japanese Shift_JIS text and None for binary."""
    assert payload_text(data) == expected


def corpus_entries(kind: str) -> list[dict[str, Any]]:
    manifest = CORPUS / "MANIFEST.jsonl"
    if not manifest.exists():
        return []
    entries = [json.loads(line) for line in manifest.read_text("utf-8").splitlines()]
    return [entry for entry in entries if entry["kind"] == kind]


CORPUS_QR = {
    entry["file"]: entry["expected"]
    for entry in corpus_entries("qr")
    if entry["file"].startswith(("zxing/qrcode-2/", "zxing-cpp/qrcode-2/qr-inv"))
}
# Neither this reader nor plain pyzbar decodes these three with zbar 0.23.92, so they are left out.
CORPUS_UNREADABLE = {"zxing/qrcode-2/12.png", "zxing/qrcode-2/13.png", "zxing/qrcode-2/33.png"}


@pytest.mark.skipif(not CORPUS_QR, reason="shared corpus not present")
@pytest.mark.parametrize("path", sorted(set(CORPUS_QR) - CORPUS_UNREADABLE))
def test_decode_codes_corpus_qr_text(path: str) -> None:
    """Real QR images decode to the publisher's expected text, Japanese payloads included."""
    image = cv2.imread(str(CORPUS / path), cv2.IMREAD_COLOR)
    assert image is not None, f"cannot read {path}"
    texts = [code.text for code in decode_codes(as_image(image)).codes]
    assert CORPUS_QR[path] in texts
