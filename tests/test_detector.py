"""Tests for the ONNX detector, on tiny models built here whose output is a fixed tensor."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge.config import DEFAULT_MERGE_CLASSES, parse_config
from edge.detector import (
    Detector,
    OutputLayout,
    classify_output_shape,
    drop_contained,
    frame_tiles,
    letterbox_image,
    merge_overlapping,
    touches_inner_edge,
    yolov5_anchor_count,
)
from edge.errors import ImageError, ModelError
from edge.factory import build_detector
from edge.results import Box
from edge.synth import Scene, render_scene

REPO_ROOT = Path(__file__).resolve().parent.parent
CORPUS = REPO_ROOT.parent / "shared" / "corpus"
SIZE = 64
NAMES = "{0: 'text', 1: 'qr_code'}"


def write_model(
    path: Path,
    output: npt.NDArray[np.float32],
    *,
    metadata: dict[str, str] | None = None,
    input_shape: tuple[int | str, ...] = (1, 3, SIZE, SIZE),
    output_shape: tuple[int | str, ...] | None = None,
    input_type: int = TensorProto.FLOAT,
) -> Path:
    """Write a model whose single output is ``output`` whatever the input."""
    constant = numpy_helper.from_array(output.astype(np.float32), name="fixed")
    graph = helper.make_graph(
        [helper.make_node("Identity", ["fixed"], ["output0"])],
        "fixed_output",
        [helper.make_tensor_value_info("images", input_type, list(input_shape))],
        [
            helper.make_tensor_value_info(
                "output0", TensorProto.FLOAT, list(output_shape or output.shape)
            )
        ],
        initializer=[constant],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key = key
        entry.value = value
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def anchors_last(rows: list[list[float]], anchors: int = 8) -> npt.NDArray[np.float32]:
    """Build a [1, 4+C, N] output from (cx, cy, w, h, class scores...) rows, padding with zeros."""
    values = np.zeros((anchors, len(rows[0])), dtype=np.float32)
    values[: len(rows)] = rows
    return values.T[np.newaxis].copy()


def rows_first(rows: list[list[float]], anchors: int = 10) -> npt.NDArray[np.float32]:
    """Build a [1, N, K] output from rows, padding with zero rows."""
    values = np.zeros((anchors, len(rows[0])), dtype=np.float32)
    values[: len(rows)] = rows
    return values[np.newaxis].copy()


def blank(height: int = SIZE, width: int = SIZE) -> npt.NDArray[np.uint8]:
    return np.zeros((height, width, 3), dtype=np.uint8)


def test_detector_anchors_last_decodes_boxes(tmp_path: Path) -> None:
    """A [1, 4+C, N] output yields the box, class and score of its anchor."""
    output = anchors_last([[32, 20, 20, 10, 0.1, 0.9]])
    model = write_model(tmp_path / "v8.onnx", output, metadata={"names": NAMES})
    detector = Detector(model)

    regions = detector.detect(blank())

    assert detector.layout is OutputLayout.ANCHORS_LAST
    assert len(regions) == 1
    assert regions[0].class_name == "qr_code"
    assert regions[0].score == pytest.approx(0.9)
    assert regions[0].box == Box(22, 15, 20, 10)


def test_detector_yolov5_multiplies_objectness(tmp_path: Path) -> None:
    """A [1, N, 5+C] output scores each box objectness times class score."""
    output = rows_first(
        [
            [32, 32, 10, 10, 0.5, 0.8, 0.1],
            [10, 10, 4, 4, 0.5, 0.4, 0.1],
        ]
    )
    model = write_model(tmp_path / "v5.onnx", output, metadata={"names": NAMES})
    detector = Detector(model)

    regions = detector.detect(blank())

    assert detector.layout is OutputLayout.YOLOV5
    assert len(regions) == 1
    assert regions[0].class_name == "text"
    assert regions[0].score == pytest.approx(0.4)
    assert regions[0].box == Box(27, 27, 10, 10)


def test_detector_end_to_end_skips_nms(tmp_path: Path) -> None:
    """A [1, N, 6] output is read as corner boxes and not suppressed again."""
    output = rows_first(
        [
            [10, 10, 30, 30, 0.9, 1],
            [11, 11, 31, 31, 0.8, 1],
            [40, 40, 50, 60, 0.1, 0],
        ]
    )
    model = write_model(tmp_path / "e2e.onnx", output, metadata={"names": NAMES})
    detector = Detector(model)

    regions = detector.detect(blank())

    assert detector.layout is OutputLayout.END_TO_END
    assert [region.box for region in regions] == [Box(10, 10, 20, 20), Box(11, 11, 20, 20)]
    assert [region.class_name for region in regions] == ["qr_code", "qr_code"]


def test_detector_yolov5_single_class_by_anchor_count(tmp_path: Path) -> None:
    """A [1, N, 6] output with YOLOv5's anchor count is decoded as YOLOv5, not end-to-end."""
    output = rows_first([[32, 32, 10, 10, 0.5, 0.8]], anchors=yolov5_anchor_count((SIZE, SIZE)))
    model = write_model(tmp_path / "v5.onnx", output, metadata={"names": "['text']"})
    detector = Detector(model)

    regions = detector.detect(blank())

    assert detector.layout is OutputLayout.YOLOV5
    assert [region.score for region in regions] == pytest.approx([0.4])
    assert [region.box for region in regions] == [Box(27, 27, 10, 10)]


def test_detector_end2end_metadata_overrides(tmp_path: Path) -> None:
    """end2end metadata makes a [1, N, 6] output with YOLOv5's anchor count end-to-end."""
    output = rows_first([[8, 8, 40, 40, 0.9, 0]], anchors=yolov5_anchor_count((SIZE, SIZE)))
    model = write_model(
        tmp_path / "e2e.onnx", output, metadata={"names": "['text']", "end2end": "True"}
    )
    detector = Detector(model)

    regions = detector.detect(blank())

    assert detector.layout is OutputLayout.END_TO_END
    assert [region.box for region in regions] == [Box(8, 8, 32, 32)]


def test_detector_float16_input_accepted(tmp_path: Path) -> None:
    """A model with a float16 input gets a float16 tensor and runs."""
    output = anchors_last([[32, 32, 4, 4, 0.9, 0.0]])
    model = write_model(
        tmp_path / "half.onnx",
        output,
        metadata={"names": NAMES},
        input_type=TensorProto.FLOAT16,
    )

    regions = Detector(model).detect(blank())

    assert len(regions) == 1


def test_detector_end_to_end_reversed_corners(tmp_path: Path) -> None:
    """An end-to-end box given as bottom-right then top-left comes out as the same box."""
    output = rows_first([[30, 30, 10, 10, 0.9, 0]])
    model = write_model(tmp_path / "e2e.onnx", output, metadata={"names": NAMES})

    regions = Detector(model).detect(blank())

    assert [region.box for region in regions] == [Box(10, 10, 20, 20)]


def test_detector_end_to_end_unknown_class_rejected(tmp_path: Path) -> None:
    """An end-to-end row whose class id has no name is dropped and counted."""
    output = rows_first([[10, 10, 30, 30, 0.9, 7], [10, 10, 30, 30, 0.8, 0]])
    model = write_model(tmp_path / "e2e.onnx", output, metadata={"names": NAMES})
    detector = Detector(model)

    regions = detector.detect(blank())

    assert [region.class_name for region in regions] == ["text"]
    assert detector.last_rejected == 1


def test_detector_letterbox_maps_to_frame(tmp_path: Path) -> None:
    """A box in input pixels maps back through the letterbox of a wide frame."""
    # A 200 x 100 frame scales by 0.32 to 64 x 32 and is padded by 16 rows on top.
    # Input box x 16..48, y 24..40 is frame x 50..150, y (24-16)/0.32=25..(40-16)/0.32=75.
    output = anchors_last([[32, 32, 32, 16, 0.9, 0.0]])
    model = write_model(tmp_path / "v8.onnx", output, metadata={"names": NAMES})
    detector = Detector(model)

    regions = detector.detect(blank(height=100, width=200))

    assert [region.box for region in regions] == [Box(50, 25, 100, 50)]


def test_frame_tiles_only_above_scale() -> None:
    # A 416-pixel input shrinks a 1280-pixel-wide frame 3.1 times, a 1920-pixel one 4.6 times.
    assert frame_tiles(1280, 720, (416, 416), 4.0) == []
    assert frame_tiles(1920, 1080, (416, 416), None) == []
    assert len(frame_tiles(1920, 1080, (416, 416), 4.0)) == 4


def test_frame_tiles_cover_frame_with_overlap() -> None:
    tiles = frame_tiles(1920, 1080, (416, 416), 4.0)
    assert tiles == [
        (0, 0, 1152, 648),
        (768, 0, 1920, 648),
        (0, 432, 1152, 1080),
        (768, 432, 1920, 1080),
    ]


def test_touches_inner_edge_ignores_frame_edges() -> None:
    top_left = (0, 0, 1152, 648)
    boxes = np.array(
        [
            [0, 0, 100, 100],  # at the frame's corner: whole
            [1100, 10, 1145, 60],  # 7 px from the tile's right edge, inside the frame: cut
            [10, 600, 60, 641],  # 7 px from the tile's bottom edge, inside the frame: cut
            [500, 300, 600, 400],  # inside the tile
        ],
        dtype=np.float32,
    )
    assert touches_inner_edge(boxes, top_left, 1920, 1080, 8).tolist() == [
        False,
        True,
        True,
        False,
    ]


def test_touches_inner_edge_left_and_top() -> None:
    bottom_right = (768, 432, 1920, 1080)
    boxes = np.array(
        [
            [770, 500, 900, 600],  # 2 px from the tile's left edge: cut
            [1000, 436, 1100, 500],  # 4 px from the tile's top edge: cut
            [1800, 1000, 1920, 1080],  # at the frame's corner: whole
        ],
        dtype=np.float32,
    )
    assert touches_inner_edge(boxes, bottom_right, 1920, 1080, 8).tolist() == [True, True, False]


def test_drop_contained_keeps_outer_box() -> None:
    boxes = np.array(
        [[0, 0, 100, 100], [10, 10, 50, 50], [90, 90, 200, 200], [20, 20, 40, 40]],
        dtype=np.float32,
    )
    scores = np.array([0.9, 0.8, 0.7, 0.95], dtype=np.float32)
    class_ids = np.array([0, 0, 0, 1], dtype=np.int64)
    kept = drop_contained(boxes, scores, class_ids, 0.8)
    # Box 1 lies inside box 0 of its class; box 3 is inside box 0 too, but of another class;
    # box 2 overlaps box 0 by a corner only.
    assert kept.tolist() == [3, 0, 2]


def test_detector_tiles_add_boxes(tmp_path: Path) -> None:
    """A frame shrunk past tile_scale is also detected in four tiles, boxes in frame pixels.

    The model finds one box at the centre of whatever it gets: the whole frame gives one at
    the frame's centre and each 60% tile one at the tile's centre.
    """
    output = anchors_last([[32, 32, 8, 8, 0.9, 0.0]])
    model = write_model(tmp_path / "v8.onnx", output, metadata={"names": NAMES})
    frame = blank(height=1000, width=1000)

    untiled = Detector(model).detect(frame)
    tiled = Detector(model, tile_scale=4.0).detect(frame)

    assert len(untiled) == 1
    centres = sorted((r.box.x + r.box.w / 2, r.box.y + r.box.h / 2) for r in tiled)
    expected = [(300, 300), (300, 700), (500, 500), (700, 300), (700, 700)]
    assert len(centres) == len(expected)
    for centre, wanted in zip(centres, expected, strict=True):
        assert centre == pytest.approx(wanted, abs=2)


def _covered_labels(detector: Detector, scenes: list[Scene]) -> int:
    """Count labels of which some text box covers at least 90%."""
    covered = 0
    for scene in scenes:
        boxes = [r.box for r in detector.detect(scene.image) if r.class_name == "text"]
        for item in scene.objects:
            if item.class_name != "text":
                continue
            left, top, width, height = item.box
            best = 0.0
            for box in boxes:
                overlap_x = min(left + width, box.x + box.w) - max(left, box.x)
                overlap_y = min(top + height, box.y + box.h) - max(top, box.y)
                if overlap_x > 0 and overlap_y > 0:
                    best = max(best, overlap_x * overlap_y / (width * height))
            covered += best >= 0.9
    return covered


def test_detector_tiles_find_small_labels() -> None:
    """On generated 1920 x 1080 scenes the bundled model finds more labels with tiles."""
    model = REPO_ROOT / "models" / "detector.onnx"
    rng = np.random.default_rng(2)
    scenes = [render_scene(rng, 1920, 1080, labels=(1, 8), codes=(0, 4)) for _ in range(8)]

    plain_detector = Detector(model, score_threshold=0.5)
    tiled_detector = Detector(model, score_threshold=0.5, tile_scale=4.0)
    plain = _covered_labels(plain_detector, scenes)
    tiled = _covered_labels(tiled_detector, scenes)

    assert tiled > plain
    plain_regions = sum(len(plain_detector.detect(scene.image)) for scene in scenes)
    tiled_regions = sum(len(tiled_detector.detect(scene.image)) for scene in scenes)
    # Parts of objects cut by a tile edge are dropped, so the tiles add about one box per
    # label they find, not several.
    assert tiled_regions - plain_regions <= tiled - plain + 2


def test_merge_overlapping_chains_unions() -> None:
    """Overlapping boxes of a merged class become their union, repeatedly; others stay."""
    boxes = np.array(
        [
            [0, 0, 10, 10],  # overlaps the next box
            [8, 0, 20, 10],
            [19, 9, 30, 30],  # overlaps the second box by one pixel
            [40, 40, 50, 50],  # touches nothing
            [50, 40, 60, 50],  # touches the previous box at x = 50 without overlapping
            [5, 5, 45, 45],  # another class over all of them
        ],
        dtype=np.float32,
    )
    scores = np.array([0.6, 0.9, 0.7, 0.5, 0.8, 0.95], dtype=np.float32)
    class_ids = np.array([0, 0, 0, 0, 0, 1], dtype=np.int64)

    merged_boxes, merged_scores, merged_ids = merge_overlapping(boxes, scores, class_ids, [0])

    assert merged_ids.tolist() == [1, 0, 0, 0]
    assert merged_boxes[0].tolist() == [5, 5, 45, 45]
    found = sorted(zip(merged_boxes[1:].tolist(), merged_scores[1:].tolist(), strict=True))
    assert found == [
        ([0, 0, 30, 30], pytest.approx(0.9)),
        ([40, 40, 50, 50], pytest.approx(0.5)),
        ([50, 40, 60, 50], pytest.approx(0.8)),
    ]


def test_merge_overlapping_needs_repeated_passes() -> None:
    """A union that reaches a box none of its parts overlapped is merged with it too."""
    boxes = np.array(
        [[0, 0, 10, 10], [20, 20, 30, 30], [5, 5, 25, 8], [9, 0, 12, 25]], dtype=np.float32
    )
    # Boxes 2 and 3 overlap box 0 but not box 1. Box 1 overlaps no other box, but the union
    # of boxes 0, 2 and 3 reaches x = 25, y = 25.
    scores = np.array([0.5, 0.6, 0.7, 0.8], dtype=np.float32)
    class_ids = np.zeros(4, dtype=np.int64)

    merged_boxes, merged_scores, _ = merge_overlapping(boxes, scores, class_ids, [0])

    assert merged_boxes.tolist() == [[0, 0, 30, 30]]
    assert merged_scores.tolist() == [pytest.approx(0.8)]


def test_merge_overlapping_reorders_corners() -> None:
    """Boxes given with x2 < x1 or y2 < y1 are merged by the area they cover."""
    boxes = np.array([[10, 10, 0, 0], [5, 5, 15, 15]], dtype=np.float32)
    scores = np.array([0.5, 0.6], dtype=np.float32)
    merged_boxes, _, _ = merge_overlapping(boxes, scores, np.zeros(2, dtype=np.int64), [0])
    assert merged_boxes.tolist() == [[0, 0, 15, 15]]


def test_detector_merge_classes_unknown_name(tmp_path: Path) -> None:
    model = write_model(tmp_path / "v8.onnx", anchors_last([[32, 32, 8, 8, 0.9, 0.0]]))
    with pytest.raises(ModelError, match=r"merge_classes names 'label'.*text, qr_code"):
        Detector(model, class_names=["text", "qr_code"], merge_classes=["label"])


def test_default_merge_classes_skip_unknown(tmp_path: Path) -> None:
    """The default merge_classes loads a model with other classes and merges the shared ones."""
    labels = tmp_path / "labels.txt"
    labels.write_text("text\nqr\n", encoding="utf-8")
    # Two overlapping text boxes and two overlapping qr boxes.
    model = write_model(
        tmp_path / "v8.onnx",
        anchors_last(
            [
                [12, 12, 12, 12, 0.9, 0.0],
                [16, 16, 12, 12, 0.8, 0.0],
                [44, 44, 12, 12, 0.0, 0.9],
                [48, 48, 12, 12, 0.0, 0.8],
            ]
        ),
    )
    config = parse_config(
        {"detector": {"model": str(model), "labels": str(labels), "iou_threshold": 0.9}}
    )

    detector = build_detector(config)
    regions = detector.detect(np.zeros((SIZE, SIZE, 3), np.uint8))

    assert sorted(r.class_name for r in regions) == ["qr", "qr", "text"]
    with pytest.raises(ModelError, match=r"merge_classes names 'qr_code', 'barcode'"):
        Detector(model, labels_path=labels, merge_classes=DEFAULT_MERGE_CLASSES)


def test_detector_merges_split_receipt() -> None:
    """The bundled model splits a real receipt scan into overlapping text boxes.

    With merging, no two text boxes overlap, and every split box lies inside a merged one.
    """
    path = CORPUS / "sroie2019" / "img" / "544.jpg"
    if not path.exists():
        pytest.skip(f"real-image corpus not found at {CORPUS}")
    read = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert read is not None, f"cannot read {path}"
    image = np.asarray(read, dtype=np.uint8)
    model = REPO_ROOT / "models" / "detector.onnx"

    split = [
        r.box for r in Detector(model, score_threshold=0.5).detect(image) if r.class_name == "text"
    ]
    merged = [
        r.box
        for r in Detector(model, score_threshold=0.5, merge_classes=["text"]).detect(image)
        if r.class_name == "text"
    ]

    def overlaps(a: Box, b: Box) -> bool:
        return min(a.x + a.w, b.x + b.w) > max(a.x, b.x) and min(a.y + a.h, b.y + b.h) > max(
            a.y, b.y
        )

    assert any(overlaps(a, b) for i, a in enumerate(split) for b in split[i + 1 :])
    assert len(merged) < len(split)
    assert not any(overlaps(a, b) for i, a in enumerate(merged) for b in merged[i + 1 :])
    for box in split:
        assert any(
            m.x <= box.x
            and m.y <= box.y
            and box.x + box.w <= m.x + m.w
            and box.y + box.h <= m.y + m.h
            for m in merged
        ), box


def test_detector_tile_scale_validated(tmp_path: Path) -> None:
    model = write_model(tmp_path / "v8.onnx", anchors_last([[32, 32, 8, 8, 0.9, 0.0]]))
    with pytest.raises(ValueError, match=r"tile_scale must be above 1, got 0\.5"):
        Detector(model, class_names=["text", "qr_code"], tile_scale=0.5)


def test_letterbox_pads_tall_frame_with_grey() -> None:
    """A tall frame is centred horizontally with grey 114 columns on both sides."""
    frame = np.full((128, 64, 3), 255, dtype=np.uint8)

    tensor, letterbox = letterbox_image(frame, (SIZE, SIZE))

    assert tensor.shape == (1, 3, SIZE, SIZE)
    assert tensor.dtype == np.float32
    assert letterbox.scale == pytest.approx(0.5)
    assert letterbox.pad_left == 16
    assert letterbox.pad_top == 0
    assert tensor[0, :, 10, 0] == pytest.approx([114 / 255] * 3)
    assert tensor[0, :, 10, 63] == pytest.approx([114 / 255] * 3)
    assert tensor[0, :, 10, 32] == pytest.approx([1.0] * 3)


def test_letterbox_converts_bgr_to_rgb() -> None:
    """The tensor's first channel is the frame's red, the last channel of BGR."""
    frame = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    frame[:, :, 2] = 255

    tensor, _ = letterbox_image(frame, (SIZE, SIZE))

    assert tensor[0, 0].min() == pytest.approx(1.0)
    assert tensor[0, 2].max() == pytest.approx(0.0)


def test_detector_nms_suppresses_same_class(tmp_path: Path) -> None:
    """Overlapping boxes of one class reduce to the best, and another class's box stays."""
    output = anchors_last(
        [
            [32, 32, 20, 20, 0.9, 0.0],
            [33, 33, 20, 20, 0.8, 0.0],
            [32, 32, 20, 20, 0.0, 0.7],
            [10, 10, 6, 6, 0.6, 0.0],
        ]
    )
    model = write_model(tmp_path / "v8.onnx", output, metadata={"names": NAMES})
    detector = Detector(model)

    regions = detector.detect(blank())

    assert [region.score for region in regions] == pytest.approx([0.9, 0.7, 0.6])
    assert [region.class_name for region in regions] == ["text", "qr_code", "text"]


def test_detector_iou_threshold_keeps_loose_overlap(tmp_path: Path) -> None:
    """Same-class boxes overlapping less than the IoU threshold are both kept."""
    # Boxes 20 wide shifted by 10: IoU = 200 / 600 = 0.33, below 0.45.
    output = anchors_last([[20, 32, 20, 20, 0.9, 0.0], [30, 32, 20, 20, 0.8, 0.0]])
    model = write_model(tmp_path / "v8.onnx", output, metadata={"names": NAMES})

    regions = Detector(model).detect(blank())

    assert len(regions) == 2


def test_detector_results_sorted_by_score(tmp_path: Path) -> None:
    """Regions come out highest score first whatever the anchor order."""
    output = anchors_last(
        [
            [5, 5, 4, 4, 0.3, 0.0],
            [20, 20, 4, 4, 0.0, 0.95],
            [40, 40, 4, 4, 0.6, 0.0],
        ]
    )
    model = write_model(tmp_path / "v8.onnx", output, metadata={"names": NAMES})

    regions = Detector(model).detect(blank())

    assert [region.score for region in regions] == pytest.approx([0.95, 0.6, 0.3])


def test_detector_clamps_boxes_to_frame(tmp_path: Path) -> None:
    """A box reaching past the frame edge is cut at the edge."""
    output = anchors_last([[60, 4, 20, 20, 0.9, 0.0]])
    model = write_model(tmp_path / "v8.onnx", output, metadata={"names": NAMES})
    detector = Detector(model)

    regions = detector.detect(blank())

    assert [region.box for region in regions] == [Box(50, 0, 14, 14)]
    assert detector.last_rejected == 0


def test_detector_box_outside_frame_rejected(tmp_path: Path) -> None:
    """A box lying wholly in the padding has no area in the frame and is counted."""
    # A 64 x 32 frame is padded by 16 rows above and below, and this box sits in the top band.
    output = anchors_last([[32, 6, 10, 6, 0.9, 0.0]])
    model = write_model(tmp_path / "v8.onnx", output, metadata={"names": NAMES})
    detector = Detector(model)

    regions = detector.detect(blank(height=32, width=64))

    assert regions == []
    assert detector.last_rejected == 1


def test_detector_nan_box_rejected(tmp_path: Path) -> None:
    """A box with a NaN coordinate is dropped and counted, and the finite one is kept."""
    output = anchors_last([[np.nan, 10, 4, 4, 0.9, 0.0], [32, 32, 4, 4, 0.8, 0.0]])
    model = write_model(tmp_path / "v8.onnx", output, metadata={"names": NAMES})
    detector = Detector(model)

    regions, rejected = detector.detect_counted(blank())

    assert [region.score for region in regions] == pytest.approx([0.8])
    assert rejected == 1


def test_detector_infinite_score_rejected(tmp_path: Path) -> None:
    """A box with an infinite score is dropped and counted instead of ranking first."""
    output = anchors_last([[10, 10, 4, 4, np.inf, 0.0], [32, 32, 4, 4, 0.8, 0.0]])
    model = write_model(tmp_path / "v8.onnx", output, metadata={"names": NAMES})
    detector = Detector(model)

    regions, rejected = detector.detect_counted(blank())

    assert [region.score for region in regions] == pytest.approx([0.8])
    assert rejected == 1


def test_detector_grey_input_model_raises(tmp_path: Path) -> None:
    """A model with a one-channel input raises ModelError naming its input shape."""
    output = anchors_last([[32, 32, 4, 4, 0.9, 0.0]])
    model = write_model(
        tmp_path / "grey.onnx", output, metadata={"names": NAMES}, input_shape=(1, 1, SIZE, SIZE)
    )

    with pytest.raises(ModelError, match=r"input shape \[1, 1, 64, 64\], but"):
        Detector(model)


def test_detector_many_detections_not_capped(tmp_path: Path) -> None:
    """Every separate box above the threshold is returned, with no fixed maximum."""
    rows = [[4 + 8 * (i % 8), 4 + 8 * (i // 8), 4, 4, 0.5, 0.0] for i in range(64)]
    output = anchors_last(rows, anchors=100)
    model = write_model(tmp_path / "v8.onnx", output, metadata={"names": NAMES})

    regions = Detector(model).detect(blank())

    assert len(regions) == 64


def test_detector_labels_file_names_classes(tmp_path: Path) -> None:
    """Without names metadata the labels file gives the class names."""
    labels = tmp_path / "labels.txt"
    labels.write_text("text\nbarcode\n\n", encoding="utf-8")
    output = anchors_last([[32, 32, 4, 4, 0.0, 0.9]])
    model = write_model(tmp_path / "v8.onnx", output)

    detector = Detector(model, labels_path=labels)

    assert detector.class_names == ("text", "barcode")


def test_detector_labels_file_overrides_metadata(tmp_path: Path) -> None:
    """A labels file given by the caller wins over the model's names metadata."""
    labels = tmp_path / "labels.txt"
    labels.write_text("words\ncodes\n", encoding="utf-8")
    output = anchors_last([[32, 32, 4, 4, 0.0, 0.9]])
    model = write_model(tmp_path / "v8.onnx", output, metadata={"names": NAMES})

    detector = Detector(model, labels_path=labels)

    assert detector.class_names == ("words", "codes")


def test_detector_class_names_argument_overrides(tmp_path: Path) -> None:
    """An explicit class_names list wins over the model's names metadata."""
    output = anchors_last([[32, 32, 4, 4, 0.0, 0.9]])
    model = write_model(tmp_path / "v8.onnx", output, metadata={"names": NAMES})

    detector = Detector(model, class_names=["a", "b"])

    assert detector.detect(blank())[0].class_name == "b"


def test_detector_class_count_mismatch_raises(tmp_path: Path) -> None:
    """Three names for a two-class model raise ModelError naming both counts."""
    output = anchors_last([[32, 32, 4, 4, 0.0, 0.9]])
    model = write_model(tmp_path / "v8.onnx", output, metadata={"names": "['a', 'b', 'c']"})

    with pytest.raises(ModelError, match=r"3 classes but model .* outputs 2"):
        Detector(model)


def test_detector_names_metadata_not_evaluated(tmp_path: Path) -> None:
    """Names metadata that is code, not a literal, raises ModelError."""
    output = anchors_last([[32, 32, 4, 4, 0.0, 0.9]])
    model = write_model(
        tmp_path / "v8.onnx", output, metadata={"names": "__import__('os').getcwd()"}
    )

    with pytest.raises(ModelError, match="unreadable names metadata"):
        Detector(model)


def test_detector_missing_names_raises(tmp_path: Path) -> None:
    """A model without names metadata, labels or class_names raises ModelError."""
    output = anchors_last([[32, 32, 4, 4, 0.0, 0.9]])
    model = write_model(tmp_path / "v8.onnx", output)

    with pytest.raises(ModelError, match="no names metadata"):
        Detector(model)


def test_detector_unknown_layout_names_shape(tmp_path: Path) -> None:
    """An output of [1, 5, 5] raises ModelError naming the file and the shape."""
    output = np.zeros((1, 5, 5), dtype=np.float32)
    model = write_model(tmp_path / "odd.onnx", output, metadata={"names": NAMES})

    with pytest.raises(ModelError, match=r"odd\.onnx has output shape \[1, 5, 5\]"):
        Detector(model)


def test_detector_missing_file_raises(tmp_path: Path) -> None:
    """A missing model file raises ModelError carrying the path."""
    path = tmp_path / "absent.onnx"

    with pytest.raises(ModelError, match="not found") as caught:
        Detector(path)

    assert caught.value.path == str(path)


def test_detector_invalid_file_raises(tmp_path: Path) -> None:
    """A file that is not an ONNX model raises ModelError."""
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"not a model")

    with pytest.raises(ModelError, match="not a valid ONNX model"):
        Detector(path)


def test_detector_dynamic_input_uses_imgsz(tmp_path: Path) -> None:
    """A dynamic input takes its size from imgsz metadata, height first."""
    output = anchors_last([[32, 32, 4, 4, 0.9, 0.0]])
    model = write_model(
        tmp_path / "dyn.onnx",
        output,
        metadata={"names": NAMES, "imgsz": "[48, 64]"},
        input_shape=(1, 3, "height", "width"),
    )

    assert Detector(model).input_size == (48, 64)


def test_detector_dynamic_input_uses_argument(tmp_path: Path) -> None:
    """Without imgsz metadata a dynamic input takes the input_size argument."""
    output = anchors_last([[32, 32, 4, 4, 0.9, 0.0]])
    model = write_model(
        tmp_path / "dyn.onnx",
        output,
        metadata={"names": NAMES},
        input_shape=(1, 3, "height", "width"),
    )

    assert Detector(model, input_size=(32, 96)).input_size == (32, 96)


def test_detector_dynamic_input_without_size_raises(tmp_path: Path) -> None:
    """A dynamic input with no imgsz and no argument raises ModelError."""
    output = anchors_last([[32, 32, 4, 4, 0.9, 0.0]])
    model = write_model(
        tmp_path / "dyn.onnx",
        output,
        metadata={"names": NAMES},
        input_shape=(1, 3, "height", "width"),
    )

    with pytest.raises(ModelError, match="pass input_size"):
        Detector(model)


def test_detector_dynamic_output_shape_probed(tmp_path: Path) -> None:
    """A dynamic output shape is learned by running the model once."""
    output = anchors_last([[32, 32, 4, 4, 0.9, 0.0]])
    model = write_model(
        tmp_path / "dyn.onnx",
        output,
        metadata={"names": NAMES},
        output_shape=(1, "values", "anchors"),
    )

    assert Detector(model).layout is OutputLayout.ANCHORS_LAST


def test_detector_static_input_ignores_argument(tmp_path: Path) -> None:
    """A fixed model input wins over a different input_size argument."""
    output = anchors_last([[32, 32, 4, 4, 0.9, 0.0]])
    model = write_model(tmp_path / "v8.onnx", output, metadata={"names": NAMES})

    assert Detector(model, input_size=(32, 32)).input_size == (SIZE, SIZE)


def test_detector_rejects_grey_image(tmp_path: Path) -> None:
    """A 2-D image raises ImageError instead of reaching the model."""
    output = anchors_last([[32, 32, 4, 4, 0.9, 0.0]])
    model = write_model(tmp_path / "v8.onnx", output, metadata={"names": NAMES})

    with pytest.raises(ImageError, match="H x W x 3 uint8"):
        Detector(model).detect(np.zeros((SIZE, SIZE), dtype=np.uint8))


def test_detector_closed_raises(tmp_path: Path) -> None:
    """Detecting after close raises ModelError."""
    output = anchors_last([[32, 32, 4, 4, 0.9, 0.0]])
    model = write_model(tmp_path / "v8.onnx", output, metadata={"names": NAMES})
    detector = Detector(model)
    detector.close()

    with pytest.raises(ModelError, match="closed"):
        detector.detect(blank())


def test_detector_warm_up_logs_timing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Warm-up logs a line before and a line with the time after."""
    output = anchors_last([[32, 32, 4, 4, 0.9, 0.0]])
    model = write_model(tmp_path / "v8.onnx", output, metadata={"names": NAMES})
    detector = Detector(model)

    with caplog.at_level(logging.INFO, logger="edge.detector"):
        detector.warm_up()

    assert "Warming up detector" in caplog.text
    assert "warmed up in" in caplog.text


def test_detector_threads_argument_applied(tmp_path: Path) -> None:
    """The threads argument sets onnxruntime's intra-op thread count."""
    output = anchors_last([[32, 32, 4, 4, 0.9, 0.0]])
    model = write_model(tmp_path / "v8.onnx", output, metadata={"names": NAMES})
    detector = Detector(model, threads=1)

    session = detector._session
    assert session is not None
    assert session.get_session_options().intra_op_num_threads == 1
    assert session.get_session_options().inter_op_num_threads == 1


def test_detector_threads_do_not_spin(tmp_path: Path) -> None:
    """The detector's thread pool sleeps between runs instead of spinning on the readers' cores."""
    output = anchors_last([[32, 32, 4, 4, 0.9, 0.0]])
    model = write_model(tmp_path / "v8.onnx", output, metadata={"names": NAMES})
    detector = Detector(model, threads=2)

    session = detector._session
    assert session is not None
    options = session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        pytest.param((1, 6, 84), (OutputLayout.ANCHORS_LAST, 2), id="v8-two-classes"),
        pytest.param((1, 84, 6), (OutputLayout.END_TO_END, None), id="end-to-end"),
        pytest.param((1, 300, 6), (OutputLayout.END_TO_END, None), id="end-to-end-300"),
        pytest.param((1, 252, 6), (OutputLayout.YOLOV5, 1), id="v5-one-class"),
        pytest.param((1, 252, 8), (OutputLayout.YOLOV5, 3), id="v5-three-classes"),
        pytest.param((1, 6, 6), (None, None), id="square"),
        pytest.param((1, 4, 84), (None, None), id="no-class-rows"),
        pytest.param((1, 84, 5), (None, None), id="no-class-columns"),
        pytest.param((2, 6, 84), (None, None), id="batch-2"),
        pytest.param((6, 84), (None, None), id="2-d"),
    ],
)
def test_classify_output_shape_cases(
    shape: tuple[int, ...], expected: tuple[OutputLayout | None, int | None]
) -> None:
    """Each shape maps to its layout and class count at a 64 x 64 input."""
    assert classify_output_shape(shape, (SIZE, SIZE)) == expected


def test_classify_output_shape_metadata_overrides() -> None:
    """end2end metadata decides a [1, N, 6] output whatever the anchor count."""
    shape = (1, 252, 6)

    assert classify_output_shape(shape, (SIZE, SIZE), end_to_end=True)[0] is (
        OutputLayout.END_TO_END
    )


def test_yolov5_anchor_count_at_640() -> None:
    """YOLOv5 at 640 x 640 has 25200 candidate boxes."""
    assert yolov5_anchor_count((640, 640)) == 25200


def test_detector_shipped_model_runs() -> None:
    """The project's trained detector loads and runs on a bundled sample frame."""
    model = REPO_ROOT / "models" / "detector.onnx"
    sample = REPO_ROOT / "edge" / "samples" / "frame-000.jpg"
    if not model.is_file():
        pytest.skip(f"{model} not present yet (trained separately)")
    if not sample.is_file():
        pytest.skip(f"{sample} not present")
    decoded = cv2.imread(str(sample), cv2.IMREAD_COLOR)
    assert decoded is not None
    frame = np.ascontiguousarray(decoded, dtype=np.uint8)
    detector = Detector(model)
    detector.warm_up()

    regions = detector.detect(frame)

    height, width = frame.shape[:2]
    outside = [
        region.box
        for region in regions
        if region.box.x + region.box.w > width or region.box.y + region.box.h > height
    ]
    assert outside == []
    assert regions == sorted(regions, key=lambda region: region.score, reverse=True)
