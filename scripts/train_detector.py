"""Train the default region-of-interest detector on generated scenes and export it to ONNX.

Usage (from the repository root):
    PYTHONPATH=. .venv/bin/python scripts/train_detector.py --cache runs/data --steps 1800
    PYTHONPATH=. .venv/bin/python scripts/train_detector.py --smoke

The model is a small anchor-free one-stage detector: a plain CSP-style convolutional backbone,
a top-down feature pyramid and one head per stride (8, 16, 32). Each head cell predicts the
distances from its centre to the four box sides and one sigmoid score per class, with
objectness folded into the class scores, like YOLOv8. The export has the YOLOv8 output layout
[1, 4 + C, N] with (cx, cy, w, h) in input pixels and no NMS.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from edge.synth import CLASS_NAMES, render_close_up, render_scene

LOGGER = logging.getLogger("train_detector")
STRIDES = (8, 16, 32)
# Objects are assigned to the levels whose size range contains their longer side, in input
# pixels. The ranges overlap so that mid-sized objects train two levels.
LEVEL_RANGES = ((0.0, 96.0), (48.0, 192.0), (96.0, 1e9))
CENTRE_RADIUS = 2.5
PAD_VALUE = 114
MODEL_VERSION = "0.2.0"
# Frame sizes (width, height) of close-up scenes: webcam and phone shapes, and the small
# square crops of some code test sets.
CLOSE_UP_SIZES = ((640, 480), (480, 640), (480, 480), (1280, 720), (240, 240))


def letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Resize keeping the aspect ratio and pad to size x size with grey 114.

    Returns:
        The padded image, the scale factor and the (left, top) padding in pixels.
    """
    height, width = image.shape[:2]
    scale = min(size / width, size / height)
    new_w, new_h = round(width * scale), round(height * scale)
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)
    left, top = (size - new_w) // 2, (size - new_h) // 2
    canvas = np.full((size, size, 3), PAD_VALUE, np.uint8)
    canvas[top : top + new_h, left : left + new_w] = resized
    return canvas, scale, (left, top)


def _render_one(task: tuple[int, int, int, float]) -> tuple[np.ndarray, np.ndarray]:
    seed, index, size, close_ups = task
    rng = np.random.default_rng([seed, index])
    if np.random.default_rng([seed, index, 1]).random() < close_ups:
        width, height = CLOSE_UP_SIZES[int(rng.integers(len(CLOSE_UP_SIZES)))]
        scene = render_close_up(rng, width, height)
    else:
        scene = render_scene(rng)
    image, scale, (left, top) = letterbox(scene.image, size)
    rows = []
    for obj in scene.objects:
        x, y, w, h = obj.box
        centre_x, centre_y = left + (x + w / 2) * scale, top + (y + h / 2) * scale
        rows.append([CLASS_NAMES.index(obj.class_name), centre_x, centre_y, w * scale, h * scale])
    labels = np.array(rows, np.float32).reshape(-1, 5)
    return np.ascontiguousarray(image[:, :, ::-1]), labels


def build_cache(
    folder: Path, count: int, size: int, seed: int, workers: int, close_ups: float
) -> None:
    """Render `count` letterboxed RGB scenes with their labels into `folder`, unless present.

    A share `close_ups` of the scenes are close-ups (`render_close_up`) rather than scenes.
    """
    meta_path = folder / "meta.json"
    meta = {
        "count": count,
        "size": size,
        "seed": seed,
        "classes": list(CLASS_NAMES),
        "close_ups": close_ups,
    }
    if meta_path.exists() and json.loads(meta_path.read_text()) == meta:
        LOGGER.info("using cached data set in %s (%d scenes)", folder, count)
        return
    folder.mkdir(parents=True, exist_ok=True)
    images = np.lib.format.open_memmap(
        folder / "images.npy", mode="w+", dtype=np.uint8, shape=(count, size, size, 3)
    )
    labels: list[np.ndarray] = []
    started = time.monotonic()
    tasks = [(seed, index, size, close_ups) for index in range(count)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        for index, (image, label) in enumerate(pool.imap(_render_one, tasks, chunksize=8)):
            images[index] = image
            labels.append(label)
            if (index + 1) % 500 == 0:
                LOGGER.info("rendered %d/%d scenes", index + 1, count)
    images.flush()
    offsets = np.cumsum([0] + [len(label) for label in labels])
    np.save(folder / "labels.npy", np.concatenate(labels))
    np.save(folder / "offsets.npy", offsets)
    meta_path.write_text(json.dumps(meta))
    LOGGER.info("rendered %d scenes in %.0f s", count, time.monotonic() - started)


class ConvBlock(nn.Sequential):
    """Convolution, batch norm and SiLU."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False),
            nn.BatchNorm2d(c_out),
            nn.SiLU(inplace=True),
        )


class CSPStage(nn.Module):
    """Cross-stage partial stage: half the channels pass through residual blocks."""

    def __init__(self, channels: int, blocks: int) -> None:
        super().__init__()
        half = channels // 2
        self.split = ConvBlock(channels, 2 * half, 1)
        self.blocks = nn.ModuleList(
            nn.Sequential(ConvBlock(half, half), ConvBlock(half, half)) for _ in range(blocks)
        )
        self.merge = ConvBlock(2 * half, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip, y = self.split(x).chunk(2, dim=1)
        for block in self.blocks:
            y = y + block(y)
        return self.merge(torch.cat([skip, y], dim=1))


class Detector(nn.Module):
    """Backbone, top-down pyramid and per-stride heads that return raw (ltrb, logits) maps."""

    def __init__(self, num_classes: int, width: tuple[int, ...] = (16, 32, 64, 96, 128)) -> None:
        super().__init__()
        c1, c2, c3, c4, c5 = width
        self.stem = nn.Sequential(ConvBlock(3, c1, 3, 2), ConvBlock(c1, c2, 3, 2), CSPStage(c2, 1))
        self.down3 = nn.Sequential(ConvBlock(c2, c3, 3, 2), CSPStage(c3, 2))
        self.down4 = nn.Sequential(ConvBlock(c3, c4, 3, 2), CSPStage(c4, 2))
        self.down5 = nn.Sequential(ConvBlock(c4, c5, 3, 2), CSPStage(c5, 1))
        self.lateral5 = ConvBlock(c5, c4, 1)
        self.fuse4 = nn.Sequential(ConvBlock(2 * c4, c4, 1), CSPStage(c4, 1))
        self.lateral4 = ConvBlock(c4, c3, 1)
        self.fuse3 = nn.Sequential(ConvBlock(2 * c3, c3, 1), CSPStage(c3, 1))
        self.heads = nn.ModuleList(
            nn.Sequential(ConvBlock(c, c), nn.Conv2d(c, 4 + num_classes, 1)) for c in (c3, c4, c5)
        )
        for head in self.heads:
            output = head[-1]
            assert isinstance(output, nn.Conv2d)
            nn.init.constant_(output.bias[4:], -4.6)  # Start all class scores near 0.01.
            nn.init.constant_(output.bias[:4], 0.5)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        p3 = self.down3(self.stem(x))
        p4 = self.down4(p3)
        p5 = self.down5(p4)
        top5 = self.lateral5(p5)
        f4 = self.fuse4(torch.cat([F.interpolate(top5, scale_factor=2.0), p4], dim=1))
        top4 = self.lateral4(f4)
        f3 = self.fuse3(torch.cat([F.interpolate(top4, scale_factor=2.0), p3], dim=1))
        return [head(f) for head, f in zip(self.heads, (f3, f4, p5), strict=True)]


def grid_points(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return cell centres (N, 2) and their strides (N,) for all levels, in input pixels."""
    centres, strides = [], []
    for stride in STRIDES:
        cells = size // stride
        ys, xs = torch.meshgrid(torch.arange(cells), torch.arange(cells), indexing="ij")
        points = torch.stack([xs.flatten(), ys.flatten()], dim=1).float() * stride + stride / 2
        centres.append(points)
        strides.append(torch.full((cells * cells,), float(stride)))
    return torch.cat(centres), torch.cat(strides)


def flatten_levels(outputs: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-level maps (B, 4 + C, H, W) into (B, N, 4 + C)."""
    return torch.cat([o.flatten(2) for o in outputs], dim=2).transpose(1, 2)


def decode_boxes(raw: torch.Tensor, centres: torch.Tensor, strides: torch.Tensor) -> torch.Tensor:
    """Turn raw distances (..., 4) into (x1, y1, x2, y2) boxes in input pixels."""
    distances = F.softplus(raw) * strides[:, None]
    top_left = centres - distances[..., :2]
    bottom_right = centres + distances[..., 2:]
    return torch.cat([top_left, bottom_right], dim=-1)


def assign_targets(
    labels: np.ndarray, centres: torch.Tensor, strides: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pick positive cells for one image.

    A cell is positive for an object when its centre lies inside the box, within 2.5 strides
    of the box centre, on a level whose size range contains the object. A cell claimed by
    several objects goes to the smallest.

    Returns:
        Class targets (N, C), a positive mask (N,) and target boxes (N, 4) in x1, y1, x2, y2.
    """
    count = centres.shape[0]
    scores = torch.zeros(count, num_classes)
    boxes = torch.zeros(count, 4)
    best_area = torch.full((count,), float("inf"))
    level_low = torch.empty(count)
    level_high = torch.empty(count)
    for stride, (low, high) in zip(STRIDES, LEVEL_RANGES, strict=True):
        level_low[strides == stride] = low
        level_high[strides == stride] = high
    for cls, cx, cy, w, h in labels.tolist():
        x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
        side = max(w, h)
        inside = (centres[:, 0] > x1) & (centres[:, 0] < x2)
        inside &= (centres[:, 1] > y1) & (centres[:, 1] < y2)
        radius = CENTRE_RADIUS * strides
        near = ((centres[:, 0] - cx).abs() < radius) & ((centres[:, 1] - cy).abs() < radius)
        in_level = (side >= level_low) & (side <= level_high)
        # Small objects may fall between cell centres: take the nearest cell of the finest level.
        candidates = inside & near & in_level
        if not bool(candidates.any()):
            distance = (centres - torch.tensor([cx, cy])).pow(2).sum(dim=1)
            distance[strides != STRIDES[0]] = float("inf")
            candidates = torch.zeros(count, dtype=torch.bool)
            candidates[int(distance.argmin())] = True
        chosen = candidates & (w * h < best_area)
        best_area[chosen] = w * h
        boxes[chosen] = torch.tensor([x1, y1, x2, y2])
        scores[chosen] = 0.0
        scores[chosen, int(cls)] = 1.0
    return scores, best_area < float("inf"), boxes


def giou_loss(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the generalised IoU loss (1 - GIoU) and the IoU of matching (x1, y1, x2, y2) rows."""
    top_left = torch.max(pred[:, :2], target[:, :2])
    bottom_right = torch.min(pred[:, 2:], target[:, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=1)
    area_pred = (pred[:, 2:] - pred[:, :2]).clamp(min=0).prod(dim=1)
    area_target = (target[:, 2:] - target[:, :2]).prod(dim=1)
    union = area_pred + area_target - inter + 1e-6
    iou = inter / union
    hull = (torch.max(pred[:, 2:], target[:, 2:]) - torch.min(pred[:, :2], target[:, :2])).prod(1)
    giou = iou - (hull - union) / (hull + 1e-6)
    return 1.0 - giou, iou


def compute_loss(
    outputs: list[torch.Tensor], batch_labels: list[np.ndarray], size: int
) -> tuple[torch.Tensor, dict[str, float]]:
    """Return the focal classification loss plus 2x the GIoU box loss, per positive cell."""
    flat = flatten_levels(outputs)
    centres, strides = grid_points(size)
    num_classes = flat.shape[2] - 4
    targets = [assign_targets(labels, centres, strides, num_classes) for labels in batch_labels]
    scores = torch.stack([t[0] for t in targets])
    positive = torch.stack([t[1] for t in targets])
    boxes = torch.stack([t[2] for t in targets])
    logits = flat[..., 4:]
    probability = logits.sigmoid()
    bce = F.binary_cross_entropy_with_logits(logits, scores, reduction="none")
    weight = torch.where(scores > 0, 0.25 * (1 - probability) ** 2, 0.75 * probability**2)
    num_positive = max(float(positive.sum()), 1.0)
    cls_loss = (weight.detach() * bce).sum() / num_positive
    box_loss = torch.zeros(())
    if bool(positive.any()):
        predicted = decode_boxes(
            flat[..., :4][positive],
            centres.expand(len(targets), -1, -1)[positive],
            strides.expand(len(targets), -1)[positive],
        )
        losses, _ = giou_loss(predicted, boxes[positive])
        box_loss = losses.mean()
    total = cls_loss + 2.0 * box_loss
    return total, {"cls": cls_loss.item(), "box": box_loss.item()}


class ExportWrapper(nn.Module):
    """Wrap a Detector so its output is YOLOv8-style [B, 4 + C, N]: (cx, cy, w, h) and scores."""

    def __init__(self, model: Detector, size: int) -> None:
        super().__init__()
        self.model = model
        centres, strides = grid_points(size)
        self.register_buffer("centres", centres)
        self.register_buffer("strides", strides)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        flat = flatten_levels(self.model(images))
        boxes = decode_boxes(flat[..., :4], self.centres, self.strides)
        centre = (boxes[..., :2] + boxes[..., 2:]) / 2
        extent = boxes[..., 2:] - boxes[..., :2]
        scores = flat[..., 4:].sigmoid()
        return torch.cat([centre, extent, scores], dim=-1).transpose(1, 2)


def export_onnx(model: Detector, size: int, path: Path) -> None:
    """Export the model with opset 17 and the Ultralytics-style metadata that readers expect."""
    wrapper = ExportWrapper(model, size).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.zeros(1, 3, size, size)
    # The dynamo exporter (the default in torch 2.13) needs onnxscript, which the training
    # extra does not install, so this uses the TorchScript-based exporter.
    torch.onnx.export(
        wrapper,
        (dummy,),
        str(path),
        input_names=["images"],
        output_names=["output0"],
        opset_version=17,
        dynamo=False,
    )
    proto = onnx.load(str(path))
    names = {index: name for index, name in enumerate(CLASS_NAMES)}
    metadata = {
        "names": str(names),
        "imgsz": str([size, size]),
        "stride": str(max(STRIDES)),
        "description": "edge default detector: text blocks, QR codes and EAN-13 barcodes",
        "version": MODEL_VERSION,
        "task": "detect",
        "batch": "1",
    }
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    LOGGER.info("exported %s (%.2f MB)", path, path.stat().st_size / 1e6)


class ModelEma:
    """Exponential moving average of the weights, warmed up so early steps move it faster."""

    def __init__(self, model: Detector, decay: float = 0.998) -> None:
        self.shadow = Detector(len(CLASS_NAMES))
        self.shadow.load_state_dict(model.state_dict())
        self.shadow.eval()
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: Detector) -> None:
        self.updates += 1
        decay = self.decay * (1 - math.exp(-self.updates / 200))
        for shadow, current in zip(
            self.shadow.state_dict().values(), model.state_dict().values(), strict=True
        ):
            if shadow.dtype.is_floating_point:
                shadow.mul_(decay).add_(current.detach(), alpha=1 - decay)
            else:
                shadow.copy_(current)


def load_cache(folder: Path) -> tuple[np.ndarray, list[np.ndarray]]:
    images = np.load(folder / "images.npy", mmap_mode="r")
    labels = np.load(folder / "labels.npy")
    offsets = np.load(folder / "offsets.npy")
    per_image = [labels[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
    return np.asarray(images), per_image


def make_batch(
    images: np.ndarray, labels: list[np.ndarray], indices: np.ndarray, size: int
) -> tuple[torch.Tensor, list[np.ndarray]]:
    """Stack images as float NCHW in 0..1 and rescale them and their labels to `size`."""
    batch = torch.from_numpy(np.stack([images[i] for i in indices])).permute(0, 3, 1, 2)
    batch = batch.float() / 255.0
    cache_size = images.shape[1]
    batch_labels = [labels[i].copy() for i in indices]
    if size != cache_size:
        batch = F.interpolate(batch, size=(size, size), mode="bilinear", antialias=True)
        for label in batch_labels:
            label[:, 1:] *= size / cache_size
    return batch, batch_labels


def learning_rate_factor(progress: float, warmup: float = 0.05) -> float:
    """Return the learning-rate multiplier: linear warm-up, then cosine decay to 5 %."""
    if progress < warmup:
        return max(progress / warmup, 0.01)
    decay = min((progress - warmup) / (1 - warmup), 1.0)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * decay))


def train(args: argparse.Namespace) -> Detector:
    """Train on the cached data set and return the EMA weights.

    With --max-minutes, progress through the schedule is the larger of the step fraction and
    the time fraction, so training on a busy machine still ends with a decayed learning rate,
    at the cost of a step count that depends on the machine's load.
    """
    images, labels = load_cache(args.cache)
    cache_size = images.shape[1]
    sizes = [s for s in range(256, cache_size + 1, 32) if s >= args.size - 96] or [cache_size]
    LOGGER.info("training on %d scenes, input sizes %s, %d steps", len(images), sizes, args.steps)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = Detector(len(CLASS_NAMES))
    LOGGER.info("model has %d parameters", sum(p.numel() for p in model.parameters()))
    ema = ModelEma(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    budget = args.max_minutes * 60

    order = rng.permutation(len(images))
    cursor = 0
    started = time.monotonic()
    model.train()
    for step in range(args.steps):
        elapsed = time.monotonic() - started
        progress = max(step / args.steps, elapsed / budget if budget else 0.0)
        if progress >= 1.0:
            LOGGER.warning(
                "stopping at step %d: time limit of %.0f min reached", step, args.max_minutes
            )
            break
        learning_rate = args.lr * learning_rate_factor(progress)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate

        if cursor + args.batch > len(order):
            order, cursor = rng.permutation(len(images)), 0
        indices = order[cursor : cursor + args.batch]
        cursor += args.batch
        size = int(rng.choice(sizes))
        batch, batch_labels = make_batch(images, labels, indices, size)
        loss, parts = compute_loss(model(batch), batch_labels, size)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        ema.update(model)

        if step % args.log_every == 0 or step == args.steps - 1:
            LOGGER.info(
                "step %d/%d size %d loss %.3f (cls %.3f, box %.3f) lr %.2e %.0f s",
                step + 1, args.steps, size, loss.item(), parts["cls"], parts["box"],
                learning_rate, elapsed,
            )  # fmt: skip
    LOGGER.info("training took %.1f min", (time.monotonic() - started) / 60)
    return ema.shadow


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train the default detector on generated scenes.")
    parser.add_argument(
        "--cache", type=Path, default=Path("runs/data"), help="folder for the rendered data set"
    )
    parser.add_argument("--images", type=int, default=4000, help="number of scenes to render")
    parser.add_argument(
        "--close-ups",
        type=float,
        default=0.2,
        help="share of the scenes that show one code or label filling much of the frame",
    )
    parser.add_argument(
        "--size", type=int, default=416, help="export input size S in pixels, a multiple of 32"
    )
    parser.add_argument("--steps", type=int, default=1800, help="optimiser steps")
    parser.add_argument(
        "--epochs", type=float, default=None, help="passes over the data set; overrides --steps"
    )
    parser.add_argument("--batch", type=int, default=16, help="scenes per step")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed for rendering, order and weights")
    parser.add_argument("--threads", type=int, default=2, help="torch threads and render processes")
    parser.add_argument(
        "--out", type=Path, default=Path("models/detector.onnx"), help="ONNX output path"
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=0.0,
        help="time budget in minutes: the schedule ends by then (0: steps only)",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=Path("runs/detector.pt"),
        help="where to save the trained (EMA) weights; none in --smoke mode",
    )
    parser.add_argument(
        "--export-from",
        type=Path,
        default=None,
        help="skip training and export these saved weights at --size",
    )
    parser.add_argument("--log-every", type=int, default=25, help="log every N steps")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="render 16 scenes, run 3 steps, export to a temporary folder",
    )
    args = parser.parse_args()
    if not 0.0 <= args.close_ups <= 1.0:
        parser.error(f"invalid --close-ups {args.close_ups}: expected a share in 0..1")
    if args.size % max(STRIDES):
        parser.error(f"invalid --size {args.size}: expected a multiple of {max(STRIDES)}")
    return args


def main() -> None:
    args = parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    torch.set_num_threads(args.threads)
    scratch = None
    if args.smoke:
        scratch = tempfile.TemporaryDirectory(prefix="detector-smoke-")
        args.cache = Path(scratch.name) / "data"
        args.out = (
            args.out
            if args.out != Path("models/detector.onnx")
            else Path(scratch.name) / "detector.onnx"
        )
        args.images, args.steps, args.batch, args.size, args.log_every = 16, 3, 4, 256, 1
    if args.export_from is not None:
        model = Detector(len(CLASS_NAMES))
        model.load_state_dict(torch.load(args.export_from, weights_only=True))
    else:
        build_cache(args.cache, args.images, args.size, args.seed, args.threads, args.close_ups)
        if args.epochs is not None:
            args.steps = max(1, round(args.epochs * args.images / args.batch))
        model = train(args)
        if not args.smoke:
            args.checkpoint.parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), args.checkpoint)
            LOGGER.info("saved weights to %s", args.checkpoint)
    model.eval()
    export_onnx(model, args.size, args.out)
    labels_path = args.out.parent / "labels.txt"
    labels_path.write_text("".join(f"{name}\n" for name in CLASS_NAMES), encoding="utf-8")
    LOGGER.info("wrote %s", labels_path)
    if scratch is not None:
        scratch.cleanup()


if __name__ == "__main__":
    main()
