"""ONNX region detector for YOLO-style exports, run with onnxruntime on the CPU.

Three output layouts are read. The anchor axis (one entry per candidate box) is taken to be
the larger of the two non-batch axes. YOLO exports have far more candidates than values per
candidate: 8400 anchors at 640x640 against 4 + C values, or typically 300 end-to-end rows
against 6. A model with more values than anchors (many classes at a tiny input) is misread,
and the class-count check against its names then raises ModelError.

* ``[1, 4+C, N]`` (YOLOv8, YOLO11): anchors on the last axis; cx, cy, w, h, then C class scores.
* ``[1, N, 5+C]`` (YOLOv5): anchors on the middle axis; cx, cy, w, h, objectness, C class
  scores, and a box scores objectness times class score.
* ``[1, N, 6]`` (end-to-end exports such as YOLOv10 and YOLO26): x1, y1, x2, y2, score,
  class id, already suppressed, so no NMS runs on them.

A single-class YOLOv5 export is also ``[1, N, 6]``. It is distinguished from an end-to-end export
by its anchor count: YOLOv5 has 3 anchors per grid cell at strides 8, 16 and 32, so N equals
``3 * sum((H / s) * (W / s))`` for the input size H x W. Any other N with 6 values per row is
read as end-to-end. An ``end2end`` entry in the model metadata (``True`` or ``False``), when
present, overrides this rule. Equal axes, or fewer values per row than a layout needs, raise
:class:`~edge.errors.ModelError`.
"""

from __future__ import annotations

import ast
import enum
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from edge.errors import ImageError, ModelError
from edge.results import Box, Image, Region

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]

#: Grey level of the letterbox padding, the same grey that Ultralytics and YOLOv5 pad with.
PAD_VALUE = 114

#: Strides of the three YOLOv5 detection heads, in input pixels.
_YOLOV5_STRIDES = (8, 16, 32)
_YOLOV5_ANCHORS_PER_CELL = 3

_ORT_ERRORS = (
    ort_errors.Fail,
    ort_errors.InvalidArgument,
    ort_errors.InvalidProtobuf,
    ort_errors.NoSuchFile,
    ort_errors.RuntimeException,
    ort_errors.InvalidGraph,
    ort_errors.NotImplemented,
)


class OutputLayout(enum.StrEnum):
    """Layout of a detector's output tensor, as described in the module docstring."""

    ANCHORS_LAST = "[1, 4+C, N]"
    YOLOV5 = "[1, N, 5+C]"
    END_TO_END = "[1, N, 6]"


@dataclass(frozen=True, slots=True)
class _Letterbox:
    """Scale and padding that fit a frame into the model input."""

    scale: float
    pad_left: int
    pad_top: int


class Detector:
    """Find regions in frames with a YOLO-style ONNX model.

    Args:
        model_path: The ``.onnx`` file.
        labels_path: A text file with one class name per line, in class id order. Used when
            ``class_names`` is ``None``, and it overrides the model's ``names`` metadata.
        class_names: Class names in class id order. Overrides both the labels file and the
            model's ``names`` metadata. ``None`` means take the names from those.
        score_threshold: Minimum score in 0..1 for a box to be kept.
        iou_threshold: Intersection over union in 0..1 above which the lower-scoring of two
            boxes of the same class is suppressed.
        input_size: Model input as (height, width) in pixels. Used only when the model's input
            shape is dynamic and its metadata has no ``imgsz``; ``None`` means the model must
            state its size.
        threads: onnxruntime intra-op threads. ``None`` means one per CPU this process may
            run on (``os.sched_getaffinity``).
        tile_scale: Frames that the model input shrinks by more than this factor are also
            detected in four overlapping tiles, each 60% of the frame's width and height, so
            that small objects keep enough pixels. Costs four more model runs on such frames.
            ``None`` never tiles.
        merge_classes: Class names whose overlapping boxes are replaced by their union,
            with the highest score of the group, until no two boxes of the class overlap.
            A text block that the model splits into overlapping parts is then read once,
            as a whole, instead of line by line in each part. Empty merges nothing.
        skip_unknown_merge_classes: Skip names in ``merge_classes`` that the model does not
            have, with a log line, instead of raising. For a default list that may name
            classes of another model.

    Raises:
        ModelError: The file is missing, unreadable or not a valid model, its output layout is
            not one of the three above, the class names do not match its class count, or
            ``merge_classes`` names a class the model does not have (unless
            ``skip_unknown_merge_classes``).
        ValueError: A threshold is outside 0..1, ``threads`` is below 1 or ``tile_scale`` is
            not above 1.
    """

    def __init__(
        self,
        model_path: Path,
        *,
        labels_path: Path | None = None,
        class_names: Sequence[str] | None = None,
        score_threshold: float = 0.25,
        iou_threshold: float = 0.45,
        input_size: tuple[int, int] | None = None,
        threads: int | None = None,
        tile_scale: float | None = None,
        merge_classes: Sequence[str] = (),
        skip_unknown_merge_classes: bool = False,
    ) -> None:
        _check_fraction("score_threshold", score_threshold)
        _check_fraction("iou_threshold", iou_threshold)
        if threads is not None and threads < 1:
            msg = f"threads must be at least 1, got {threads}"
            raise ValueError(msg)
        if tile_scale is not None and not tile_scale > 1.0:
            msg = f"tile_scale must be above 1, got {tile_scale}"
            raise ValueError(msg)
        self._tile_scale = tile_scale

        self._model_path = Path(model_path)
        self._score_threshold = score_threshold
        self._iou_threshold = iou_threshold
        self._threads = threads if threads is not None else len(os.sched_getaffinity(0))
        #: Boxes dropped by the latest :meth:`detect` call (a non-finite coordinate or an
        #: infinite score, empty after clamping to the frame, or an end-to-end class id with
        #: no name).
        self.last_rejected = 0

        self._session: ort.InferenceSession | None = _open_session(self._model_path, self._threads)
        metadata: dict[str, str] = dict(self._session.get_modelmeta().custom_metadata_map)
        model_input = self._session.get_inputs()[0]
        self._input_name: str = model_input.name
        self._input_dtype = np.float16 if model_input.type == "tensor(float16)" else np.float32
        self._input_size = self._resolve_input_size(model_input.shape, metadata, input_size)

        output_shape = self._output_shape()
        self._layout, class_count = self._resolve_layout(output_shape, metadata)
        self._class_names = self._resolve_class_names(
            metadata, labels_path, class_names, class_count
        )
        unknown = [name for name in merge_classes if name not in self._class_names]
        if unknown and not skip_unknown_merge_classes:
            msg = (
                f"merge_classes names {', '.join(map(repr, unknown))}, which the model does "
                f"not have; its classes are {', '.join(self._class_names)}: set "
                "detector.merge_classes to some of them, or to [] to merge nothing"
            )
            raise ModelError(msg, path=str(self._model_path))
        merged = [name for name in merge_classes if name in self._class_names]
        if unknown:
            logger.info(
                "Detector %s has no class %s, so merge_classes merges boxes of %s only",
                self._model_path,
                ", ".join(unknown),
                ", ".join(merged) or "no class",
            )
        self._merge_ids = sorted({self._class_names.index(name) for name in merged})
        logger.info(
            "Loaded detector %s: layout %s, output %s, input %dx%d (HxW), %d classes %s, "
            "%d intra-op threads",
            self._model_path,
            self._layout.value,
            output_shape,
            self._input_size[0],
            self._input_size[1],
            len(self._class_names),
            list(self._class_names),
            self._threads,
        )

    @property
    def model_path(self) -> Path:
        """The model file."""
        return self._model_path

    @property
    def input_size(self) -> tuple[int, int]:
        """Model input as (height, width) in pixels."""
        return self._input_size

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names in class id order."""
        return self._class_names

    @property
    def layout(self) -> OutputLayout:
        """The output layout read from the model."""
        return self._layout

    def warm_up(self) -> None:
        """Run one inference on a grey frame so the first real frame is not slowed down."""
        height, width = self._input_size
        logger.info("Warming up detector %s", self._model_path)
        started = time.perf_counter()
        self.detect(np.full((height, width, 3), PAD_VALUE, dtype=np.uint8))
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        logger.info("Detector %s warmed up in %.1f ms", self._model_path, elapsed_ms)

    def close(self) -> None:
        """Release the onnxruntime session. Safe to call more than once."""
        self._session = None

    def detect(self, image: Image) -> list[Region]:
        """Detect regions in a BGR frame and set :attr:`last_rejected`.

        Threads that call it at the same time overwrite each other's :attr:`last_rejected`,
        so concurrent callers use :meth:`detect_counted` instead.

        Args:
            image: H x W x 3 uint8 BGR pixels.

        Returns:
            Regions in frame pixels, highest score first.

        Raises:
            ImageError: The image is not H x W x 3 uint8.
            ModelError: The detector is closed or inference failed.
        """
        regions, rejected = self.detect_counted(image)
        self.last_rejected = rejected
        return regions

    def detect_counted(self, image: Image) -> tuple[list[Region], int]:
        """Detect regions like :meth:`detect`, also returning the number of boxes rejected."""
        _check_image(image)
        boxes, scores, class_ids, rejected = self._detect_boxes(image)
        tiles = frame_tiles(image.shape[1], image.shape[0], self._input_size, self._tile_scale)
        if tiles:
            found = [(boxes, scores, class_ids)]
            for tile in tiles:
                left, top, right, bottom = tile
                part = np.ascontiguousarray(image[top:bottom, left:right])
                tile_boxes, tile_scores, tile_ids, tile_rejected = self._detect_boxes(part)
                rejected += tile_rejected
                tile_boxes = tile_boxes + np.array([left, top, left, top], dtype=np.float32)
                # One input pixel covers this many tile pixels.
                shrink = max(
                    (bottom - top) / self._input_size[0], (right - left) / self._input_size[1]
                )
                cut = touches_inner_edge(
                    tile_boxes, tile, image.shape[1], image.shape[0], TILE_EDGE_MARGIN * shrink
                )
                found.append((tile_boxes[~cut], tile_scores[~cut], tile_ids[~cut]))
            boxes = np.concatenate([f[0] for f in found])
            scores = np.concatenate([f[1] for f in found])
            class_ids = np.concatenate([f[2] for f in found])
            kept = nms_by_class(boxes, scores, class_ids, self._iou_threshold)
            boxes, scores, class_ids = boxes[kept], scores[kept], class_ids[kept]
            kept = drop_contained(boxes, scores, class_ids, TILE_CONTAINED_SHARE)
            boxes, scores, class_ids = boxes[kept], scores[kept], class_ids[kept]
        if self._merge_ids:
            boxes, scores, class_ids = merge_overlapping(boxes, scores, class_ids, self._merge_ids)

        height, width = image.shape[:2]
        corners = clamp_boxes(boxes, width, height)
        has_area = (corners[:, 2] > corners[:, 0]) & (corners[:, 3] > corners[:, 1])
        rejected += int(np.count_nonzero(~has_area))
        regions = [
            Region(self._class_names[class_id], score, Box(x1, y1, x2 - x1, y2 - y1))
            for (x1, y1, x2, y2), score, class_id in zip(
                corners[has_area].tolist(),
                scores[has_area].tolist(),
                class_ids[has_area].tolist(),
                strict=True,
            )
        ]
        regions.sort(key=lambda region: region.score, reverse=True)

        if rejected:
            logger.debug("Detector rejected %d boxes in a %dx%d frame", rejected, width, height)
        return regions, rejected

    def _detect_boxes(
        self, image: Image
    ) -> tuple[FloatArray, FloatArray, npt.NDArray[np.int64], int]:
        """Run the model on one image and return boxes, scores, class ids and a reject count.

        Boxes are x1, y1, x2, y2 in the image's pixels, after non-maximum suppression.
        """
        tensor, letterbox = letterbox_image(image, self._input_size)
        raw = self._run(tensor.astype(self._input_dtype, copy=False))

        boxes, scores, class_ids = decode_output(raw, self._layout, self._score_threshold)
        boxes = unletterbox_boxes(boxes, letterbox)

        finite = np.isfinite(boxes).all(axis=1) & np.isfinite(scores)
        known_class = (class_ids >= 0) & (class_ids < len(self._class_names))
        keep = finite & known_class
        rejected = int(np.count_nonzero(~keep))
        boxes, scores, class_ids = boxes[keep], scores[keep], class_ids[keep]

        if self._layout is not OutputLayout.END_TO_END:
            kept = nms_by_class(boxes, scores, class_ids, self._iou_threshold)
            boxes, scores, class_ids = boxes[kept], scores[kept], class_ids[kept]
        return boxes, scores, class_ids, rejected

    def _run(self, tensor: npt.NDArray[Any]) -> FloatArray:
        if self._session is None:
            msg = f"detector for {self._model_path} is closed; create a new Detector"
            raise ModelError(msg, path=str(self._model_path))
        try:
            outputs = self._session.run(None, {self._input_name: tensor})
        except _ORT_ERRORS as exc:
            msg = f"inference failed for model {self._model_path}: {exc}"
            raise ModelError(msg, path=str(self._model_path)) from exc
        return np.asarray(outputs[0], dtype=np.float32)

    def _output_shape(self) -> tuple[int, ...]:
        """Read the output shape, running one inference when the model leaves it dynamic."""
        assert self._session is not None
        declared = self._session.get_outputs()[0].shape
        if all(isinstance(dim, int) for dim in declared):
            return tuple(declared)
        height, width = self._input_size
        dummy = np.zeros((1, 3, height, width), dtype=self._input_dtype)
        return tuple(self._run(dummy).shape)

    def _resolve_input_size(
        self,
        shape: Sequence[int | str | None],
        metadata: dict[str, str],
        fallback: tuple[int, int] | None,
    ) -> tuple[int, int]:
        if len(shape) != 4:
            msg = f"model {self._model_path} has input shape {list(shape)}; expected [1, 3, H, W]"
            raise ModelError(msg, path=str(self._model_path))
        channels, height, width = shape[1], shape[2], shape[3]
        if isinstance(channels, int) and channels != 3:
            msg = (
                f"model {self._model_path} has input shape {list(shape)}, but the detector "
                "feeds RGB images as [1, 3, H, W]; export the model with 3 input channels"
            )
            raise ModelError(msg, path=str(self._model_path))
        if isinstance(height, int) and isinstance(width, int):
            if fallback is not None and fallback != (height, width):
                logger.warning(
                    "Ignoring input_size %s: model %s has a fixed input of %dx%d (HxW)",
                    fallback,
                    self._model_path,
                    height,
                    width,
                )
            return height, width
        from_metadata = _parse_imgsz(metadata.get("imgsz"))
        if from_metadata is not None:
            return from_metadata
        if fallback is not None:
            return fallback
        msg = (
            f"model {self._model_path} has a dynamic input shape {list(shape)} and no imgsz "
            "metadata; pass input_size=(height, width)"
        )
        raise ModelError(msg, path=str(self._model_path))

    def _resolve_layout(
        self, shape: tuple[int, ...], metadata: dict[str, str]
    ) -> tuple[OutputLayout, int | None]:
        layout, class_count = classify_output_shape(
            shape, self._input_size, end_to_end=_parse_bool(metadata.get("end2end"))
        )
        if layout is None:
            msg = (
                f"model {self._model_path} has output shape {list(shape)}, which is not "
                "[1, 4+C, N], [1, N, 5+C] or [1, N, 6]; export it as a YOLO detection model"
            )
            raise ModelError(msg, path=str(self._model_path))
        return layout, class_count

    def _resolve_class_names(
        self,
        metadata: dict[str, str],
        labels_path: Path | None,
        explicit: Sequence[str] | None,
        class_count: int | None,
    ) -> tuple[str, ...]:
        if explicit is not None:
            names, origin = tuple(explicit), "the class_names argument"
        elif labels_path is not None:
            names, origin = _read_labels(labels_path, self._model_path), str(labels_path)
        elif "names" in metadata:
            names = _parse_names(metadata["names"], self._model_path)
            origin = f"the names metadata of {self._model_path}"
        else:
            msg = f"model {self._model_path} has no names metadata; pass labels_path or class_names"
            raise ModelError(msg, path=str(self._model_path))

        if not names:
            msg = f"no class names in {origin}"
            raise ModelError(msg, path=str(self._model_path))
        if class_count is not None and len(names) != class_count:
            msg = (
                f"{origin} lists {len(names)} classes but model {self._model_path} outputs "
                f"{class_count}; use a labels file that matches the model"
            )
            raise ModelError(msg, path=str(self._model_path))
        return names


def classify_output_shape(
    shape: Sequence[int], input_size: tuple[int, int], *, end_to_end: bool | None = None
) -> tuple[OutputLayout | None, int | None]:
    """Name the layout of an output shape and its class count by the rule in the module docstring.

    Args:
        shape: The output tensor shape.
        input_size: Model input as (height, width), used to count YOLOv5 anchors.
        end_to_end: The model's ``end2end`` metadata, or ``None`` when it has none.

    Returns:
        The layout and the class count, which is ``None`` for end-to-end models because their
        shape does not state it. The layout is ``None`` when the shape fits no layout.
    """
    if len(shape) != 3 or shape[0] != 1:
        return None, None
    rows, columns = shape[1], shape[2]
    if columns > rows and rows > 4:
        return OutputLayout.ANCHORS_LAST, rows - 4
    if rows <= columns:
        return None, None
    if columns == 6:
        if end_to_end is None:
            end_to_end = rows != yolov5_anchor_count(input_size)
        if end_to_end:
            return OutputLayout.END_TO_END, None
        return OutputLayout.YOLOV5, 1
    if columns > 5:
        return OutputLayout.YOLOV5, columns - 5
    return None, None


def yolov5_anchor_count(input_size: tuple[int, int]) -> int:
    """Count the candidate boxes a YOLOv5 model outputs for an input of (height, width)."""
    height, width = input_size
    cells = sum(math.ceil(height / s) * math.ceil(width / s) for s in _YOLOV5_STRIDES)
    return _YOLOV5_ANCHORS_PER_CELL * cells


def letterbox_image(image: Image, input_size: tuple[int, int]) -> tuple[FloatArray, _Letterbox]:
    """Scale a BGR frame into the model input keeping its aspect ratio, padding with grey.

    Returns:
        A 1 x 3 x H x W float32 RGB tensor in 0..1, and the scale and padding applied.
    """
    target_height, target_width = input_size
    height, width = image.shape[:2]
    scale = min(target_height / height, target_width / width)
    new_width = max(1, min(target_width, round(width * scale)))
    new_height = max(1, min(target_height, round(height * scale)))
    pad_left = (target_width - new_width) // 2
    pad_top = (target_height - new_height) // 2

    resized = cv2.resize(image, (new_width, new_height), interpolation=cv2.INTER_LINEAR)
    padded = cv2.copyMakeBorder(
        resized,
        pad_top,
        target_height - new_height - pad_top,
        pad_left,
        target_width - new_width - pad_left,
        cv2.BORDER_CONSTANT,
        value=(PAD_VALUE, PAD_VALUE, PAD_VALUE),
    )
    rgb = cv2.cvtColor(padded, cv2.COLOR_BGR2RGB)
    tensor = rgb.transpose(2, 0, 1)[np.newaxis].astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray(tensor), _Letterbox(scale, pad_left, pad_top)


def decode_output(
    raw: FloatArray, layout: OutputLayout, score_threshold: float
) -> tuple[FloatArray, FloatArray, npt.NDArray[np.int64]]:
    """Turn a raw output tensor into boxes above the score threshold.

    Returns:
        Boxes as x1, y1, x2, y2 in model input pixels (N x 4), their scores (N) and class
        ids (N).
    """
    if layout is OutputLayout.END_TO_END:
        rows = raw[0]
        boxes = rows[:, :4]
        scores = rows[:, 4]
        class_ids = np.nan_to_num(rows[:, 5], nan=-1.0, posinf=-1.0, neginf=-1.0)
        keep = scores >= score_threshold
        return boxes[keep], scores[keep], np.rint(class_ids[keep]).astype(np.int64)

    if layout is OutputLayout.ANCHORS_LAST:
        rows = raw[0].T
        class_scores = rows[:, 4:]
    else:
        rows = raw[0]
        class_scores = rows[:, 5:] * rows[:, 4:5]
    class_ids = np.argmax(class_scores, axis=1)
    scores = class_scores[np.arange(len(rows)), class_ids]
    keep = scores >= score_threshold
    return _xywh_to_xyxy(rows[keep, :4]), scores[keep], class_ids[keep].astype(np.int64)


def unletterbox_boxes(boxes: FloatArray, letterbox: _Letterbox) -> FloatArray:
    """Map x1, y1, x2, y2 boxes from model input pixels back to frame pixels."""
    offset = np.array(
        [letterbox.pad_left, letterbox.pad_top, letterbox.pad_left, letterbox.pad_top],
        dtype=np.float32,
    )
    return ((boxes - offset) / np.float32(letterbox.scale)).astype(np.float32)


def nms_by_class(
    boxes: FloatArray, scores: FloatArray, class_ids: npt.NDArray[np.int64], iou_threshold: float
) -> npt.NDArray[np.int64]:
    """Suppress overlapping boxes of the same class, keeping the higher score.

    A box is dropped when its intersection over union with a higher-scoring box of the same
    class is above ``iou_threshold``. Boxes of different classes never suppress each other.
    OpenCV's ``NMSBoxesBatched`` does the work in C++, which is faster than a greedy loop
    written in Python for the hundreds of boxes a low threshold lets through.

    Returns:
        Indices of the kept boxes, highest score first.
    """
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    left = np.minimum(boxes[:, 0], boxes[:, 2]).astype(np.float64)
    top = np.minimum(boxes[:, 1], boxes[:, 3]).astype(np.float64)
    width = np.abs(boxes[:, 2] - boxes[:, 0]).astype(np.float64)
    height = np.abs(boxes[:, 3] - boxes[:, 1]).astype(np.float64)
    xywh = np.stack([left, top, width, height], axis=1)
    # The scores were already thresholded, so OpenCV's own score filter (strictly greater
    # than) gets a value below any score.
    kept = cv2.dnn.NMSBoxesBatched(
        xywh.tolist(), scores.tolist(), class_ids.tolist(), -1.0, iou_threshold
    )
    return np.asarray(kept, dtype=np.int64).reshape(-1)


#: Share of the frame's width and height that each of the four tiles covers. Neighbouring
#: tiles overlap by 20% of the frame, so an object up to that size is whole in some tile.
TILE_SHARE = 0.6
#: A tile's box closer than this many model-input pixels to a tile edge inside the frame is
#: taken to be cut by that edge and dropped. The object is whole in another tile or in the
#: full frame. The model's boxes for cut objects often end a few input pixels short of the edge.
TILE_EDGE_MARGIN = 8
#: After tiling, a box of which more than this share lies inside a higher-scoring box of the
#: same class is dropped as a part of that object.
TILE_CONTAINED_SHARE = 0.8


def frame_tiles(
    width: int, height: int, input_size: tuple[int, int], tile_scale: float | None
) -> list[tuple[int, int, int, int]]:
    """Return the tiles (left, top, right, bottom) to detect in besides the whole frame.

    A frame gets four tiles in a 2 x 2 grid, each :data:`TILE_SHARE` of its size, when the
    letterbox into ``input_size`` (height, width) shrinks it by more than ``tile_scale``.
    Otherwise, or with ``tile_scale`` ``None``, it gets none.
    """
    if tile_scale is None:
        return []
    shrink = max(height / input_size[0], width / input_size[1])
    if shrink <= tile_scale:
        return []
    tile_width = round(width * TILE_SHARE)
    tile_height = round(height * TILE_SHARE)
    return [
        (left, top, left + tile_width, top + tile_height)
        for top in (0, height - tile_height)
        for left in (0, width - tile_width)
    ]


def touches_inner_edge(
    boxes: FloatArray, tile: tuple[int, int, int, int], width: int, height: int, margin: float
) -> npt.NDArray[np.bool_]:
    """Flag frame-pixel boxes within ``margin`` pixels of a tile edge inside the frame."""
    left, top, right, bottom = tile
    flags = np.zeros(len(boxes), dtype=bool)
    if left > 0:
        flags |= np.minimum(boxes[:, 0], boxes[:, 2]) <= left + margin
    if top > 0:
        flags |= np.minimum(boxes[:, 1], boxes[:, 3]) <= top + margin
    if right < width:
        flags |= np.maximum(boxes[:, 0], boxes[:, 2]) >= right - margin
    if bottom < height:
        flags |= np.maximum(boxes[:, 1], boxes[:, 3]) >= bottom - margin
    return flags


def drop_contained(
    boxes: FloatArray, scores: FloatArray, class_ids: npt.NDArray[np.int64], share: float
) -> npt.NDArray[np.int64]:
    """Return the indices of boxes not mostly inside a higher-scoring box of the same class.

    A box is dropped when more than ``share`` of its area lies inside such a box. Boxes are
    x1, y1, x2, y2; the result is ordered by score, highest first.
    """
    order = np.argsort(-scores, kind="stable")
    kept: list[int] = []
    for index in order.tolist():
        x1, y1, x2, y2 = boxes[index]
        area = max(float((x2 - x1) * (y2 - y1)), 1e-9)
        contained = False
        for other in kept:
            if class_ids[other] != class_ids[index]:
                continue
            ox1, oy1, ox2, oy2 = boxes[other]
            overlap_x = min(x2, ox2) - max(x1, ox1)
            overlap_y = min(y2, oy2) - max(y1, oy1)
            if overlap_x > 0 and overlap_y > 0 and overlap_x * overlap_y / area > share:
                contained = True
                break
        if not contained:
            kept.append(index)
    return np.asarray(kept, dtype=np.int64)


def merge_overlapping(
    boxes: FloatArray,
    scores: FloatArray,
    class_ids: npt.NDArray[np.int64],
    merge_ids: Sequence[int],
) -> tuple[FloatArray, FloatArray, npt.NDArray[np.int64]]:
    """Replace overlapping boxes of the classes in ``merge_ids`` by their union.

    Boxes are x1, y1, x2, y2. Two boxes overlap when their intersection has an area; boxes
    that only touch do not. A union can overlap a box that neither of its parts did, so
    merging repeats until no two boxes of a merged class overlap. A union gets the highest
    score of its group. Boxes of other classes are returned unchanged, before the unions.
    """
    if len(boxes) == 0:
        return boxes, scores, class_ids
    keep = ~np.isin(class_ids, merge_ids)
    out_boxes, out_scores, out_ids = [boxes[keep]], [scores[keep]], [class_ids[keep]]
    for class_id in merge_ids:
        chosen = boxes[class_ids == class_id]
        # Corners may come in either order; clamp_boxes reorders them later in any case.
        ordered = np.concatenate(
            [np.minimum(chosen[:, :2], chosen[:, 2:]), np.maximum(chosen[:, :2], chosen[:, 2:])],
            axis=1,
        )
        merged, merged_scores = _merge_group(
            ordered.tolist(), scores[class_ids == class_id].tolist()
        )
        out_boxes.append(np.asarray(merged, dtype=np.float32).reshape(-1, 4))
        out_scores.append(np.asarray(merged_scores, dtype=np.float32))
        out_ids.append(np.full(len(merged), class_id, dtype=np.int64))
    return np.concatenate(out_boxes), np.concatenate(out_scores), np.concatenate(out_ids)


def _merge_group(
    boxes: list[list[float]], scores: list[float]
) -> tuple[list[list[float]], list[float]]:
    """Merge overlapping x1, y1, x2, y2 boxes of one class until none overlap."""
    merged = True
    while merged:
        merged = False
        out_boxes: list[list[float]] = []
        out_scores: list[float] = []
        for (x1, y1, x2, y2), score in zip(boxes, scores, strict=True):
            for index, (ox1, oy1, ox2, oy2) in enumerate(out_boxes):
                if min(x2, ox2) > max(x1, ox1) and min(y2, oy2) > max(y1, oy1):
                    out_boxes[index] = [min(x1, ox1), min(y1, oy1), max(x2, ox2), max(y2, oy2)]
                    out_scores[index] = max(score, out_scores[index])
                    merged = True
                    break
            else:
                out_boxes.append([x1, y1, x2, y2])
                out_scores.append(score)
        boxes, scores = out_boxes, out_scores
    return boxes, scores


def clamp_boxes(boxes: FloatArray, width: int, height: int) -> npt.NDArray[np.int64]:
    """Clamp x1, y1, x2, y2 boxes to a width x height frame and round them to whole pixels.

    Corners are reordered so that x1 <= x2 and y1 <= y2. A box with nothing left inside the
    frame comes out with x1 == x2 or y1 == y2.
    """
    left = np.minimum(boxes[:, 0], boxes[:, 2])
    right = np.maximum(boxes[:, 0], boxes[:, 2])
    top = np.minimum(boxes[:, 1], boxes[:, 3])
    bottom = np.maximum(boxes[:, 1], boxes[:, 3])
    corners: FloatArray = np.stack(
        [
            np.clip(left, 0, width),
            np.clip(top, 0, height),
            np.clip(right, 0, width),
            np.clip(bottom, 0, height),
        ],
        axis=1,
    )
    rounded: FloatArray = np.rint(corners)
    return rounded.astype(np.int64)


def _xywh_to_xyxy(boxes: FloatArray) -> FloatArray:
    half_width = boxes[:, 2] / 2
    half_height = boxes[:, 3] / 2
    return np.stack(
        [
            boxes[:, 0] - half_width,
            boxes[:, 1] - half_height,
            boxes[:, 0] + half_width,
            boxes[:, 1] + half_height,
        ],
        axis=1,
    ).astype(np.float32)


def _open_session(model_path: Path, threads: int) -> ort.InferenceSession:
    try:
        model_bytes = model_path.read_bytes()
    except FileNotFoundError as exc:
        msg = (
            f"model file {model_path} not found. Set detector.model to an ONNX file, "
            "or train one with scripts/train_detector.py"
        )
        raise ModelError(msg, path=str(model_path)) from exc
    except OSError as exc:
        msg = f"cannot read model file {model_path}: {exc.strerror}; check its permissions"
        raise ModelError(msg, path=str(model_path)) from exc

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    # Without onnxruntime's arena, a run's buffers go back to the heap, which the pipeline
    # trims after each frame. The arena kept 12 MB more with no measurable speed gain.
    options.enable_cpu_mem_arena = False
    # Pool threads that spin between runs take the cores the readers need. With one 1280x720
    # detection every 50 ms (2-core x86-64), each took 15.6 rather than 41.6 ms of CPU without
    # spinning, and 12.8 rather than 9.5 ms of wall time.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(
            model_bytes, sess_options=options, providers=["CPUExecutionProvider"]
        )
    except _ORT_ERRORS as exc:
        msg = f"model file {model_path} is not a valid ONNX model ({exc}); export it again"
        raise ModelError(msg, path=str(model_path)) from exc


def _parse_imgsz(text: str | None) -> tuple[int, int] | None:
    """Parse Ultralytics ``imgsz`` metadata: ``"640"`` or ``"[480, 640]"`` (height, width)."""
    if text is None:
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None
    if isinstance(value, int) and value > 0:
        return value, value
    if (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(isinstance(v, int) and v > 0 for v in value)
    ):
        return int(value[0]), int(value[1])
    return None


def _parse_bool(text: str | None) -> bool | None:
    if text is None:
        return None
    lowered = text.strip().lower()
    if lowered in {"true", "1"}:
        return True
    if lowered in {"false", "0"}:
        return False
    return None


def _parse_names(text: str, model_path: Path) -> tuple[str, ...]:
    """Parse ``names`` metadata such as ``{0: 'text', 1: 'qr_code'}`` or ``['text']``."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError) as exc:
        msg = f"model {model_path} has unreadable names metadata {text!r}; pass labels_path"
        raise ModelError(msg, path=str(model_path)) from exc

    if isinstance(value, list | tuple) and all(isinstance(name, str) for name in value):
        return tuple(value)
    if (
        isinstance(value, dict)
        and all(isinstance(name, str) for name in value.values())
        and sorted(value) == list(range(len(value)))
    ):
        return tuple(value[index] for index in range(len(value)))
    msg = (
        f"model {model_path} has names metadata {text!r}, which is not a list or a dict of "
        "class ids 0..C-1 to names; pass labels_path"
    )
    raise ModelError(msg, path=str(model_path))


def _read_labels(labels_path: Path, model_path: Path) -> tuple[str, ...]:
    try:
        text = labels_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        msg = f"cannot read labels file {labels_path}: {exc}; check the path"
        raise ModelError(msg, path=str(model_path)) from exc
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        msg = f"{name} must be in 0..1, got {value}"
        raise ValueError(msg)


def _check_image(image: Image) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        msg = f"detector needs an H x W x 3 uint8 BGR image, got shape {image.shape} {image.dtype}"
        raise ImageError(msg)
    if image.shape[0] == 0 or image.shape[1] == 0:
        msg = f"detector got an empty image of shape {image.shape}"
        raise ImageError(msg)
