"""Conversion of decoded images and camera frames to the pixel format every stage uses."""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt

from edge.errors import ImageError
from edge.results import Image


def to_bgr8(image: npt.NDArray[np.generic]) -> Image:
    """Convert a decoded image to 3-channel uint8 BGR.

    Grey images gain three equal channels and BGRA images lose alpha. 16-bit values are
    scaled by 255/65535 with rounding, and floating-point images are taken to be in 0..1.

    Raises:
        ImageError: The image is empty, or has another channel count or an unsupported dtype.
    """
    if image.size == 0:
        msg = f"cannot convert an empty image of shape {image.shape}; the frame has no pixels"
        raise ImageError(msg)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    image = _to_uint8(image)

    if image.ndim == 2:
        return np.ascontiguousarray(cv2.cvtColor(image, cv2.COLOR_GRAY2BGR), dtype=np.uint8)
    if image.ndim == 3 and image.shape[2] == 3:
        return np.ascontiguousarray(image, dtype=np.uint8)
    if image.ndim == 3 and image.shape[2] == 4:
        return np.ascontiguousarray(cv2.cvtColor(image, cv2.COLOR_BGRA2BGR), dtype=np.uint8)
    msg = (
        f"cannot convert an image of shape {image.shape} to BGR; expected H x W or "
        "H x W x C with C = 1, 3 or 4 (channels last)"
    )
    raise ImageError(msg)


def _to_uint8(image: npt.NDArray[np.generic]) -> npt.NDArray[np.uint8]:
    if image.dtype == np.uint8:
        return image.astype(np.uint8, copy=False)
    if image.dtype == np.uint16:
        # Rounded division by 257 maps 0..65535 onto 0..255 exactly (65535 = 255 * 257).
        wide = image.astype(np.uint32)
        return ((wide + 128) // 257).astype(np.uint8)
    if np.issubdtype(image.dtype, np.floating):
        scaled: npt.NDArray[np.float32] = np.nan_to_num(image.astype(np.float32), nan=0.0)
        clipped: npt.NDArray[np.float32] = np.clip(np.rint(scaled * 255.0), 0, 255)
        return clipped.astype(np.uint8)
    msg = (
        f"cannot convert an image of dtype {image.dtype} to uint8; expected uint8, uint16 or float"
    )
    raise ImageError(msg)


def use_one_opencv_thread() -> None:
    """Make OpenCV run each call on the calling thread, without its own thread pool.

    The pipeline already reads regions on several threads at once, and OpenCV's pool would
    split each resize or warp of every read over all cores again. On 12 generated 1280x720
    scenes (2-core x86-64, alternating in one process), the pipeline took 0.459 CPU seconds
    per frame in two runs with one OpenCV thread, against 0.478 and 0.462 with OpenCV's
    default of one per core. The gain in frames per second was within the spread of runs.
    The setting is per process: worker processes must call this themselves.
    """
    cv2.setNumThreads(1)
