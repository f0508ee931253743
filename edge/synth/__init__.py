"""Deterministic generator of camera-like scenes with labels, receipts, signs, QR codes and EAN-13.

Scenes train and test the region-of-interest detector. The same seed gives the same scene on
machines with the same fonts and library versions, because the fonts in use are part of the
output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import cv2
import numpy as np

from edge.synth._content import (
    Patch,
    render_ean13,
    render_label,
    render_page,
    render_qr,
    render_receipt,
    render_sign,
)
from edge.synth._effects import distort_frame, render_background, warp_into

__all__ = [
    "CLASS_NAMES",
    "Scene",
    "SceneObject",
    "render_close_up",
    "render_document",
    "render_scene",
]

CLASS_NAMES = ("text", "qr_code", "barcode")
_PLACEMENT_TRIES = 40
_MAX_OVERLAP = 0.02
# In a close-up, the longer side of the object's box spans this share of the frame's shorter
# side, before a pose that does not fit is shrunk.
_CLOSE_UP_SPAN = (0.35, 0.95)
# Share of close-ups that show a QR code, an EAN-13 barcode, and a label or receipt.
_CLOSE_UP_KINDS = (0.45, 0.35, 0.20)
# In a document frame, each side of the page spans this share of the frame's side.
_DOCUMENT_SPAN = (0.88, 0.98)
# Largest turn of a document page, in degrees either way.
_DOCUMENT_TURN = 2.0


@dataclass(frozen=True)
class SceneObject:
    r"""One object drawn into a scene.

    Attributes:
        class_name: one of `CLASS_NAMES`.
        box: (x, y, w, h) axis-aligned box in frame pixels, after all warps, clipped to the frame.
        value: the text lines joined with "\\n" for text, the decoded payload for codes.
    """

    class_name: str
    box: tuple[float, float, float, float]
    value: str

    def __post_init__(self) -> None:
        if self.class_name not in CLASS_NAMES:
            message = f"invalid class_name {self.class_name!r}, expected one of {CLASS_NAMES}"
            raise ValueError(message)
        if self.box[2] <= 0 or self.box[3] <= 0:
            message = f"invalid box {self.box}: width and height must be positive"
            raise ValueError(message)


@dataclass(frozen=True)
class Scene:
    """A rendered frame and the objects in it.

    Attributes:
        image: H x W x 3 uint8 BGR pixels, C-contiguous.
        objects: the objects in drawing order. The bounding boxes of two warped patches
            overlap by at most 2 % of the smaller box, so no object hides another.
    """

    image: np.ndarray
    objects: tuple[SceneObject, ...]


def _pose(
    rng: np.random.Generator, patch: Patch, frame_size: tuple[int, int], distortions: bool
) -> np.ndarray | None:
    """Return a patch-to-frame homography that keeps the whole patch inside the frame."""
    width, height = frame_size
    patch_h, patch_w = patch.alpha.shape
    corners = np.array([[0, 0], [patch_w, 0], [patch_w, patch_h], [0, patch_h]], np.float32)
    fit = min(
        0.9 * width / patch_w, 0.9 * height / patch_h, 1.0 if patch.class_name != "text" else 1.3
    )
    if distortions:
        low = 0.6 if patch.class_name == "text" else 0.85
        scale = min(fit, rng.uniform(low, 1.5))
        angle = (
            rng.uniform(-30, 30)
            if rng.random() < 0.15
            else float(np.clip(rng.normal(0, 4), -12, 12))
        )
    else:
        # Codes keep their integer module size, so zbar gets sharp modules with no resampling.
        scale = min(fit, 1.0 if patch.class_name != "text" else rng.uniform(0.8, 1.2))
        angle = 0.0
    theta = np.deg2rad(angle)
    rotation = np.array(
        [[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]], np.float32
    )
    centred = (corners - corners.mean(axis=0)) * scale
    moved = centred @ rotation.T
    if distortions and rng.random() < 0.5:
        jitter = 0.06 * scale * max(patch_w, patch_h)
        moved += rng.uniform(-jitter, jitter, moved.shape).astype(np.float32)
    span_x, span_y = np.ptp(moved[:, 0]), np.ptp(moved[:, 1])
    if span_x >= width or span_y >= height:
        return None
    low_x, low_y = -moved[:, 0].min(), -moved[:, 1].min()
    offset = np.array(
        [
            rng.uniform(low_x, width - moved[:, 0].max()),
            rng.uniform(low_y, height - moved[:, 1].max()),
        ]
    )
    if not distortions:
        offset = np.round(offset - moved[0]) + moved[0]
    return cv2.getPerspectiveTransform(corners, (moved + offset).astype(np.float32))


def _warped_box(
    points: np.ndarray, matrix: np.ndarray, frame_size: tuple[int, int]
) -> tuple[float, ...]:
    mapped = cv2.perspectiveTransform(points.reshape(-1, 1, 2).astype(np.float64), matrix).reshape(
        -1, 2
    )
    x0, y0 = np.clip(mapped.min(axis=0), 0, frame_size)
    x1, y1 = np.clip(mapped.max(axis=0), 0, frame_size)
    return float(x0), float(y0), float(x1 - x0), float(y1 - y0)


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Return the intersection area divided by the smaller box's area."""
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return ix * iy / max(min(a[2] * a[3], b[2] * b[3]), 1e-6)


def _with_contrast(
    rng: np.random.Generator, patch: Patch, frame: np.ndarray, footprint: tuple[float, ...]
) -> Patch:
    """Recolour a see-through patch (a sign) so that its ink contrasts with the frame under it."""
    if float(patch.alpha.min()) >= 1.0:
        return patch
    x, y, w, h = (int(v) for v in footprint)
    under = frame[y : y + max(h, 1), x : x + max(w, 1)].reshape(-1, 3).mean(axis=0)
    luma = float(under @ np.array([0.114, 0.587, 0.299]))
    ink = rng.integers(0, 70, 3) if luma > 128 else rng.integers(190, 256, 3)
    image = np.ascontiguousarray(np.broadcast_to(ink.astype(np.uint8), patch.image.shape))
    return replace(patch, image=image)


def _make_patches(rng: np.random.Generator, labels: int, codes: int) -> list[Patch]:
    text_makers: tuple[Callable[[np.random.Generator], Patch], ...] = (
        render_label,
        render_receipt,
        render_sign,
    )
    text_weights = np.array([0.6, 0.2, 0.2])
    patches = [text_makers[int(rng.choice(3, p=text_weights))](rng) for _ in range(labels)]
    for _ in range(codes):
        if rng.random() < 0.5:
            patches.append(render_qr(rng, int(rng.choice([2, 3, 3, 4, 4, 5, 6]))))
        else:
            patches.append(render_ean13(rng, int(rng.choice([2, 2, 3, 3, 4]))))
    return [patches[int(i)] for i in rng.permutation(len(patches))]


def render_scene(
    rng: np.random.Generator,
    width: int = 1280,
    height: int = 720,
    *,
    labels: tuple[int, int] = (1, 4),
    codes: tuple[int, int] = (0, 3),
    distortions: bool = True,
) -> Scene:
    """Render one scene.

    Args:
        rng: the only source of randomness, so a seeded generator gives a reproducible scene.
        width: frame width in pixels.
        height: frame height in pixels.
        labels: inclusive (min, max) count of text objects: labels, receipts and signs.
        codes: inclusive (min, max) count of QR codes and EAN-13 barcodes.
        distortions: apply rotation, perspective, scale changes, blur, noise, glare and JPEG.

    Returns:
        The frame and its objects. An object that finds no free place after 40 tries is
        dropped, so a crowded small frame can hold fewer objects than `labels` and `codes` ask.

    Raises:
        ValueError: when a count range is negative or reversed, or the frame is under 64 pixels.
    """
    for name, (low, high) in (("labels", labels), ("codes", codes)):
        if low < 0 or high < low:
            message = f"invalid {name} range {(low, high)}: expected 0 <= min <= max"
            raise ValueError(message)
    if width < 64 or height < 64:
        message = f"invalid frame size {width}x{height}: expected at least 64x64 pixels"
        raise ValueError(message)

    frame = render_background(rng, height, width)
    counts = int(rng.integers(labels[0], labels[1] + 1)), int(rng.integers(codes[0], codes[1] + 1))
    frame_size = (width, height)
    placed: list[tuple[float, ...]] = []
    objects: list[SceneObject] = []
    for patch in _make_patches(rng, *counts):
        patch_h, patch_w = patch.alpha.shape
        outline = np.array([[0, 0], [patch_w, 0], [patch_w, patch_h], [0, patch_h]], np.float32)
        for _ in range(_PLACEMENT_TRIES):
            matrix = _pose(rng, patch, frame_size, distortions)
            if matrix is None:
                break
            footprint = _warped_box(outline, matrix, frame_size)
            if all(_overlap(footprint, other) <= _MAX_OVERLAP for other in placed):
                patch = _with_contrast(rng, patch, frame, footprint)
                warp_into(frame, patch.image, patch.alpha, matrix)
                placed.append(footprint)
                x, y, w, h = _warped_box(patch.region, matrix, frame_size)
                objects.append(SceneObject(patch.class_name, (x, y, w, h), patch.value))
                break
    if distortions:
        frame = distort_frame(rng, frame)
    return Scene(np.ascontiguousarray(frame), tuple(objects))


def _close_up_pose(
    rng: np.random.Generator, patch: Patch, frame_size: tuple[int, int], distortions: bool
) -> np.ndarray:
    """Return a homography that makes the patch's region fill much of the frame, inside it."""
    width, height = frame_size
    region = patch.region.astype(np.float32)
    patch_h, patch_w = patch.alpha.shape
    corners = np.array([[0, 0], [patch_w, 0], [patch_w, patch_h], [0, patch_h]], np.float32)
    region_side = float(max(np.ptp(region[:, 0]), np.ptp(region[:, 1])))
    scale = rng.uniform(*_CLOSE_UP_SPAN) * min(width, height) / region_side
    angle = 0.0
    if distortions:
        # People hold a code at any angle, but a label is seldom far from upright.
        turn = 180.0 if patch.class_name == "qr_code" else 30.0
        angle = rng.uniform(-turn, turn) if rng.random() < 0.3 else float(rng.normal(0, 5))
    theta = np.deg2rad(angle)
    rotation = np.array(
        [[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]], np.float32
    )
    jitter = rng.uniform(-0.08, 0.08, (4, 2)) if distortions and rng.random() < 0.5 else None

    centre = region.mean(axis=0)
    while True:
        moved = ((corners - centre) * scale) @ rotation.T
        if jitter is not None:
            moved += (jitter * scale * region_side).astype(np.float32)
        matrix = cv2.getPerspectiveTransform(corners, moved.astype(np.float32))
        mapped = cv2.perspectiveTransform(region.reshape(-1, 1, 2), matrix).reshape(-1, 2)
        if np.ptp(mapped[:, 0]) < width and np.ptp(mapped[:, 1]) < height:
            break
        scale *= 0.9

    shift_x = rng.uniform(-mapped[:, 0].min(), width - mapped[:, 0].max())
    shift_y = rng.uniform(-mapped[:, 1].min(), height - mapped[:, 1].max())
    translation = np.array([[1, 0, shift_x], [0, 1, shift_y], [0, 0, 1]], np.float64)
    return translation @ matrix


def render_close_up(
    rng: np.random.Generator, width: int = 640, height: int = 480, *, distortions: bool = True
) -> Scene:
    """Render one QR code, EAN-13 barcode or label that fills much of the frame.

    A camera shows this when a user holds a code up to it. Ordinary scenes from
    :func:`render_scene` keep codes at their printed size, small in the frame. The longer side
    of the object's region spans 35% to 95% of the frame's shorter side before it is turned
    (less where that does not fit), so the box of a turned object can be larger. The region
    stays inside the frame, but the frame's edges may cut off the rest of the sticker or card.
    With ``distortions``, QR codes may be turned by any angle, and the frame gets the same
    distortions as in ``render_scene``.

    Raises:
        ValueError: when the frame is under 64 pixels on a side.
    """
    if width < 64 or height < 64:
        message = f"invalid frame size {width}x{height}: expected at least 64x64 pixels"
        raise ValueError(message)
    frame = render_background(rng, height, width)
    kind = int(rng.choice(3, p=np.array(_CLOSE_UP_KINDS)))
    if kind == 0:
        patch = render_qr(rng, int(rng.choice([2, 3, 4])))
    elif kind == 1:
        patch = render_ean13(rng, int(rng.choice([2, 3])))
    else:
        patch = render_label(rng) if rng.random() < 0.7 else render_receipt(rng)
    frame_size = (width, height)
    matrix = _close_up_pose(rng, patch, frame_size, distortions)
    warp_into(frame, patch.image, patch.alpha, matrix)
    x, y, w, h = _warped_box(patch.region, matrix, frame_size)
    objects = (SceneObject(patch.class_name, (x, y, w, h), patch.value),)
    if distortions:
        frame = distort_frame(rng, frame)
    return Scene(np.ascontiguousarray(frame), objects)


def render_document(
    rng: np.random.Generator, width: int = 1280, height: int = 720, *, distortions: bool = True
) -> Scene:
    """Render an invoice page held up to the camera, filling most of the frame.

    The page spans 88% to 98% of each side of the frame and is turned by up to 2 degrees.
    With ``distortions``, the frame gets the same distortions as in ``render_scene``. The
    default detector's text boxes covered 53% to 92% of each of 32 such frames (seeds 0 to 7
    at 640x480, 960x540, 1280x720 and 1920x1080), so the pipeline read them as documents.
    Without distortions, one of the 32 was covered 45%.

    Raises:
        ValueError: when the frame is under 64 pixels on a side.
    """
    if width < 64 or height < 64:
        message = f"invalid frame size {width}x{height}: expected at least 64x64 pixels"
        raise ValueError(message)
    frame = render_background(rng, height, width)
    page_w = int(width * rng.uniform(*_DOCUMENT_SPAN))
    page_h = int(height * rng.uniform(*_DOCUMENT_SPAN))
    patch = render_page(rng, page_w, page_h)
    angle = rng.uniform(-1, 1) * _DOCUMENT_TURN
    turn = cv2.getRotationMatrix2D((page_w / 2, page_h / 2), angle, 1)
    # The page turns about its centre, which then moves to the frame's centre.
    turn[:, 2] += np.array([(width - page_w) / 2, (height - page_h) / 2])
    matrix = np.vstack([turn, [0, 0, 1]])
    warp_into(frame, patch.image, patch.alpha, matrix)
    x, y, w, h = _warped_box(patch.region, matrix, (width, height))
    objects = (SceneObject(patch.class_name, (x, y, w, h), patch.value),)
    if distortions:
        frame = distort_frame(rng, frame)
    return Scene(np.ascontiguousarray(frame), objects)
