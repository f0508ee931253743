"""Backgrounds and whole-frame photometric distortions for generated scenes."""

from __future__ import annotations

import cv2
import numpy as np


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, 3).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """Return value noise in 0..1: a coarse random grid resized with bicubic filtering."""
    coarse = rng.random((max(2, height // cell), max(2, width // cell))).astype(np.float32)
    return np.clip(cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC), 0, 1)


def _stripes(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Return wood-grain or shelf-like stripes in 0..1 along a random axis."""
    axis = np.arange(height if rng.random() < 0.5 else width, dtype=np.float32)
    period = rng.uniform(6, 80)
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * axis / period + rng.uniform(0, 6.3))
    wave = wave ** rng.uniform(0.3, 3.0)
    field = wave[:, None] if axis.size == height else wave[None, :]
    field = np.broadcast_to(field, (height, width))
    return np.clip(field * 0.8 + 0.2 * _smooth_noise(rng, height, width, 24), 0, 1)


def _draw_clutter(rng: np.random.Generator, frame: np.ndarray, count: int) -> None:
    height, width = frame.shape[:2]
    for _ in range(count):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        size = int(rng.integers(10, max(11, width // 4)))
        kind = int(rng.integers(4))
        thickness = int(rng.choice([-1, 1, 2, 4]))
        if kind == 0:
            cv2.rectangle(
                frame, (x, y), (x + size, y + int(size * rng.uniform(0.2, 1.5))), colour, thickness
            )
        elif kind == 1:
            cv2.circle(frame, (x, y), size // 2, colour, thickness)
        elif kind == 2:
            end = (x + int(rng.integers(-size, size)), y + int(rng.integers(-size, size)))
            cv2.line(frame, (x, y), end, colour, int(rng.integers(1, 8)))
        else:
            axes = (size // 2, int(size * rng.uniform(0.1, 0.5)))
            cv2.ellipse(frame, (x, y), axes, float(rng.uniform(0, 180)), 0, 360, colour, thickness)


def render_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Render a solid, gradient, noise or stripe background with optional clutter shapes."""
    first, second = _colour(rng), _colour(rng)
    kind = int(rng.integers(4))
    if kind == 0:
        weight = np.zeros((height, width), np.float32)
    elif kind == 1:
        angle = rng.uniform(0, 2 * np.pi)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        ramp = xs * np.cos(angle) + ys * np.sin(angle)
        weight = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
    elif kind == 2:
        weight = _smooth_noise(rng, height, width, int(rng.integers(4, 120)))
    else:
        weight = _stripes(rng, height, width)
    frame = first + (second - first) * weight[:, :, None]
    frame = np.clip(frame, 0, 255).astype(np.uint8)
    _draw_clutter(rng, frame, int(rng.integers(0, 25)))
    return np.ascontiguousarray(frame)


def warp_into(frame: np.ndarray, image: np.ndarray, alpha: np.ndarray, matrix: np.ndarray) -> None:
    """Blend `image` into `frame` in place after a perspective warp by the 3x3 `matrix`."""
    height, width = frame.shape[:2]
    patch_h, patch_w = alpha.shape
    corners = np.array([[[0, 0]], [[patch_w, 0]], [[patch_w, patch_h]], [[0, patch_h]]], np.float64)
    mapped = cv2.perspectiveTransform(corners, matrix).reshape(-1, 2)
    x0, y0 = np.clip(np.floor(mapped.min(axis=0)).astype(int), 0, (width, height))
    x1, y1 = np.clip(np.ceil(mapped.max(axis=0)).astype(int) + 1, 0, (width, height))
    if x1 <= x0 or y1 <= y0:
        return
    # Warp into the covered window only: a full-frame warp per object costs several times more.
    shift = np.array([[1, 0, -x0], [0, 1, -y0], [0, 0, 1]], np.float64) @ matrix
    size = (int(x1 - x0), int(y1 - y0))
    warped = cv2.warpPerspective(image, shift, size, flags=cv2.INTER_LINEAR)
    weight = cv2.warpPerspective(alpha, shift, size, flags=cv2.INTER_LINEAR)[:, :, None]
    window = frame[y0:y1, x0:x1].astype(np.float32)
    blended = window * (1 - weight) + warped.astype(np.float32) * weight
    frame[y0:y1, x0:x1] = np.clip(blended + 0.5, 0, 255).astype(np.uint8)


def _motion_kernel(rng: np.random.Generator) -> np.ndarray:
    length = int(rng.integers(3, 10))
    kernel: np.ndarray = np.zeros((length, length), np.float32)
    kernel[length // 2, :] = 1.0
    centre = ((length - 1) / 2, (length - 1) / 2)
    rotation = cv2.getRotationMatrix2D(centre, float(rng.uniform(0, 180)), 1.0)
    kernel = cv2.warpAffine(kernel, rotation, (length, length))
    return kernel / max(float(kernel.sum()), 1e-6)


def distort_frame(rng: np.random.Generator, frame: np.ndarray) -> np.ndarray:
    """Apply glare, brightness/contrast, blur, noise and JPEG artefacts, each with some chance."""
    height, width = frame.shape[:2]
    image: np.ndarray = frame.astype(np.float32)
    if rng.random() < 0.3:
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        radius = rng.uniform(0.1, 0.4) * width
        glare = np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * radius**2))
        image += glare[:, :, None] * rng.uniform(60, 200)
    if rng.random() < 0.7:
        image = (image - 128) * rng.uniform(0.6, 1.3) + 128 + rng.uniform(-50, 40)
    image = np.clip(image, 0, 255)
    blur = rng.random()
    if blur < 0.3:
        image = cv2.GaussianBlur(image, (0, 0), float(rng.uniform(0.5, 2.0)))
    elif blur < 0.45:
        image = cv2.filter2D(image, -1, _motion_kernel(rng))
    if rng.random() < 0.5:
        image += rng.normal(0, rng.uniform(2, 12), image.shape).astype(np.float32)
    result = np.clip(image + 0.5, 0, 255).astype(np.uint8)
    if rng.random() < 0.6:
        quality = int(rng.integers(25, 90))
        ok, encoded = cv2.imencode(".jpg", result, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if ok:
            result = cv2.imdecode(encoded, cv2.IMREAD_COLOR)
    return np.ascontiguousarray(result)
