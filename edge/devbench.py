"""``edge bench``: time each stage of the pipeline on this device, on generated frames.

The stages run one after another in this process, on the same frames, except
``ocr_document``, which reads generated document frames of its own:

* ``detector``: :meth:`Detector.detect_counted` on each frame.
* ``ocr``: the text reader on the crop of each detected region routed to it.
* ``codes``: the code reader on the crop of each detected region routed to it.
* ``codes_full_frame``: the pipeline's full-frame code decode on each whole frame (one scan
  of a large frame), unless ``pipeline.full_frame_codes`` is ``never``.
* ``ocr_document``: the text reader on up to ``DOCUMENT_FRAMES`` generated frames that an
  invoice page fills, read whole as the pipeline reads a document, unless
  ``pipeline.document_share`` is 0.
* ``pipeline``: :meth:`Pipeline.stream` over the frames, as the daemon drives it, with the
  configured concurrency and with ``pipeline.reuse_unchanged`` turned off, so that every
  region is read on every frame. Past ``PIPELINE_SCENES`` frames it cycles through the first
  ones, to bound memory.

The stage rows call the code reader in this process. The pipeline runs it in worker
processes, so its figures also include the hand-off of each crop to a worker, but its CPU
time leaves out what the workers use.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, TextIO, TypeVar

import cv2
import numpy as np
import onnxruntime as ort

from edge import __version__
from edge.config import Config
from edge.errors import EdgeError
from edge.factory import (
    build_detector,
    build_pipeline,
    build_readers,
    detector_threads,
    full_frame_code_reader,
)
from edge.pipeline import MIN_REGION_SIDE, FailedFrame, crop_with_margin
from edge.results import Frame, Image, RegionStatus
from edge.synth import render_document, render_scene

logger = logging.getLogger(__name__)

#: Seed of the generated frames, so runs measure the same scenes on machines with the same
#: fonts and library versions.
SEED = 1
#: Frame size when neither ``--size`` nor ``camera.width`` and ``camera.height`` set one.
DEFAULT_SIZE = (1280, 720)
#: Smallest frame side :func:`edge.synth.render_scene` accepts, in pixels.
MIN_FRAME_SIDE = 64
#: Object counts per generated frame, the same as ``scripts/bench.py`` uses.
_LABELS = (1, 8)
_CODES = (0, 4)
#: Most distinct frames the pipeline stage keeps in memory (6 MB each at 1920x1080).
PIPELINE_SCENES = 8
#: Most document frames the ``ocr_document`` stage reads: each is one long read.
DOCUMENT_FRAMES = 2
# pipeline.op_timeout should be at least this many times the p95 of a document read. This is
# a rule of thumb for the cores that the daemon's other reads take, not a measured factor.
_DOCUMENT_TIMEOUT_FACTOR = 2

#: Stage names in the order they run and are printed, with what one call covers.
STAGES = {
    "detector": "frame",
    "ocr": "text region",
    "codes": "code region",
    "codes_full_frame": "frame",
    "ocr_document": "document",
    "pipeline": "frame",
}
#: Reader name (a value of ``readers.routes``) to the stage that times its region reads.
_READER_STAGES = {"text": "ocr", "codes": "codes"}

_Result = TypeVar("_Result")


class BenchError(EdgeError):
    """Raised when the benchmark cannot run with the given settings."""


@dataclass
class StageTimes:
    """Wall-clock seconds of each call of one stage, and the CPU seconds of all of them."""

    name: str
    unit: str
    wall: list[float] = field(default_factory=list)
    cpu_total: float = 0.0

    def call(self, function: Callable[[Any], _Result], argument: Any) -> _Result:
        """Call ``function(argument)`` and add its wall-clock and CPU time to this stage."""
        cpu_started = time.process_time()
        started = time.perf_counter()
        result = function(argument)
        self.wall.append(time.perf_counter() - started)
        self.cpu_total += time.process_time() - cpu_started
        return result

    def summary(self) -> dict[str, Any]:
        """Return the call count and times in milliseconds; times are ``None`` with no calls."""
        calls = len(self.wall)
        if calls == 0:
            return {
                "unit": self.unit,
                "calls": 0,
                "mean_ms": None,
                "p50_ms": None,
                "p95_ms": None,
                "cpu_ms_per_call": None,
            }
        wall_ms = 1000 * np.asarray(self.wall)
        return {
            "unit": self.unit,
            "calls": calls,
            "mean_ms": float(wall_ms.mean()),
            "p50_ms": float(np.percentile(wall_ms, 50)),
            "p95_ms": float(np.percentile(wall_ms, 95)),
            "cpu_ms_per_call": 1000 * self.cpu_total / calls,
        }


def frame_size(config: Config, requested: tuple[int, int] | None) -> tuple[int, int]:
    """Return the (width, height) to measure: ``requested``, else the camera's, else 1280x720.

    Raises:
        BenchError: The configured camera size is below the 64-pixel minimum of generated
            frames.
    """
    if requested is not None:
        return requested
    width, height = config.camera.width, config.camera.height
    if width == 0 or height == 0:
        return DEFAULT_SIZE
    if min(width, height) < MIN_FRAME_SIDE:
        msg = (
            f"camera size {width}x{height} from the configuration is below the "
            f"{MIN_FRAME_SIDE}-pixel minimum of generated frames; pass --size WIDTHxHEIGHT"
        )
        raise BenchError(msg)
    return width, height


def generate_frames(count: int, width: int, height: int) -> Iterator[Image]:
    """Yield ``count`` generated scenes of labels, receipts and codes, the same on every call."""
    rng = np.random.default_rng(SEED)
    for _ in range(count):
        yield render_scene(rng, width, height, labels=_LABELS, codes=_CODES).image


def generate_documents(count: int, width: int, height: int) -> Iterator[Image]:
    """Yield ``count`` generated document frames, the same on every call."""
    rng = np.random.default_rng(SEED)
    for _ in range(count):
        yield render_document(rng, width, height).image


def describe_device(config: Config, frame_count: int, size: tuple[int, int]) -> dict[str, Any]:
    """Return the versions, CPUs, thread settings, model and frames the figures depend on."""
    usable_cpus = len(os.sched_getaffinity(0))
    return {
        "edge_version": __version__,
        "python_version": platform.python_version(),
        "machine": platform.machine(),
        "cpus_usable": usable_cpus,
        "cpus_total": os.cpu_count(),
        "onnxruntime_version": ort.__version__,
        "onnxruntime_providers": ort.get_available_providers(),
        "threads": {
            "detector.threads": config.detector.threads,
            "detector_intra_op_threads": detector_threads(config),
            "readers.text.threads": config.readers.text.threads,
            "pipeline.concurrency": config.pipeline.concurrency,
            "opencv_threads": cv2.getNumThreads(),
        },
        "model": str(config.detector.model),
        "settings": {
            "detector.tile_scale": config.detector.tile_scale,
            "detector.merge_classes": list(config.detector.merge_classes),
            "readers.text.max_detect_pixels": config.readers.text.max_detect_pixels,
            "readers.text.rewrite_models": config.readers.text.rewrite_models,
            "pipeline.code_workers": config.pipeline.code_workers,
            "pipeline.document_share": config.pipeline.document_share,
            "pipeline.op_timeout": config.pipeline.op_timeout,
            "pipeline.frame_deadline": config.pipeline.frame_deadline,
        },
        "frames": {"count": frame_count, "width": size[0], "height": size[1], "seed": SEED},
    }


def measure_stages(
    config: Config, frame_count: int, size: tuple[int, int]
) -> tuple[list[StageTimes], bool | None]:
    """Time the detector and each reader separately on every frame, in this thread.

    The text reader also reads up to ``DOCUMENT_FRAMES`` generated document frames whole.

    Blocks while the models load and run.

    Returns:
        The stage times, and whether the OCR models ran rewritten (``None`` without OCR).
    """
    stages = {name: StageTimes(name, unit) for name, unit in STAGES.items() if name != "pipeline"}
    # Readers load their models lazily, so building them first leaves nothing to close if
    # the detector fails to load.
    # Each stage is timed alone: one read at a time, its model calls in its own thread.
    alone = replace(config, pipeline=replace(config.pipeline, concurrency=1))
    readers = build_readers(alone)
    detector = build_detector(config)
    try:
        detector.warm_up()
        for reader in readers.values():
            reader.warm_up()
        text_reader = readers.get("text")
        rewritten = getattr(text_reader, "models_rewritten", None)
        full_frame_reader = (
            full_frame_code_reader() if config.pipeline.full_frame_codes != "never" else None
        )
        routes = config.readers.routes
        for index, image in enumerate(generate_frames(frame_count, *size), start=1):
            logger.info("timing the stages one by one: frame %d of %d", index, frame_count)
            regions, _ = stages["detector"].call(detector.detect_counted, image)
            for region in regions:
                reader_name = routes.get(region.class_name)
                box = region.box
                # The pipeline rejects such boxes before any reader sees them.
                if reader_name is None or min(box.w, box.h) < MIN_REGION_SIDE:
                    continue
                reader = readers[reader_name]
                crop, _ = crop_with_margin(image, box, reader.crop_margin)
                stages[_READER_STAGES[reader_name]].call(reader.read, crop)
            if full_frame_reader is not None:
                stages["codes_full_frame"].call(full_frame_reader.read, image)
        if text_reader is not None and config.pipeline.document_share > 0:
            documents = min(frame_count, DOCUMENT_FRAMES)
            for index, image in enumerate(generate_documents(documents, *size), start=1):
                logger.info("timing a document read: document %d of %d", index, documents)
                stages["ocr_document"].call(text_reader.read, image)
    finally:
        for reader in readers.values():
            reader.close()
        detector.close()
    return list(stages.values()), rewritten


async def measure_pipeline(
    config: Config, frame_count: int, size: tuple[int, int]
) -> tuple[StageTimes, dict[str, Any]]:
    """Time the pipeline per frame, driven as ``edge run`` drives it, without reuse.

    Each frame is detected while the previous frame's regions are read, as in the daemon, so
    a frame's time includes its wait for those reads.

    Returns:
        The per-frame times, and the frames per second and region count per status.
        The CPU time is this process's only, without the code reader's worker processes.
    """
    no_reuse = replace(config, pipeline=replace(config.pipeline, reuse_unchanged=False))
    pipeline = await asyncio.to_thread(build_pipeline, no_reuse)
    stage = StageTimes("pipeline", STAGES["pipeline"])
    statuses = dict.fromkeys((status.value for status in RegionStatus), 0)
    # Rendered before the clock starts, so the rate leaves out the time spent rendering them.
    # At most PIPELINE_SCENES distinct frames are kept, and longer runs cycle through them.
    images = list(generate_frames(min(frame_count, PIPELINE_SCENES), *size))

    try:
        # The first frame also starts the code reader's worker processes, so it is not timed.
        warm_up = next(generate_frames(1, *size))
        await pipeline.process(Frame(0, time.time(), warm_up, "warm-up"))
        logger.info("timing the whole pipeline on %d frames", frame_count)
        frames = [
            Frame(seq, time.time(), images[(seq - 1) % len(images)], f"synth-{seq}")
            for seq in range(1, frame_count + 1)
        ]
        cpu_started = time.process_time()
        started = time.perf_counter()
        async with contextlib.aclosing(pipeline.stream(frames)) as results:
            async for result in results:
                if isinstance(result, FailedFrame):
                    raise result.error
                stage.wall.append(result.timings_ms["total"] / 1000)
                for region in result.regions:
                    statuses[region.status.value] += 1
        run_seconds = time.perf_counter() - started
        stage.cpu_total += time.process_time() - cpu_started
    finally:
        await pipeline.aclose()
    figures = {
        "frames_per_second": frame_count / run_seconds if run_seconds > 0 else None,
        "reuse_unchanged": False,
        "regions": statuses,
    }
    return stage, figures


def run_bench(
    config: Config,
    *,
    frame_count: int,
    size: tuple[int, int] | None = None,
    as_json: bool = False,
    output: TextIO = sys.stdout,
) -> dict[str, Any]:
    """Measure every stage, write a table (or one JSON object) to ``output`` and return it.

    Raises:
        BenchError: The configured frame size is invalid.
        EdgeError: A model or reader failed to load or to run.
    """
    width, height = frame_size(config, size)
    report = describe_device(config, frame_count, (width, height))
    logger.info("benchmark: %d generated frames of %dx%d", frame_count, width, height)
    stages, rewritten = measure_stages(config, frame_count, (width, height))
    # The setting is the request. This records what ran, because a failed rewrite falls back.
    report["ocr_models_rewritten"] = rewritten
    pipeline_stage, pipeline_figures = asyncio.run(
        measure_pipeline(config, frame_count, (width, height))
    )
    stages.append(pipeline_stage)
    report["stages"] = {stage.name: stage.summary() for stage in stages}
    report["pipeline"] = pipeline_figures
    report["document_timeout"] = document_timeout(report)
    if as_json:
        output.write(json.dumps(report, indent=2) + "\n")
    else:
        output.write(format_report(report))
    output.flush()
    return report


def document_timeout(report: dict[str, Any]) -> dict[str, float | None] | None:
    """Compare ``pipeline.op_timeout`` with the p95 of the ``ocr_document`` stage.

    Returns:
        ``op_timeout_over_p95``, rounded to one decimal, and ``raise_to_seconds``: twice the
        p95, rounded up to a tenth of a second, when that ratio is under 2, else ``None``.
        ``None`` when no document was read or its p95 is 0.
    """
    document = report["stages"].get("ocr_document", {})
    p95_ms = document.get("p95_ms")
    if not document.get("calls") or not p95_ms:
        return None
    ratio = round(1000 * report["settings"]["pipeline.op_timeout"] / p95_ms, 1)
    needed = math.ceil(_DOCUMENT_TIMEOUT_FACTOR * p95_ms / 100) / 10
    raise_to = needed if ratio < _DOCUMENT_TIMEOUT_FACTOR else None
    return {"op_timeout_over_p95": ratio, "raise_to_seconds": raise_to}


def format_report(report: dict[str, Any]) -> str:
    """Render a report of :func:`run_bench` as a header, a table and notes, for a terminal."""
    threads = report["threads"]
    frames = report["frames"]
    pipeline = report["pipeline"]
    lines = [
        f"edge {report['edge_version']}, Python {report['python_version']}, "
        f"{report['machine']}, {_count(report['cpus_usable'], 'usable CPU')} of "
        f"{report['cpus_total']}",
        f"onnxruntime {report['onnxruntime_version']}, available providers: "
        + ", ".join(report["onnxruntime_providers"]),
        f"threads: detector.threads = {threads['detector.threads']} "
        f"({_count(threads['detector_intra_op_threads'], 'intra-op thread')}), "
        f"readers.text.threads = {threads['readers.text.threads']}, "
        f"pipeline.concurrency = {threads['pipeline.concurrency']}, "
        f"OpenCV threads = {threads['opencv_threads']}",
        f"model: {report['model']}",
        "speed settings: "
        + ", ".join(f"{key} = {_toml(value)}" for key, value in report["settings"].items()),
        f"OCR models: {_ocr_models(report.get('ocr_models_rewritten'))}",
        f"frames: {_count(frames['count'], 'generated scene')} of "
        f"{frames['width']}x{frames['height']} "
        f"(seed {frames['seed']})",
        "",
        f"{'stage':<18}{'per':<13}{'calls':>6}{'mean ms':>10}{'p95 ms':>10}{'CPU ms/call':>13}",
    ]
    for name, stage in report["stages"].items():
        lines.append(
            f"{name:<18}{stage['unit']:<13}{stage['calls']:>6}"
            f"{_milliseconds(stage['mean_ms']):>10}{_milliseconds(stage['p95_ms']):>10}"
            f"{_milliseconds(stage['cpu_ms_per_call']):>13}"
        )
    latency = report["stages"]["pipeline"]
    fps = pipeline["frames_per_second"]
    regions = ", ".join(f"{count} {status}" for status, count in pipeline["regions"].items())
    lines += [
        "",
        f"pipeline: {_rate(fps)} frames/s, latency p50 {_milliseconds(latency['p50_ms'])} ms, "
        f"p95 {_milliseconds(latency['p95_ms'])} ms, reuse_unchanged off",
        f"pipeline regions: {regions}",
        "CPU ms/call is the CPU time of this process, all threads, per call. The code stages",
        "run zbar in this process. The pipeline runs it in worker processes: its times include",
        "the hand-off to them, and its CPU time leaves out what they use.",
    ]
    if report["stages"].get("ocr_document", {}).get("calls") == 0:
        reason = (
            "pipeline.document_share = 0"
            if report["settings"]["pipeline.document_share"] == 0
            else "no class is routed to the text reader"
        )
        lines.append(f"ocr_document did not run: {reason}.")
    check = document_timeout(report)
    if check is not None:
        timeout = report["settings"]["pipeline.op_timeout"]
        lines += [
            "A document is one read, and a document read that times out loses all its text.",
            f"pipeline.op_timeout = {timeout} s is {check['op_timeout_over_p95']:.1f} times "
            "the p95 of ocr_document.",
        ]
        if check["raise_to_seconds"] is not None:
            lines.append(
                f"Raise pipeline.op_timeout, and pipeline.frame_deadline with it, to at least "
                f"{check['raise_to_seconds']:.1f} s, because the daemon's reads share the cores."
            )
    return "\n".join(lines) + "\n"


def _count(number: int, noun: str) -> str:
    """Return ``number`` with ``noun``, adding an s unless the number is 1."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _milliseconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _toml(value: object) -> str:
    """Write a setting as it is spelled in the configuration file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)
    return str(value)


def _ocr_models(rewritten: bool | None) -> str:
    if rewritten is None:
        return "not loaded (no text reader)"
    return "rewritten" if rewritten else "rapidocr's originals (rewrite off or failed)"
