"""Build the detector, readers and pipeline from a :class:`~edge.config.Config`."""

from __future__ import annotations

import logging
import os

from edge.config import DEFAULT_MERGE_CLASSES, Config
from edge.detector import Detector
from edge.pipeline import Pipeline, PipelineOptions
from edge.readers.base import Reader
from edge.readers.codes import CodeReader
from edge.readers.text import TextReader

logger = logging.getLogger(__name__)


def build_readers(config: Config) -> dict[str, Reader]:
    """Create one instance of each reader that a route names, keyed by reader name."""
    wanted = set(config.readers.routes.values())
    readers: dict[str, Reader] = {}
    if "text" in wanted:
        text = config.readers.text
        readers["text"] = TextReader(
            threads=text.threads,
            use_angle_classifier=text.use_angle_classifier,
            min_score=text.min_score,
            max_detect_pixels=text.max_detect_pixels,
            rewrite_models=text.rewrite_models,
            # One model run per concurrent read: the runs of all reads share these threads,
            # so a large region's lines use the cores that finished reads leave idle.
            workers=config.pipeline.concurrency,
        )
    if "codes" in wanted:
        readers["codes"] = CodeReader()
    return readers


#: Frames with more pixels get one zbar scan in the full-frame decode, without retries.
FULL_FRAME_RETRY_MAX_PIXELS = 500_000


def full_frame_code_reader() -> CodeReader:
    """Return the reader of the pipeline's full-frame code decode.

    The full-frame decode is a safety net for codes the detector missed. On a large frame it
    scans once, as plain zbar would: the retries on prepared copies of a whole 1920 x 1080
    frame took up to about 0.9 s on one core, after the frame's reads had ended. On the
    generated scenes and the corpus they found no code that the region reads missed. A
    small frame, such as the low-resolution photos of the corpus, keeps the retries.
    """
    return CodeReader(retry_max_pixels=FULL_FRAME_RETRY_MAX_PIXELS)


def detector_threads(config: Config) -> int:
    """Return the detector's intra-op thread count.

    Each frame is detected while the previous frame's regions are read. So with
    ``detector.threads = 0`` the detector gets the CPUs this process may use minus the cores
    that reads can keep busy, and at least one. OCR reads use ``pipeline.concurrency`` times
    ``readers.text.threads`` cores, code reads one core per worker process. On a 2-core
    x86-64 machine with two pipelines alternated in one process on the same frames, one
    thread in place of two gave 0 to 10% more frames per second, and the same rate with
    ``pipeline.concurrency = 1``.
    """
    if config.detector.threads:
        return config.detector.threads
    pipeline = config.pipeline
    routed = set(config.readers.routes.values())
    if "text" in routed:
        reading = pipeline.concurrency * config.readers.text.threads
    elif "codes" in routed:
        reading = min(pipeline.concurrency, pipeline.code_workers or pipeline.concurrency)
    else:
        reading = 0
    # NOTE: measured on 2 CPUs only. A frame with nothing to read, and `edge scan`, which
    # reads one frame at a time, detect with these threads too, fewer than the CPUs on 4 cores.
    return max(1, len(os.sched_getaffinity(0)) - reading)


def build_detector(config: Config) -> Detector:
    """Load the detector that ``config.detector`` describes, without warming it up."""
    detector_config = config.detector
    return Detector(
        detector_config.model,
        labels_path=detector_config.labels,
        score_threshold=detector_config.score_threshold,
        iou_threshold=detector_config.iou_threshold,
        threads=detector_threads(config),
        tile_scale=detector_config.tile_scale or None,
        merge_classes=detector_config.merge_classes,
        skip_unknown_merge_classes=detector_config.merge_classes == DEFAULT_MERGE_CLASSES,
    )


def pipeline_options(config: Config) -> PipelineOptions:
    """Return the pipeline's options; document classes are those routed to the text reader."""
    pipeline = config.pipeline
    return PipelineOptions(
        concurrency=pipeline.concurrency,
        op_timeout=pipeline.op_timeout,
        frame_deadline=pipeline.frame_deadline,
        full_frame_codes=pipeline.full_frame_codes,
        reuse_unchanged=pipeline.reuse_unchanged,
        code_workers=pipeline.code_workers,
        document_share=pipeline.document_share,
        document_classes=frozenset(
            cls for cls, name in config.readers.routes.items() if name == "text"
        ),
    )


def build_pipeline(config: Config) -> Pipeline:
    """Load the detector and readers (warming them up) and return a ready pipeline.

    This blocks for as long as the models take to load: call it from a worker thread when
    an event loop is running.
    """
    detector = build_detector(config)
    detector.warm_up()
    readers = build_readers(config)
    for reader in readers.values():
        reader.warm_up()
    routes = {cls: readers[name] for cls, name in config.readers.routes.items()}
    unknown = sorted(set(routes) - set(detector.class_names))
    if unknown:
        logger.warning(
            "readers.routes names classes the detector does not have: %s (it has %s)",
            ", ".join(unknown),
            ", ".join(detector.class_names),
        )
    options = pipeline_options(config)
    full_frame = full_frame_code_reader() if config.pipeline.full_frame_codes != "never" else None
    return Pipeline(detector, routes, code_reader=full_frame, options=options)
