"""Measure the exported detector: accuracy on generated scenes, real photos, and latency.

Usage (from the repository root):
    PYTHONPATH=. .venv/bin/python scripts/eval_detector.py --model models/detector.onnx \
        --corpus /path/to/corpus --json runs/eval.json

Generated scenes use seeds [--seed, index], which training never uses because it renders with
[training seed, index] and a different first element. Precision and recall count a detection as
correct when its class matches and its IoU with an unmatched ground-truth box is at least 0.5.
Close-ups (`edge.synth.render_close_up`: one code or label filling much of the frame) use the
same seeds, in five frame sizes taken in turn.
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import logging
import statistics
import time
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

from edge.synth import CLASS_NAMES, render_close_up, render_scene

LOGGER = logging.getLogger("eval_detector")
PAD_VALUE = 114


class OnnxDetector:
    """Letterbox, inference, decoding and per-class NMS for a YOLOv8-layout ONNX detector."""

    def __init__(self, path: Path, threads: int) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        self.size = int(ast.literal_eval(meta["imgsz"])[0])
        self.names: dict[int, str] = ast.literal_eval(meta["names"])

    def preprocess(self, image: np.ndarray) -> tuple[np.ndarray, float, tuple[int, int]]:
        """Letterbox a BGR frame to a 1 x 3 x S x S RGB float tensor in 0..1."""
        height, width = image.shape[:2]
        scale = min(self.size / width, self.size / height)
        new_w, new_h = round(width * scale), round(height * scale)
        resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)
        left, top = (self.size - new_w) // 2, (self.size - new_h) // 2
        canvas = np.full((self.size, self.size, 3), PAD_VALUE, np.uint8)
        canvas[top : top + new_h, left : left + new_w] = resized
        tensor = canvas[:, :, ::-1].transpose(2, 0, 1)[None].astype(np.float32) / 255.0
        return np.ascontiguousarray(tensor), scale, (left, top)

    def infer(self, tensor: np.ndarray) -> np.ndarray:
        output: np.ndarray = self.session.run(["output0"], {"images": tensor})[0]
        return output

    def detect(
        self, image: np.ndarray, conf: float = 0.25, iou: float = 0.5
    ) -> list[tuple[int, float, tuple[float, float, float, float]]]:
        """Return (class index, score, (x, y, w, h) in frame pixels) for each kept detection."""
        tensor, scale, (left, top) = self.preprocess(image)
        return decode(self.infer(tensor)[0], scale, (left, top), image.shape[:2], conf, iou)


def decode(
    output: np.ndarray,
    scale: float,
    padding: tuple[int, int],
    frame_shape: tuple[int, int],
    conf: float,
    iou: float,
) -> list[tuple[int, float, tuple[float, float, float, float]]]:
    """Turn one [4 + C, N] output into frame-pixel detections after per-class NMS."""
    scores = output[4:].T
    classes = scores.argmax(axis=1)
    best = scores[np.arange(len(classes)), classes]
    keep = best >= conf
    boxes = output[:4].T[keep]
    classes, best = classes[keep], best[keep]
    x1 = (boxes[:, 0] - boxes[:, 2] / 2 - padding[0]) / scale
    y1 = (boxes[:, 1] - boxes[:, 3] / 2 - padding[1]) / scale
    x2 = (boxes[:, 0] + boxes[:, 2] / 2 - padding[0]) / scale
    y2 = (boxes[:, 1] + boxes[:, 3] / 2 - padding[1]) / scale
    height, width = frame_shape
    corners = np.stack(
        [x1.clip(0, width), y1.clip(0, height), x2.clip(0, width), y2.clip(0, height)], axis=1
    )
    detections = []
    for cls in np.unique(classes):
        members = np.flatnonzero(classes == cls)
        for index in nms(corners[members], best[members], iou):
            x1, y1, x2, y2 = corners[members[index]]
            box = (float(x1), float(y1), float(x2 - x1), float(y2 - y1))
            detections.append((int(cls), float(best[members[index]]), box))
    detections.sort(key=lambda d: -d[1])
    return detections


def box_iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Return the IoU of one (x1, y1, x2, y2) box with each row of `others`."""
    top_left = np.maximum(box[:2], others[:, :2])
    bottom_right = np.minimum(box[2:], others[:, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=1)
    area = np.prod(box[2:] - box[:2])
    areas = np.prod(others[:, 2:] - others[:, :2], axis=1)
    return np.asarray(inter / np.maximum(area + areas - inter, 1e-9))


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    """Return the indices kept by greedy non-maximum suppression, best score first."""
    order = list(np.argsort(-scores))
    kept = []
    while order:
        first = order.pop(0)
        kept.append(int(first))
        if not order:
            break
        overlaps = box_iou(boxes[first], boxes[order])
        order = [o for o, v in zip(order, overlaps, strict=True) if v < iou]
    return kept


def _corners(box: tuple[float, float, float, float]) -> np.ndarray:
    x, y, w, h = box
    return np.array([x, y, x + w, y + h], np.float64)


def match_counts(
    detections: list[tuple[int, float, tuple[float, float, float, float]]],
    truths: list[tuple[int, tuple[float, float, float, float]]],
    num_classes: int,
) -> np.ndarray:
    """Return per-class [true positives, detections, ground truths] for one frame at IoU 0.5."""
    counts = np.zeros((num_classes, 3), np.int64)
    used = [False] * len(truths)
    for cls, _, box in detections:
        counts[cls, 1] += 1
        best, best_iou = -1, 0.5
        for index, (truth_cls, truth_box) in enumerate(truths):
            if used[index] or truth_cls != cls:
                continue
            overlap = float(box_iou(_corners(box), _corners(truth_box)[None])[0])
            if overlap >= best_iou:
                best, best_iou = index, overlap
        if best >= 0:
            used[best] = True
            counts[cls, 0] += 1
    for truth_cls, _ in truths:
        counts[truth_cls, 2] += 1
    return counts


# Frame sizes of the close-up scenes, taken in turn.
CLOSE_UP_SIZES = ((640, 480), (480, 640), (480, 480), (1280, 720), (240, 240))


def evaluate_generated(
    detector: OnnxDetector,
    scenes: int,
    seed: int,
    distortions: bool,
    conf: float,
    *,
    close_ups: bool = False,
) -> dict[str, dict[str, float]]:
    """Return precision and recall per class on freshly generated scenes or close-ups."""
    totals = np.zeros((len(CLASS_NAMES), 3), np.int64)
    for index in range(scenes):
        rng = np.random.default_rng([seed, index])
        if close_ups:
            width, height = CLOSE_UP_SIZES[index % len(CLOSE_UP_SIZES)]
            scene = render_close_up(rng, width, height, distortions=distortions)
        else:
            scene = render_scene(rng, distortions=distortions)
        truths = [(CLASS_NAMES.index(o.class_name), o.box) for o in scene.objects]
        totals += match_counts(detector.detect(scene.image, conf), truths, len(CLASS_NAMES))
    report = {}
    for cls, name in enumerate(CLASS_NAMES):
        hits, found, expected = (int(v) for v in totals[cls])
        report[name] = {
            "precision": hits / found if found else 0.0,
            "recall": hits / expected if expected else 0.0,
            "objects": expected,
            "detections": found,
        }
    return report


def _polygon_centres(path: Path) -> list[tuple[float, float]]:
    """Read ICDAR-style `x1,y1,...,x4,y4,text` rows and return the centres of legible entries."""
    centres = []
    with path.open(encoding="utf-8-sig", newline="") as handle:
        for row in csv.reader(handle):
            if len(row) < 9 or row[8].strip() == "###":
                continue
            xs, ys = [float(v) for v in row[0:8:2]], [float(v) for v in row[1:8:2]]
            centres.append((sum(xs) / 4, sum(ys) / 4))
    return centres


def _zbar_boxes(image: np.ndarray) -> list[tuple[float, float, float, float]]:
    """Return the (x, y, w, h) rectangles of the codes that zbar decodes in a BGR image."""
    from pyzbar import pyzbar

    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    return [(float(r.rect.left), float(r.rect.top), float(r.rect.width), float(r.rect.height))
            for r in pyzbar.decode(gray)]  # fmt: skip


def evaluate_corpus(detector: OnnxDetector, corpus: Path, conf: float) -> dict[str, object]:
    """Score real photos, which have no box annotations for codes.

    Code images count as found when any detection has the right class (a loose upper bound),
    and as localised when a detection of that class has IoU >= 0.5 with the rectangle that
    zbar reports for the code it decodes (images that zbar does not decode are left out of
    that count). Text images count the annotated lines or words whose centre lies in a text box.
    """
    code_hits: dict[str, list[int]] = {}
    code_boxes: dict[str, list[int]] = {}
    text_hits: dict[str, list[int]] = {}
    manifest = corpus / "MANIFEST.jsonl"
    for line in manifest.read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        image = cv2.imread(str(corpus / entry["file"]), cv2.IMREAD_COLOR)
        if image is None:
            LOGGER.warning("skipping %s: OpenCV failed to read it", entry["file"])
            continue
        detections = detector.detect(image, conf)
        folder = str(Path(entry["file"]).parent)
        if entry["kind"] in ("qr", "barcode"):
            expected_class = CLASS_NAMES.index("qr_code" if entry["kind"] == "qr" else "barcode")
            found = any(cls == expected_class for cls, _, _ in detections)
            code_hits.setdefault(folder, [0, 0])
            code_hits[folder][0] += int(found)
            code_hits[folder][1] += 1
            predicted = [_corners(box) for cls, _, box in detections if cls == expected_class]
            for truth in _zbar_boxes(image):
                code_boxes.setdefault(folder, [0, 0])
                code_boxes[folder][1] += 1
                if predicted and float(box_iou(_corners(truth), np.array(predicted)).max()) >= 0.5:
                    code_boxes[folder][0] += 1
            continue
        boxes = [box for cls, _, box in detections if cls == CLASS_NAMES.index("text")]
        boxes_file = next(f for f in entry["expected_files"] if f.endswith((".csv", ".txt")))
        centres = _polygon_centres(corpus / boxes_file)
        covered = sum(
            any(x <= cx <= x + w and y <= cy <= y + h for x, y, w, h in boxes) for cx, cy in centres
        )
        text_hits.setdefault(folder, [0, 0])
        text_hits[folder][0] += covered
        text_hits[folder][1] += len(centres)
    return {
        "codes_found_per_image": {k: {"found": v[0], "images": v[1]} for k, v in code_hits.items()},
        "zbar_boxes_matched_iou05": {
            k: {"matched": v[0], "zbar_decoded": v[1]} for k, v in code_boxes.items()
        },
        "text_centres_covered": {k: {"covered": v[0], "total": v[1]} for k, v in text_hits.items()},
    }


def measure_latency(path: Path, threads: int, runs: int) -> dict[str, float]:
    """Return median and 90th percentile milliseconds of one session.run on a 1-frame input."""
    detector = OnnxDetector(path, threads)
    frame = render_scene(np.random.default_rng(0))
    tensor, _, _ = detector.preprocess(frame.image)
    for _ in range(5):
        detector.infer(tensor)
    model_ms, total_ms = [], []
    for _ in range(runs):
        started = time.perf_counter()
        output = detector.infer(tensor)
        model_ms.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        tensor, scale, padding = detector.preprocess(frame.image)
        decode(detector.infer(tensor)[0], scale, padding, (720, 1280), 0.25, 0.5)
        total_ms.append((time.perf_counter() - started) * 1000)
    del output
    return {
        "threads": threads,
        "model_median_ms": statistics.median(model_ms),
        "model_p90_ms": float(np.percentile(model_ms, 90)),
        "pipeline_median_ms": statistics.median(total_ms),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Evaluate an exported detector.")
    parser.add_argument(
        "--model", type=Path, default=Path("models/detector.onnx"), help="ONNX file"
    )
    parser.add_argument("--scenes", type=int, default=200, help="generated scenes per setting")
    parser.add_argument("--seed", type=int, default=777, help="first seed element of test scenes")
    parser.add_argument("--conf", type=float, default=0.5, help="minimum class score, 0..1")
    parser.add_argument("--corpus", type=Path, default=None, help="real-photo corpus folder")
    parser.add_argument("--runs", type=int, default=50, help="timed inference runs per setting")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    detector = OnnxDetector(args.model, threads=2)
    results: dict[str, object] = {"model": str(args.model), "input_size": detector.size}
    for distortions in (True, False):
        key = "generated_distorted" if distortions else "generated_clean"
        results[key] = evaluate_generated(detector, args.scenes, args.seed, distortions, args.conf)
        LOGGER.info("%s: %s", key, json.dumps(results[key]))
    results["close_ups"] = evaluate_generated(
        detector, args.scenes, args.seed, True, args.conf, close_ups=True
    )
    LOGGER.info("close_ups: %s", json.dumps(results["close_ups"]))
    if args.corpus is not None:
        results["corpus"] = evaluate_corpus(detector, args.corpus, args.conf)
        LOGGER.info("corpus: %s", json.dumps(results["corpus"]))
    results["latency"] = [measure_latency(args.model, t, args.runs) for t in (1, 2)]
    LOGGER.info("latency: %s", json.dumps(results["latency"]))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
