"""Tests for the scene generator in edge.synth and the bundled sample frames."""

from __future__ import annotations

import difflib
import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType

import cv2
import numpy as np
import pytest

from edge.config import load_config
from edge.factory import build_detector
from edge.pipeline import _union_area
from edge.readers.text import TextReader
from edge.synth import (
    CLASS_NAMES,
    _close_up_pose,
    render_close_up,
    render_document,
    render_scene,
)
from edge.synth._content import render_ean13, render_qr

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "edge" / "samples"
CLEAN_SEEDS = range(40)


def _load_make_samples() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "make_samples", REPO / "scripts" / "make_samples.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _normalise(text: str) -> str:
    """Drop case, whitespace and rule lines of dashes, which OCR reads inconsistently."""
    return re.sub(r"[\s\-]+", "", text).lower()


def test_render_scene_same_seed_same_output() -> None:
    """The same seed gives the same pixels and objects."""
    first = render_scene(np.random.default_rng(7))
    second = render_scene(np.random.default_rng(7))
    assert np.array_equal(first.image, second.image)
    assert first.objects == second.objects


def test_render_scene_different_seed_different_image() -> None:
    """Different seeds give different frames."""
    first = render_scene(np.random.default_rng(1))
    second = render_scene(np.random.default_rng(2))
    assert not np.array_equal(first.image, second.image)


@pytest.mark.parametrize("distortions", [False, True])
def test_render_scene_image_format(distortions: bool) -> None:
    """The frame is H x W x 3 uint8 and C-contiguous, at the requested size."""
    scene = render_scene(np.random.default_rng(3), 640, 360, distortions=distortions)
    assert scene.image.shape == (360, 640, 3)
    assert scene.image.dtype == np.uint8
    assert scene.image.flags["C_CONTIGUOUS"]


@pytest.mark.parametrize("distortions", [False, True])
def test_render_scene_boxes_inside_frame(distortions: bool) -> None:
    """Every box lies inside the frame and is at least 8 pixels on each side."""
    for seed in range(30):
        scene = render_scene(np.random.default_rng(seed), distortions=distortions)
        for obj in scene.objects:
            x, y, w, h = obj.box
            assert x >= 0, (seed, obj)
            assert y >= 0, (seed, obj)
            assert x + w <= 1280, (seed, obj)
            assert y + h <= 720, (seed, obj)
            assert min(w, h) >= 8, (seed, obj)


def test_render_scene_counts_within_ranges() -> None:
    """Object counts per kind stay within the requested inclusive ranges."""
    for seed in range(20):
        scene = render_scene(np.random.default_rng(seed), labels=(2, 3), codes=(1, 2))
        texts = sum(o.class_name == "text" for o in scene.objects)
        codes = sum(o.class_name != "text" for o in scene.objects)
        assert texts <= 3, seed
        assert codes <= 2, seed
        assert texts + codes >= 3, seed


def test_render_scene_classes_known() -> None:
    """Objects only use the published class names and have a value."""
    for seed in range(20):
        for obj in render_scene(np.random.default_rng(seed)).objects:
            assert obj.class_name in CLASS_NAMES
            assert obj.value


def test_render_scene_invalid_range_raises() -> None:
    """A reversed count range is rejected."""
    with pytest.raises(ValueError, match="labels"):
        render_scene(np.random.default_rng(0), labels=(3, 1))


def test_render_scene_clean_codes_decode() -> None:
    """pyzbar decodes more than 90 % of codes in clean frames to their payload."""
    pyzbar = pytest.importorskip("pyzbar.pyzbar")
    decoded = total = 0
    for seed in CLEAN_SEEDS:
        scene = render_scene(
            np.random.default_rng(seed), labels=(0, 1), codes=(1, 3), distortions=False
        )
        gray = cv2.cvtColor(scene.image, cv2.COLOR_BGR2GRAY)
        for obj in scene.objects:
            if obj.class_name == "text":
                continue
            x, y, w, h = (int(v) for v in obj.box)
            crop = gray[max(0, y - 20) : y + h + 20, max(0, x - 20) : x + w + 20]
            payloads = {r.data.decode("utf-8") for r in pyzbar.decode(crop)}
            total += 1
            decoded += obj.value in payloads
    assert total >= 40
    assert decoded / total > 0.9


CLOSE_UP_SIZES = [(640, 480), (480, 640), (240, 240), (1280, 720)]


def test_render_close_up_same_seed_same_output() -> None:
    """The same seed gives the same close-up."""
    first = render_close_up(np.random.default_rng(3), 640, 480)
    second = render_close_up(np.random.default_rng(3), 640, 480)

    assert np.array_equal(first.image, second.image)
    assert first.objects == second.objects


@pytest.mark.parametrize("size", CLOSE_UP_SIZES, ids=[f"{w}x{h}" for w, h in CLOSE_UP_SIZES])
def test_render_close_up_fills_frame(size: tuple[int, int]) -> None:
    """A close-up shows one object whose box spans much of the frame."""
    width, height = size
    classes = set()
    for seed in range(20):
        scene = render_close_up(np.random.default_rng(seed), width, height)
        assert scene.image.shape == (height, width, 3)
        assert len(scene.objects) == 1
        (obj,) = scene.objects
        _, _, w, h = obj.box
        assert max(w, h) >= 0.3 * min(width, height)
        classes.add(obj.class_name)
    assert classes == set(CLASS_NAMES)


@pytest.mark.parametrize("size", CLOSE_UP_SIZES, ids=[f"{w}x{h}" for w, h in CLOSE_UP_SIZES])
def test_close_up_pose_keeps_region_inside(size: tuple[int, int]) -> None:
    """The pose of a close-up maps the whole region of its code inside the frame."""
    width, height = size
    for seed in range(30):
        rng = np.random.default_rng(seed)
        patch = render_qr(rng, 3) if seed % 2 else render_ean13(rng, 2)
        matrix = _close_up_pose(rng, patch, size, distortions=True)
        region = patch.region.reshape(-1, 1, 2).astype(np.float64)
        corners = cv2.perspectiveTransform(region, matrix).reshape(-1, 2)
        assert corners[:, 0].min() >= 0
        assert corners[:, 1].min() >= 0
        assert corners[:, 0].max() <= width
        assert corners[:, 1].max() <= height


def test_render_close_up_clean_codes_decode() -> None:
    """pyzbar decodes the code of most clean close-ups from the whole frame."""
    pyzbar = pytest.importorskip("pyzbar.pyzbar")
    decoded = total = 0
    for seed in range(40):
        width, height = CLOSE_UP_SIZES[seed % len(CLOSE_UP_SIZES)]
        scene = render_close_up(np.random.default_rng(seed), width, height, distortions=False)
        (obj,) = scene.objects
        if obj.class_name == "text":
            continue
        gray = cv2.cvtColor(scene.image, cv2.COLOR_BGR2GRAY)
        total += 1
        decoded += obj.value in {r.data.decode("utf-8") for r in pyzbar.decode(gray)}
    assert total >= 25
    assert decoded / total > 0.9


def test_render_close_up_small_frame_raises() -> None:
    """A frame under 64 pixels on a side is rejected with its size in the message."""
    with pytest.raises(ValueError, match="32x480"):
        render_close_up(np.random.default_rng(0), 32, 480)


def test_render_document_same_seed_same_output() -> None:
    """The same seed gives the same document frame."""
    first = render_document(np.random.default_rng(3), 640, 480)
    second = render_document(np.random.default_rng(3), 640, 480)

    assert np.array_equal(first.image, second.image)
    assert first.objects == second.objects


@pytest.mark.parametrize("size", CLOSE_UP_SIZES, ids=[f"{w}x{h}" for w, h in CLOSE_UP_SIZES])
def test_render_document_fills_frame(size: tuple[int, int]) -> None:
    """A document frame shows one invoice page whose box covers most of the frame."""
    width, height = size
    for seed in range(10):
        scene = render_document(np.random.default_rng(seed), width, height)
        assert scene.image.shape == (height, width, 3)
        assert len(scene.objects) == 1
        (page,) = scene.objects
        assert page.class_name == "text"
        assert page.box[2] * page.box[3] >= 0.85**2 * width * height
        lines = page.value.split("\n")
        assert 24 <= len(lines) <= 32
        assert lines[-2].startswith("TOTAL")


def test_render_document_small_frame_raises() -> None:
    """A frame under 64 pixels on a side is rejected with its size in the message."""
    with pytest.raises(ValueError, match="640x40"):
        render_document(np.random.default_rng(0), 640, 40)


def test_render_document_clean_text_readable() -> None:
    """The text reader reads at least 85% of the words of a clean document frame read whole.

    Words of one character (quantities and the "x" before each product) are left out,
    because they occur in many other words.
    """
    reader = TextReader(max_detect_pixels=300_000)
    try:
        for seed in range(2):
            scene = render_document(np.random.default_rng(seed), 960, 540, distortions=False)
            lines = reader.read(scene.image).lines
            read = {word for line in lines for word in line.text.lower().split()}
            value = scene.objects[0].value.lower()
            words = [word for word in value.split() if len(word) > 1 and "--" not in word]
            found = sum(word in read for word in words)
            assert found >= 0.85 * len(words), (seed, found, len(words))
    finally:
        reader.close()


def test_render_document_detected_as_document() -> None:
    """The default detector's text boxes cover at least half of a document frame."""
    detector = build_detector(load_config(None))
    try:
        for seed, size in [(0, (1280, 720)), (1, (960, 540))]:
            scene = render_document(np.random.default_rng(seed), *size)
            regions, _ = detector.detect_counted(scene.image)
            boxes = [region.box for region in regions if region.class_name == "text"]
            assert _union_area(boxes) >= 0.5 * size[0] * size[1], seed
    finally:
        detector.close()


def test_render_scene_clean_text_readable() -> None:
    """rapidocr reads clean text blocks with a mean character similarity of at least 0.85."""
    rapidocr = pytest.importorskip("rapidocr_onnxruntime")
    engine = rapidocr.RapidOCR()
    ratios = []
    for seed in range(6):
        scene = render_scene(
            np.random.default_rng(seed), labels=(1, 1), codes=(0, 0), distortions=False
        )
        x, y, w, h = (int(v) for v in scene.objects[0].box)
        crop = scene.image[max(0, y - 10) : y + h + 10, max(0, x - 10) : x + w + 10]
        result, _ = engine(crop)
        read = "".join(line[1] for line in result or [])
        expected = _normalise(scene.objects[0].value)
        ratios.append(difflib.SequenceMatcher(None, expected, _normalise(read)).ratio())
    assert float(np.mean(ratios)) >= 0.85, ratios


def test_samples_match_make_samples() -> None:
    """The committed sample frames and expected.json match a fresh make_samples render."""
    make_samples = _load_make_samples()
    expected = json.loads((SAMPLES / "expected.json").read_text(encoding="utf-8"))
    assert len(expected["frames"]) == len(make_samples.FRAME_PLAN)
    for index, frame in enumerate(expected["frames"]):
        image, objects = make_samples.sample_objects(index)
        assert frame["objects"] == objects, frame["file"]
        stored = cv2.imread(str(SAMPLES / frame["file"]))
        assert stored is not None, frame["file"]
        assert stored.shape == (720, 1280, 3), frame["file"]
        # Encode the fresh render the same way, so that only a changed scene or a different
        # JPEG library build makes the pixels differ.
        quality = [cv2.IMWRITE_JPEG_QUALITY, make_samples.JPEG_QUALITY]
        encoded = cv2.imdecode(cv2.imencode(".jpg", image, quality)[1], cv2.IMREAD_COLOR)
        assert encoded is not None
        error = np.abs(stored.astype(np.int16) - encoded.astype(np.int16)).mean()
        assert error < 1.0, frame["file"]


def test_samples_cover_all_classes() -> None:
    """The sample frames together contain text, QR codes and barcodes."""
    expected = json.loads((SAMPLES / "expected.json").read_text(encoding="utf-8"))
    classes = {obj["class"] for frame in expected["frames"] for obj in frame["objects"]}
    assert classes == set(CLASS_NAMES)
