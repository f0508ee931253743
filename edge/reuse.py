"""Reuse of previous reads for regions whose pixels did not change.

A fixed camera sees the same label for minutes. Reading it again costs OCR time and gives the
same text, so the pipeline keeps the last frame's readings with a small grey-scale signature of
each crop, and hands a reading over again when a region of the same class sits at nearly the
same box and its signature still matches.

A signature is the crop shrunk to ``SIGNATURE_SIDE`` square pixels with area averaging, which
smooths sensor noise. The signatures of several crops can be stacked into one, row-wise, for a
reading made of them all. A whole frame's signature stacks those of its tiles (see
:func:`frame_signature`), so that a small code appearing anywhere in it changes at least one
tile. Two signatures match when fewer than ``changed_share`` of their pixels differ by more
than ``pixel_tolerance`` grey levels; a changed digit on a label covers more than that share of
its signature.

Frames overlap: the next frame's regions are looked up while this frame's reads still run. So
a region is stored when its read starts, as pending, and :meth:`ReuseCache.resolve` fills in
the reading when the read ends. A lookup that finds a pending entry tells the caller to wait
for that read rather than read the same pixels again.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from edge.results import Box, Image, Reading

#: Side in pixels of the square grey-scale signature of a crop.
SIGNATURE_SIDE = 64
#: Maximum tile side in pixels of a frame signature, so that one signature pixel averages at
#: most 4 x 4 frame pixels.
FRAME_TILE_SIDE = 256

Signature = npt.NDArray[np.int16]


@dataclass(slots=True, eq=False)
class CachedRead:
    """A stored reading with the signature of the pixels it was read from.

    Attributes:
        class_name: Detector class of the region.
        box: The region's box in the frame it was last seen in.
        signature: Signature of the crop the reading came from.
        reading: What the reader returned, in crop pixels; ``None`` while the read runs.
    """

    class_name: str
    box: Box
    signature: Signature
    reading: Reading | None

    @property
    def pending(self) -> bool:
        """Whether the read of this entry has not ended yet."""
        return self.reading is None


def signature(image: Image) -> Signature:
    """Return the grey-scale signature of an H x W x 3 BGR (or H x W grey) image."""
    grey = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    small = cv2.resize(grey, (SIGNATURE_SIDE, SIGNATURE_SIDE), interpolation=cv2.INTER_AREA)
    return small.astype(np.int16)


def frame_signature(image: Image) -> Signature:
    """Return the stacked signatures of the tiles of a whole frame, in row-major tile order.

    The frame is cut into a grid of equal tiles with sides of at most ``FRAME_TILE_SIDE``
    pixels. The smallest QR code is 21 modules wide, and zbar needs about 2 pixels per module
    (an estimate), so a readable code spans at least about 10 x 10 signature pixels. Where it
    appears, those pixels differ from the old ones unless the code is as grey on average as
    what it covers. ``ReuseCache`` counts a tile as changed from 9 differing pixels of its
    4096, by default.
    """
    grey = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    height, width = grey.shape
    rows, columns = -(-height // FRAME_TILE_SIDE), -(-width // FRAME_TILE_SIDE)
    side = SIGNATURE_SIDE
    # One area-averaging resize to the whole grid, then each tile's block as one signature.
    small = cv2.resize(grey, (columns * side, rows * side), interpolation=cv2.INTER_AREA)
    tiles = small.reshape(rows, side, columns, side).transpose(0, 2, 1, 3)
    return tiles.reshape(rows * columns * side, side).astype(np.int16)


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes, 0.0 when either is empty."""
    width = min(a.x + a.w, b.x + b.w) - max(a.x, b.x)
    height = min(a.y + a.h, b.y + b.h) - max(a.y, b.y)
    if width <= 0 or height <= 0:
        return 0.0
    overlap = width * height
    return overlap / (a.area + b.area - overlap)


class ReuseCache:
    """The readings of the previous frame, found again by class, box and pixels.

    Args:
        min_iou: Smallest overlap (intersection over union) between the old and new box.
        pixel_tolerance: Grey levels (0..255) by which a signature pixel may differ and still
            count as unchanged.
        changed_share: Share (0..1) of changed signature pixels from which the region counts
            as changed.
    """

    def __init__(
        self, *, min_iou: float = 0.85, pixel_tolerance: int = 12, changed_share: float = 0.002
    ) -> None:
        self._min_iou = min_iou
        self._pixel_tolerance = pixel_tolerance
        self._changed_share = changed_share
        self._previous: list[CachedRead] = []
        self._current: list[CachedRead] = []

    def lookup(self, class_name: str, box: Box, crop_signature: Signature) -> CachedRead | None:
        """Return the previous frame's read of this region if its pixels did not change.

        The entry returned may be :attr:`~CachedRead.pending`.
        """
        for entry in self._previous:
            if entry.class_name != class_name or box_iou(entry.box, box) < self._min_iou:
                continue
            if self.matches(entry.signature, crop_signature):
                return entry
        return None

    def matches(self, old: Signature, new: Signature) -> bool:
        """Return whether two signatures show the same pixels within the tolerances."""
        if old.shape != new.shape:
            return False
        changed = np.abs(old - new) > self._pixel_tolerance
        # A stacked signature (of several crops) matches when each of its crops does.
        blocks = changed.reshape(-1, SIGNATURE_SIDE * SIGNATURE_SIDE)
        return float(blocks.mean(axis=1).max()) < self._changed_share

    def store(
        self, class_name: str, box: Box, crop_signature: Signature, reading: Reading | None
    ) -> CachedRead:
        """Remember a reading (in crop pixels) of this frame for the next one.

        Pass ``None`` for a read that has not ended, then :meth:`resolve` the entry returned.
        """
        entry = CachedRead(class_name, box, crop_signature, reading)
        self._current.append(entry)
        return entry

    def resolve(self, entry: CachedRead, reading: Reading | None) -> None:
        """Fill in a pending entry, or drop it when its read gave no reading."""
        if reading is not None:
            entry.reading = reading
            return
        for entries in (self._previous, self._current):
            if any(e is entry for e in entries):
                entries[:] = [e for e in entries if e is not entry]

    def next_frame(self) -> None:
        """Make this frame's readings the ones the next frame is compared with."""
        self._previous, self._current = self._current, []
