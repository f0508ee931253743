"""OCR reader for text regions, built on rapidocr-onnxruntime 1.4.4 (PP-OCRv4 models).

``RapidOCR.__call__`` with its default settings suits whole photos but not crops. Its text
detector scales the shorter side up to 736 pixels (``limit_type: min``), so a small label
crop costs more than a whole frame. It also runs the angle classifier on every line.
:class:`TextReader` keeps rapidocr's models and post-processing but runs the steps itself:
it detects lines in a crop downscaled first when its print is large, and upscales only a
small crop in which no line was found or some text got no line. It sends thin wide crops
straight to the recogniser, runs the classifier only when asked, and sets the onnxruntime
thread count.
By default it also replaces rapidocr's onnxruntime sessions with sessions on equivalent,
faster graphs (:mod:`edge.readers.graph`).

Recognition runs one line per onnxruntime call, so a cancelled read stops after at most one
line, and no line is padded to the widest line of its batch as in rapidocr's batches of six.
On this project's generated scenes (367 lines, one thread, x86-64), batches of one took 0.91x,
0.91x and 0.99x the CPU time of rapidocr's batching in three runs, and found as many words.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import logging
import math
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import cv2
import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from edge.errors import ImageError, ReaderError
from edge.memory import trim_heap
from edge.readers.base import Cancellation, OpKind, ReadCancelled, Reader
from edge.readers.graph import rewritten_models
from edge.results import Box, Image, Reading, TextLine

logger = logging.getLogger(__name__)

# The DB text detector downsamples by 32, so its input sides must be multiples of 32.
_DET_STRIDE = 32
# Crops below this height (pixels) rarely hold two legible lines, and the detector would need
# to upscale them, so they go straight to the recogniser.
_MIN_DETECT_HEIGHT = 32
# Crops smaller than this (pixels) on either side contain no legible glyph, so they return an
# empty reading.
_MIN_TEXT_SIDE = 4
# The coarse pass (see _COARSE_SCALE) keeps its lines only when their median box height is at
# least this many detector rows. 20 was tried, because coarse boxes come out about 1.23x as
# tall as full-size boxes, but 1080p scenes lost words for about a tenth more CPU time.
_SMALL_LINE_ROWS = 16.0
# When the lines that the downscaled detection of an input over max_detect_pixels finds have a
# median box height under this many detector rows, the input is detected again at full
# resolution in strips. 20 rather than 16 rows was measured in the sequential pipeline of
# scripts/bench.py, one run each on a 2-core x86-64 VM. It read 6 more words on the 20 scenes
# at 720p, 19 more on 20 other scenes at 1080p and 11 more on the corpus's 26 text images, for
# 2%, 4% and 18% more CPU time. Two alternated pairs of the full pipeline at 720p measured 4%
# to 6% more CPU time per frame. Of the inputs over the limit in the sequential runs, the
# strips ran on 1 of 9, 1 of 5 and 8 of 22 at 20 rows, and on none at 16. They were a frame
# of each generated set read whole as a document (median 18.5 rows at 720p) and receipt
# scans. At 24 rows the corpus read 7 fewer words than at 20, for about 40% more CPU time.
_WHOLE_SMALL_LINE_ROWS = 20.0
# Regions of at most _MAX_COARSE_PIXELS are first detected at this scale, on 0.36 of their
# pixels (see TextReader._detect_coarse). At 0.5, close lines ran together in one box.
_COARSE_SCALE = 0.6
# Inputs whose shorter side at _COARSE_SCALE is under this are detected at full size only.
_MIN_COARSE_SIDE = 64
# Larger inputs, such as whole scenes that mix large and small print, skip the coarse pass.
_MAX_COARSE_PIXELS = 300_000
# A coarse line box whose crop shows two bands of ink rows, each at least this share of its
# rows, contains two merged lines. Thinner bands are parts of neighbouring lines at its edges.
_MERGED_BAND_SHARE = 0.2
# A coarse pass that leaves more than this share of its text pixels (probability above the DB
# threshold) outside its boxes missed lines. On 36 generated scenes and the corpus's text
# images, two of 143 coarse passes were over it. Their regions gave 12 more words at full
# size. The highest share of the others was 0.074. The same test decides whether a small
# input detected at full size is detected again at _RETRY_SCALE.
_MAX_UNBOXED_SHARE = 0.1
# Inputs over max_detect_pixels are detected in horizontal strips that overlap by this many
# detector rows, so a line up to this high, less twice _STRIP_EDGE_MARGIN, lies whole inside
# one strip.
_STRIP_OVERLAP = 96
# Minimum detector rows of a strip. An input too wide for strips this high within
# max_detect_pixels is downscaled first.
_MIN_STRIP_ROWS = 256
# A line box within this many detector pixels of a strip's inner edge is taken to be cut.
_STRIP_EDGE_MARGIN = 4
# Two detected boxes side by side are one line split apart when the gap between them is at
# most _JOIN_GAP times the shorter box's height, and their height ratio and vertical overlap
# are at least _JOIN_HEIGHT_RATIO (see _join_split_lines). On 8 generated 1920 x 1080
# scenes this found 544 rather than 538 of 642 words, as many as rapidocr on the whole
# frame, mostly prices split at the point.
_JOIN_GAP = 0.5
_JOIN_HEIGHT_RATIO = 0.6
# A small input in which the text detector found no line at its own size is detected again at
# this scale. On 30 generated 720p scenes this found 1347 rather than 1340 of 1660 words: a
# blurred label with 10-pixel print. With 16 scenes at 1080p and the corpus, it ran 41 times,
# for 0.1 s of detection in all. It is also detected again when its lines leave more than
# _MAX_UNBOXED_SHARE of the text pixels outside them, and the lines found there are kept if
# there are more of them. In the sequential pipeline on the 40 generated scenes of
# scripts/bench.py and the corpus's 26 text images, that was one of 12 such detections: the
# same label, boxed a little wider, where 5 more words were read.
_RETRY_SCALE = 2.0
# Margin (pixels) added around an input before detection, because the DB detector misses lines
# that touch the image edge and detector regions are often cropped tight.
_DET_PAD = 16
# A row is ink-bearing when at least this share of its pixels is ink (after Otsu).
_INK_ROW_SHARE = 0.02
# Concurrent detections may process this many times max_detect_pixels at once, so a detection
# at the limit runs beside one of up to about half of it (sides are rounded to multiples of 32).
# At 1.0 such pairs took turns: streaming 20 generated 720p scenes (2-core x86-64), a model
# thread waited 0.3 to 0.5 s of about 5.6 s for them, and the pipeline ran 3% to 4% slower.
_DETECT_BUDGET_SHARE = 1.5
# Normalisation used by PP-OCR's detector and recogniser: (pixel / 255 - 0.5) / 0.5.
_NORM_MEAN = 0.5
_NORM_STD = 0.5
# Input height of the PP-OCRv4 recogniser; lines are scaled to it, keeping their aspect ratio.
_REC_HEIGHT = 48
# Recogniser inputs get _REC_TAIL columns of zeros (mid-grey) after the line, then are widened
# to a multiple of _REC_WIDTH_STEP and at least _REC_MIN_WIDTH, where PP-OCR pads to at least
# 320. On 4746 words of generated scenes and the corpus this found 4041 rather than 4042 words
# in 18% less recognition time. Without the tail (a minimum of 192), 4037 words.
_REC_WIDTH_STEP = 8
_REC_MIN_WIDTH = 128
_REC_TAIL = 32

FloatArray = npt.NDArray[np.float32]
_Result = TypeVar("_Result")


class TextReader(Reader):
    """Reads lines of text from a crop or a whole frame with PP-OCR through rapidocr.

    Crops whose aspect ratio (width / height) is at least ``single_line_aspect`` and whose
    rows show one band of ink, counted with and without the ink that touches the crop's
    edge, and crops under 32 pixels high, are read as one line by the recogniser alone.
    Other inputs go through text detection, then recognition of each detected line.
    Detection runs at 0.6 of the input's size first, and at its own size when the lines
    found there are small or may have merged. A small input in which the detector finds no
    line at its own size, or leaves text it saw outside its lines, is detected again at
    twice its size.

    Args:
        threads: onnxruntime intra-op threads per model session, at least 1. Keep
            ``threads`` times the number of concurrent reads at or below the core count.
            Values above ``os.cpu_count()`` are lowered to it, because rapidocr 1.4.4
            silently ignores them and uses every core.
        use_angle_classifier: Run PP-OCR's 0/180 degree classifier on each line and turn
            upside-down lines before recognition. Costs one more model run per read.
        min_score: Recognition confidence in 0..1 below which a line is dropped.
        max_side: Longer side in pixels above which the input is downscaled before
            reading. The detector also gets a 16-pixel margin on each side. The default
            keeps a 1280 x 720 frame at full size.
        single_line_aspect: Minimum width / height ratio for the recognition-only path.
        max_detect_pixels: Pixel count above which the text detector gets a downscaled copy
            of the input, or, when the lines found there are small, the input at full
            resolution in overlapping strips of at most this many pixels. Lines are still
            cut from the full-resolution input for recognition.
            The detector's temporary memory is about 230 bytes per input pixel (measured with
            onnxruntime 1.32 on x86-64), so this bounds each read's peak memory. The default
            keeps a 1280 x 720 frame at full size. In the pipeline on 8 generated 1920 x 1080
            scenes, a limit of 300,000 found 484 of 642 words, against 485 with no limit.
            It also sets the reader's budget for concurrent reads: the detector inputs of all
            running detections add up to about ``_DETECT_BUDGET_SHARE`` times
            ``max_detect_pixels`` at most (each side is rounded to a multiple of 32), and a
            detection that does not fit waits until the others end.
        rewrite_models: Run the models with the exact graph rewrites of
            :mod:`edge.readers.graph`, which make detection and recognition faster. The
            rewrite runs once, in a child process, when the models load.
        workers: Threads that run the model calls (a detection, or one line's recognition)
            of all concurrent reads of this reader, taking turns between the reads
            (:class:`ModelCalls`). Set it to the number of concurrent reads: each read then
            gets at least one thread's share, and when one large region is read alone at the
            end of a frame, its lines are recognised on every thread. At 1 each read runs
            its model calls in its own thread, one after another.
    """

    name = "text"
    kind: OpKind = "thread"
    cancellable = True

    def __init__(
        self,
        *,
        threads: int = 1,
        use_angle_classifier: bool = False,
        min_score: float = 0.5,
        max_side: int = 1280,
        single_line_aspect: float = 4.0,
        max_detect_pixels: int = 1_000_000,
        rewrite_models: bool = True,
        workers: int = 1,
    ) -> None:
        if threads < 1:
            msg = f"threads must be at least 1, got {threads}"
            raise ValueError(msg)
        if not 0.0 <= min_score <= 1.0:
            msg = f"min_score must be in 0..1, got {min_score}"
            raise ValueError(msg)
        if max_side < _DET_STRIDE:
            msg = f"max_side must be at least {_DET_STRIDE} pixels, got {max_side}"
            raise ValueError(msg)
        if single_line_aspect <= 0:
            msg = f"single_line_aspect must be positive, got {single_line_aspect}"
            raise ValueError(msg)
        if workers < 1:
            msg = f"workers must be at least 1, got {workers}"
            raise ValueError(msg)
        if max_detect_pixels < _DET_STRIDE * _DET_STRIDE:
            msg = f"max_detect_pixels must be at least {_DET_STRIDE**2}, got {max_detect_pixels}"
            raise ValueError(msg)
        cores = os.cpu_count() or 1
        if threads > cores:
            logger.warning(
                "OCR threads %d exceed the %d CPU cores; using %d", threads, cores, cores
            )
            threads = cores
        self.threads = threads
        self.use_angle_classifier = use_angle_classifier
        self.min_score = min_score
        self.max_side = max_side
        self.single_line_aspect = single_line_aspect
        self.max_detect_pixels = max_detect_pixels
        self.rewrite_models = rewrite_models
        self.workers = workers
        self._calls: ModelCalls | None = None
        #: Whether the loaded engine runs the rewritten models (set when the engine loads).
        self.models_rewritten = False
        self._engine: Any = None
        self._engine_lock = threading.Lock()
        self._detect_budget = PixelBudget(round(max_detect_pixels * _DETECT_BUDGET_SHARE))

    @property
    def engine(self) -> Any:
        """The ``rapidocr_onnxruntime.RapidOCR`` instance, created on first use."""
        if self._engine is None:
            with self._engine_lock:
                if self._engine is None:
                    self._engine = self._create_engine()
        return self._engine

    def _create_engine(self) -> Any:
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as exc:
            msg = f"cannot import rapidocr_onnxruntime ({exc}): install rapidocr-onnxruntime"
            raise ReaderError(msg) from exc
        logger.info(
            "loading OCR models (threads=%d, angle classifier=%s)",
            self.threads,
            self.use_angle_classifier,
        )
        # Only the sessions, the models and the post-processing objects of RapidOCR are used.
        # The detection limits below matter only when the engine is called directly.
        engine = RapidOCR(
            intra_op_num_threads=self.threads,
            inter_op_num_threads=1,
            use_cls=self.use_angle_classifier,
            text_score=self.min_score,
            det_limit_type="max",
            det_limit_side_len=self.max_side,
            max_side_len=self.max_side,
        )
        if self.rewrite_models:
            self._use_rewritten_models(engine)
        logger.info(
            "OCR models loaded (%s)",
            "rewritten graphs" if self.models_rewritten else "rapidocr's original graphs",
        )
        return engine

    def _use_rewritten_models(self, engine: Any) -> None:
        """Replace rapidocr's onnxruntime sessions with ones on rewritten graphs.

        See :mod:`edge.readers.graph`. Without the rewrite, on x86-64 with one thread,
        recognition of a 48 x 320 line took 19.9 ms instead of 15.8 ms, and detection on
        640 x 480 pixels took 82 ms instead of 72 ms. If any step fails, all of rapidocr's
        sessions stay in use.
        """
        try:
            sessions = self._rewritten_sessions(engine)
        # onnxruntime's errors (InvalidProtobuf, Fail, ...) derive from Exception directly,
        # and any failure here only costs speed.
        except Exception as exc:
            logger.warning("OCR model rewrite failed (%s); using the original models", exc)
            return
        if sessions is None:
            return
        for holder, session in sessions:
            holder.session = session
        self.models_rewritten = True

    def _rewritten_sessions(self, engine: Any) -> list[tuple[Any, Any]] | None:
        """Build a session on the rewritten graph for each model the reader uses.

        Returns:
            Pairs of rapidocr's session holder and its new session, or ``None`` when the
            rewrite failed (which :func:`rewritten_models` logs).
        """
        from rapidocr_onnxruntime.main import DEFAULT_CFG_PATH
        from rapidocr_onnxruntime.utils import read_yaml
        from rapidocr_onnxruntime.utils.parse_parameters import update_model_path

        paths = update_model_path(read_yaml(str(DEFAULT_CFG_PATH)))
        holders = {"Det": engine.text_det.infer, "Rec": engine.text_rec.session}
        if self.use_angle_classifier:
            holders["Cls"] = engine.text_cls.infer
        options = ort.SessionOptions()
        options.enable_cpu_mem_arena = False
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        # With threads above 1, spinning pool threads would take cores from concurrent reads.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sources = [Path(paths[key]["model_path"]) for key in holders]
        # onnxruntime has read a model file completely once its session exists.
        with tempfile.TemporaryDirectory(prefix="edge-ocr-models-") as folder:
            models = rewritten_models(sources, Path(folder))
            if models is None:
                return None
            return [
                (holder, ort.InferenceSession(str(model), options, ["CPUExecutionProvider"]))
                for holder, model in zip(holders.values(), models, strict=True)
            ]

    def warm_up(self) -> None:
        """Load the models and run detection and recognition once on blank images."""
        self.read(np.full((96, 96, 3), 255, dtype=np.uint8))
        self._recognise([np.full((_REC_HEIGHT, 320, 3), 255, dtype=np.uint8)], None)

    def close(self) -> None:
        """Drop the engine and the model-run threads; the next read creates them again."""
        with self._engine_lock:
            self._engine = None
            self.models_rewritten = False
            calls, self._calls = self._calls, None
        if calls is not None:
            calls.close()

    def read(self, image: Image, cancellation: Cancellation | None = None) -> Reading:
        """Read the text lines of an image, in reading order, with boxes in its pixels.

        Accepts H x W x 3 BGR, H x W x 4 BGRA or H x W grey uint8 images. Cancelling
        ``cancellation`` terminates the running onnxruntime call (``RunOptions.terminate``)
        and skips the remaining ones.

        Raises:
            ImageError: If the image has an unsupported dtype or shape.
            ReaderError: If rapidocr cannot be loaded.
            ReadCancelled: If ``cancellation`` was cancelled before the read finished.
        """
        bgr = _to_bgr(image)
        height, width = bgr.shape[:2]
        if min(height, width) < _MIN_TEXT_SIDE:
            return Reading()

        scale = min(1.0, self.max_side / max(height, width))
        work = bgr
        if scale < 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            work = _u8(cv2.resize(bgr, size, interpolation=cv2.INTER_AREA))

        try:
            if self.is_single_line(work):
                lines = self._recognise_whole(work, cancellation)
            else:
                lines = self._detect_and_recognise(work, cancellation)
        finally:
            # glibc keeps what onnxruntime freed in the heaps of the threads that ran the
            # models, so concurrent reads would otherwise add up their peaks.
            trim_heap()

        result = []
        for text, score, points in lines:
            if score < self.min_score or not text.strip():
                continue
            box = _clamped_box(points / scale, width, height)
            result.append(TextLine(text=text, score=min(max(score, 0.0), 1.0), box=box))
        return Reading(lines=tuple(result))

    def is_single_line(self, image: Image) -> bool:
        """Return whether an image goes to the recogniser without text detection."""
        height, width = image.shape[:2]
        if height < _MIN_DETECT_HEIGHT:
            return True
        if width / height < self.single_line_aspect:
            return False
        # Leaving out ink at the edge also drops a line of print that the crop cuts, so both
        # counts must show one band.
        bands = max(_count_ink_bands(image), _count_ink_bands(image, skip_border=True))
        return bands <= 1

    def _recognise_whole(
        self, image: Image, cancellation: Cancellation | None
    ) -> list[tuple[str, float, FloatArray]]:
        height, width = image.shape[:2]
        crops = [image]
        if self.use_angle_classifier:
            crops, _, _ = self.engine.text_cls(crops)
        (text, score), *_ = self._recognise(crops, cancellation)
        corners = np.array([[0, 0], [width, 0], [width, height], [0, height]], dtype=np.float32)
        return [(text, score, corners)]

    def _detect_and_recognise(
        self, image: Image, cancellation: Cancellation | None
    ) -> list[tuple[str, float, FloatArray]]:
        padded = _pad_with_background(image, _DET_PAD)
        boxes = _join_split_lines(
            self._detect(padded, cancellation), self.engine.text_det.postprocess_op.get_mini_boxes
        )
        # Detection's buffers are the largest of the read, so hand them back before the
        # recognition runs.
        trim_heap()
        if not boxes:
            return []
        crops = self.engine.get_crop_img_list(padded, boxes)
        if self.use_angle_classifier:
            crops, _, _ = self.engine.text_cls(crops)
        recognised = self._recognise(crops, cancellation)
        return [
            (text, score, box - _DET_PAD)
            for (text, score), box in zip(recognised, boxes, strict=True)
        ]

    def _detect(self, image: Image, cancellation: Cancellation | None) -> list[FloatArray]:
        """Run the DB text detector and return line boxes in the image's pixels.

        An image of at most ``max_detect_pixels`` pixels is first detected at
        ``_COARSE_SCALE`` times its size (see :meth:`_detect_coarse`). If those lines may be
        wrong, it is detected whole at its own size. If no line was found there, or more than
        ``_MAX_UNBOXED_SHARE`` of the text pixels of its probability map lie outside the
        lines, it is detected again at ``_RETRY_SCALE`` times its size when that fits in
        ``max_detect_pixels``, and the lines found there are kept if there are more of them.
        A larger one is first detected downscaled to about ``max_detect_pixels``. When the
        lines found there are small (median box height under ``_WHOLE_SMALL_LINE_ROWS``
        detector rows, as on a receipt scan), small print may have been lost, so the image is
        detected again at full resolution in horizontal strips of at most
        ``max_detect_pixels`` detector pixels each, which keeps memory bounded. Strips
        overlap by ``_STRIP_OVERLAP`` rows; an image too wide for strips of
        ``_MIN_STRIP_ROWS`` rows is downscaled until it fits. Detector input sides are
        rounded to multiples of 32.
        """
        height, width = image.shape[:2]
        if height * width <= self.max_detect_pixels:
            coarse = self._detect_coarse(image, cancellation)
            if coarse is not None:
                return _reading_order(coarse)
            prediction = self._predict(image, 1.0, cancellation)
            boxes = self._boxes(prediction, height, width)
            upscaled_pixels = height * width * _RETRY_SCALE**2
            if upscaled_pixels <= self.max_detect_pixels and (
                not boxes or self._missed_lines(prediction, boxes, (height, width))
            ):
                upscaled = self._detect_part(image, _RETRY_SCALE, cancellation)
                # NOTE: the count of boxes is a proxy. A pass at 2x that splits lines into more
                # boxes wins even if it misses a line found at full size.
                if len(upscaled) > len(boxes):
                    boxes = upscaled
            return _reading_order(boxes)
        whole_scale = math.sqrt(self.max_detect_pixels / (height * width))
        first = self._detect_part(image, whole_scale, cancellation)
        trim_heap()
        heights = [float(np.ptp(box[:, 1])) * whole_scale for box in first]
        if not first or float(np.median(heights)) >= _WHOLE_SMALL_LINE_ROWS:
            return _reading_order(first)
        scale = min(1.0, self.max_detect_pixels / (width * _MIN_STRIP_ROWS))
        det_width = max(_DET_STRIDE, round(width * scale / _DET_STRIDE) * _DET_STRIDE)
        det_rows = self.max_detect_pixels // det_width // _DET_STRIDE * _DET_STRIDE
        # Strips must see the print larger than the first pass did, and move down the image.
        if scale <= whole_scale or det_rows <= _STRIP_OVERLAP + 2 * _STRIP_EDGE_MARGIN:
            return _reading_order(first)
        rows = math.floor(det_rows / scale)
        overlap = math.ceil(_STRIP_OVERLAP / scale)
        margin = _STRIP_EDGE_MARGIN / scale
        strips: list[tuple[list[FloatArray], list[FloatArray]]] = []
        top = 0
        while True:
            bottom = min(height, top + rows)
            part = self._detect_part(image[top:bottom], scale, cancellation)
            # The strips may run on different threads: without a trim, each heap they use
            # would keep the buffers of a whole detection.
            trim_heap()
            whole: list[FloatArray] = []
            cut: list[FloatArray] = []
            for box in part:
                box[:, 1] += top
                touches_top = top > 0 and box[:, 1].min() <= top + margin
                touches_bottom = bottom < height and box[:, 1].max() >= bottom - margin
                (cut if touches_top or touches_bottom else whole).append(box)
            strips.append((whole, cut))
            if bottom == height:
                return _reading_order(_join_strips(strips))
            top = bottom - overlap

    def _detect_coarse(
        self, image: Image, cancellation: Cancellation | None
    ) -> list[FloatArray] | None:
        """Detect lines at ``_COARSE_SCALE``; return them, or ``None`` if they may be wrong.

        They are kept when the median line height is at least ``_SMALL_LINE_ROWS`` detector
        rows, the boxes cover the text the detector saw, and no box looks like two merged
        lines. At most ``_MAX_UNBOXED_SHARE`` of the text pixels of the detector's
        probability map may lie outside every box. A larger share means that lines too faint
        or small at this scale got no box. The crop of each box may show at most one band of
        ink rows at least ``_MERGED_BAND_SHARE`` of its height. Returns ``None`` without a
        detection for an input too small to downscale or larger than ``_MAX_COARSE_PIXELS``.

        NOTE: a line that leaves no trace in the probability map at this scale is still lost.
        """
        height, width = image.shape[:2]
        if min(height, width) * _COARSE_SCALE < _MIN_COARSE_SIDE:
            return None
        if height * width > _MAX_COARSE_PIXELS:
            return None
        prediction = self._predict(image, _COARSE_SCALE, cancellation)
        boxes = self._boxes(prediction, height, width)
        if not boxes:
            return None
        # Each side was rounded to a multiple of 32, so the real scale differs from 0.6.
        rows_per_pixel = _detector_size(height, width, _COARSE_SCALE)[0] / height
        heights = [_line_height(box) * rows_per_pixel for box in boxes]
        if float(np.median(heights)) < _SMALL_LINE_ROWS:
            return None
        if self._missed_lines(prediction, boxes, (height, width)):
            return None
        crops = self.engine.get_crop_img_list(image, boxes)
        if any(_count_ink_bands(crop, _MERGED_BAND_SHARE) > 1 for crop in crops):
            return None
        return boxes

    def _missed_lines(
        self, prediction: FloatArray, boxes: Sequence[FloatArray], size: tuple[int, int]
    ) -> bool:
        """Return whether lines of a probability map may have got no box.

        That is when more than ``_MAX_UNBOXED_SHARE`` of the map's text pixels (probability
        above DB's threshold) lie outside every box: lines too faint or small at the map's
        scale. ``boxes`` are in pixels of an image of ``size`` (height, width).
        """
        threshold = float(self.engine.text_det.postprocess_op.thresh)
        return _unboxed_share(prediction[0, 0], boxes, size, threshold) > _MAX_UNBOXED_SHARE

    def _detect_part(
        self, image: Image, scale: float, cancellation: Cancellation | None
    ) -> list[FloatArray]:
        """Detect lines in an image scaled by ``scale``; boxes come in the image's pixels."""
        height, width = image.shape[:2]
        return self._boxes(self._predict(image, scale, cancellation), height, width)

    def _predict(self, image: Image, scale: float, cancellation: Cancellation | None) -> FloatArray:
        """Run the DB detector on an image scaled by ``scale``; return its probability map."""
        height, width = image.shape[:2]
        det_height, det_width = _detector_size(height, width, scale)
        interpolation = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
        resized = cv2.resize(image, (det_width, det_height), interpolation=interpolation)
        tensor = (resized.astype(np.float32) / 255.0 - _NORM_MEAN) / _NORM_STD
        tensor = tensor.transpose(2, 0, 1)[np.newaxis]
        session = self.engine.text_det.infer.session

        def run() -> FloatArray:
            with self._detect_budget.reserve(det_height * det_width, cancellation):
                return np.asarray(
                    _run(session, np.ascontiguousarray(tensor), cancellation), dtype=np.float32
                )

        (prediction,) = self._run_all([run])
        return prediction

    def _boxes(self, prediction: FloatArray, height: int, width: int) -> list[FloatArray]:
        """Return the line boxes of a probability map, in pixels of a height x width image."""
        detector = self.engine.text_det
        boxes, _ = detector.postprocess_op(prediction, (height, width))
        if len(boxes) == 0:
            return []
        kept = detector.filter_tag_det_res(boxes, (height, width))
        return [np.array(box, dtype=np.float32) for box in kept]

    def _recognise(
        self, crops: Sequence[Image], cancellation: Cancellation | None
    ) -> list[tuple[str, float]]:
        """Recognise each line crop on its own, at its own width (see the module docstring)."""
        recogniser = self.engine.text_rec

        def recognise(crop: Image) -> tuple[str, float]:
            prediction = _run(recogniser.session.session, _rec_tensor(crop), cancellation)
            (text, score), *_ = recogniser.postprocess_op(prediction)
            return str(text), float(score)

        return self._run_all([functools.partial(recognise, crop) for crop in crops])

    def _run_all(self, calls: Sequence[Callable[[], _Result]]) -> list[_Result]:
        """Run model calls, on the shared worker threads when there are several workers."""
        if self.workers == 1:
            return [call() for call in calls]
        with self._engine_lock:
            if self._calls is None:
                self._calls = ModelCalls(self.workers)
            shared = self._calls
        return shared.run(calls)

    def __repr__(self) -> str:
        return (
            f"TextReader(threads={self.threads}, "
            f"use_angle_classifier={self.use_angle_classifier}, min_score={self.min_score}, "
            f"max_side={self.max_side}, single_line_aspect={self.single_line_aspect}, "
            f"max_detect_pixels={self.max_detect_pixels}, "
            f"rewrite_models={self.rewrite_models})"
        )


class ModelCalls:
    """Worker threads that run the model calls of concurrent reads, taking turns between reads.

    Each read hands over its calls (one detection, or one call per line) and waits for their
    results. The workers take one call at a time from the reads in turn. Each of at most
    ``workers`` concurrent reads so gets at least one worker's share, as if it ran alone in
    its own thread. A read left alone at the end of a frame gets every worker. Calls of one
    read never wait behind all the calls of another, so one read's timeout stays its own.
    """

    def __init__(self, workers: int) -> None:
        self._workers = workers
        self._condition = threading.Condition()
        # Pending calls per read, in the order the workers serve the reads.
        self._pending: collections.OrderedDict[
            int, collections.deque[tuple[concurrent.futures.Future[Any], Callable[[], Any]]]
        ] = collections.OrderedDict()
        self._threads: list[threading.Thread] = []
        self._closed = False

    def run(self, calls: Sequence[Callable[[], _Result]]) -> list[_Result]:
        """Run ``calls`` on the workers and return their results in order.

        When a call raises, the calls that no worker has taken yet are dropped, and the first
        exception in call order is raised once the started calls have ended.

        Raises:
            ReaderError: If :meth:`close` was called before or during the run.
        """
        futures: list[concurrent.futures.Future[Any]] = [concurrent.futures.Future() for _ in calls]
        key = id(futures)
        with self._condition:
            if self._closed:
                msg = "text reader was closed; create or warm up the reader again"
                raise ReaderError(msg)
            self._pending[key] = collections.deque(zip(futures, calls, strict=True))
            self._start_workers()
            self._condition.notify_all()
        try:
            return [future.result() for future in futures]
        finally:
            with self._condition:
                not_taken = self._pending.pop(key, ())
            # Calls no worker took are this read's to drop. A worker that took one notices
            # the cancellation itself when it is about to start it.
            for future, _ in not_taken:
                future.cancel()
                future.set_running_or_notify_cancel()
            for future in futures:
                future.cancel()
            concurrent.futures.wait(futures)

    def close(self) -> None:
        """Stop the workers once their running calls end; fail the calls not yet started."""
        with self._condition:
            self._closed = True
            pending = [future for queue in self._pending.values() for future, _ in queue]
            self._pending.clear()
            self._condition.notify_all()
        for future in pending:
            if future.set_running_or_notify_cancel():
                msg = "text reader was closed while this read waited for a model call"
                future.set_exception(ReaderError(msg))

    def _start_workers(self) -> None:
        while len(self._threads) < self._workers:
            thread = threading.Thread(
                target=self._work, name=f"edge-ocr-{len(self._threads)}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def _work(self) -> None:
        while True:
            with self._condition:
                while not self._closed and not any(self._pending.values()):
                    self._condition.wait()
                if self._closed:
                    return
                key = next(key for key, queue in self._pending.items() if queue)
                future, call = self._pending[key].popleft()
                # The next call goes to the next read in turn.
                self._pending.move_to_end(key)
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = call()
            except BaseException as exc:
                # The read's queued calls are dropped first, so no worker starts one of them
                # before the read wakes up. The exception is raised again in the read.
                self._drop(key)
                future.set_exception(exc)
            else:
                future.set_result(result)

    def _drop(self, key: int) -> None:
        """Cancel the calls of one read that no worker has taken yet."""
        with self._condition:
            queue = self._pending.get(key)
            dropped = list(queue) if queue else []
            if queue:
                queue.clear()
        for future, _ in dropped:
            future.cancel()
            future.set_running_or_notify_cancel()


class PixelBudget:
    """Budget of pixels that concurrent text detections may process at once.

    The text detector's temporary memory grows with its input's pixel count. On the 134
    corpus images (receipt scans up to 2481 x 993), the daemon's main process peaked at
    428 MB when two reads could detect at ``max_detect_pixels`` at the same time, and at
    341 MB with a budget of ``max_detect_pixels``. The reader's budget is 1.5 times that.
    A reservation larger than the whole budget is lowered to it, so it runs alone rather
    than waiting forever. Reservations are granted in arrival order, so small ones cannot
    keep a large one waiting. Thread-safe.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            msg = f"pixel budget must be at least 1, got {capacity}"
            raise ValueError(msg)
        self.capacity = capacity
        self._in_use = 0
        self._queue: collections.deque[object] = collections.deque()
        # Reentrant, because a cancellation that is already set calls _wake at once from
        # inside reserve(), which holds the lock.
        self._changed = threading.Condition(threading.RLock())

    @property
    def in_use(self) -> int:
        """Pixels reserved by the detections running now."""
        return self._in_use

    @contextlib.contextmanager
    def reserve(self, pixels: int, cancellation: Cancellation | None = None) -> Iterator[None]:
        """Hold ``pixels`` of the budget while the block runs, waiting until they are free.

        Raises:
            ReadCancelled: If ``cancellation`` is cancelled before the pixels are free.
        """
        pixels = max(1, min(pixels, self.capacity))
        ticket = object()
        registration = (
            cancellation.registered(self._wake) if cancellation else contextlib.nullcontext()
        )
        with self._changed, registration:
            self._queue.append(ticket)
            try:
                while self._queue[0] is not ticket or (
                    self._in_use and self._in_use + pixels > self.capacity
                ):
                    if cancellation is not None:
                        cancellation.raise_if_cancelled()
                    self._changed.wait()
                if cancellation is not None:
                    cancellation.raise_if_cancelled()
            finally:
                self._queue.remove(ticket)
                # The next reservation in line may fit now, or may now be first.
                self._changed.notify_all()
            self._in_use += pixels
        try:
            yield
        finally:
            with self._changed:
                self._in_use -= pixels
                self._changed.notify_all()

    def _wake(self) -> None:
        with self._changed:
            self._changed.notify_all()


def _run(session: Any, tensor: FloatArray, cancellation: Cancellation | None) -> Any:
    """Run a one-input onnxruntime session and return its first output.

    With a ``cancellation``, the run is terminated when it is cancelled.
    """
    feed = {session.get_inputs()[0].name: tensor}
    if cancellation is None:
        return session.run(None, feed)[0]
    cancellation.raise_if_cancelled()
    options = ort.RunOptions()

    def terminate() -> None:
        options.terminate = True

    with cancellation.registered(terminate):
        try:
            return session.run(None, feed, options)[0]
        except Exception as exc:
            # onnxruntime raises its generic Fail error when the terminate flag stops a run.
            if cancellation.cancelled:
                msg = "read cancelled during an onnxruntime run"
                raise ReadCancelled(msg) from exc
            raise


def _rec_tensor(crop: Image) -> FloatArray:
    """Scale a line crop to the recogniser's height and pad its width with zeros (mid-grey)."""
    height, width = crop.shape[:2]
    resized_width = max(1, math.ceil(_REC_HEIGHT * width / height))
    padded_width = math.ceil((resized_width + _REC_TAIL) / _REC_WIDTH_STEP) * _REC_WIDTH_STEP
    padded_width = max(padded_width, _REC_MIN_WIDTH)
    resized = cv2.resize(crop, (resized_width, _REC_HEIGHT)).astype(np.float32)
    tensor = np.zeros((1, 3, _REC_HEIGHT, padded_width), dtype=np.float32)
    tensor[0, :, :, :resized_width] = ((resized / 255.0 - _NORM_MEAN) / _NORM_STD).transpose(
        2, 0, 1
    )
    return tensor


def _u8(array: Any) -> Image:
    """Type an OpenCV result as :data:`Image` without copying a uint8 array."""
    return np.asarray(array, dtype=np.uint8)


def _to_bgr(image: Image) -> Image:
    if image.dtype != np.uint8:
        msg = f"text reader needs a uint8 image, got dtype {image.dtype}: convert it first"
        raise ImageError(msg)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return _u8(cv2.cvtColor(image, cv2.COLOR_GRAY2BGR))
    if image.ndim == 3 and image.shape[2] == 4:
        return _u8(cv2.cvtColor(image, cv2.COLOR_BGRA2BGR))
    if image.ndim == 3 and image.shape[2] == 3:
        return np.ascontiguousarray(image)
    msg = f"text reader needs an H x W grey, BGR or BGRA image, got shape {image.shape}"
    raise ImageError(msg)


def _pad_with_background(image: Image, pad: int) -> Image:
    """Add a margin filled with the median colour of the image's outer rows and columns."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    colour = [int(value) for value in np.median(border, axis=0)]
    return _u8(cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=colour))


def _count_ink_bands(image: Image, min_share: float = 0.0, *, skip_border: bool = False) -> int:
    """Count horizontal bands of ink rows separated by blank rows, after an Otsu threshold.

    Ink is taken to be the minority class, so dark-on-light and light-on-dark both work.
    Bands of fewer than ``min_share`` times the image's rows are not counted. With
    ``skip_border``, ink that touches the image's edge is left out: around a tilted label,
    a region's crop takes in background that falls in the ink class with the print and
    reaches into every row, so that two lines would count as one band.
    """
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    _, binary = cv2.threshold(grey, 0, 1, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    if binary.mean() > 0.5:
        binary = 1 - binary
    if skip_border:
        _, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
        left, top = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
        right = left + stats[:, cv2.CC_STAT_WIDTH]
        bottom = top + stats[:, cv2.CC_STAT_HEIGHT]
        height, width = binary.shape
        border = (left == 0) | (top == 0) | (right == width) | (bottom == height)
        # Label 0 is the pixels outside the ink class.
        border[0] = True
        binary = np.where(border[labels], 0, binary).astype(np.uint8)
    ink_rows = binary.mean(axis=1) >= _INK_ROW_SHARE
    # Each band starts and ends where the row flags change, with blank rows added around.
    edges = np.flatnonzero(np.diff(np.concatenate([[False], ink_rows, [False]])))
    lengths = edges[1::2] - edges[::2]
    return int(np.count_nonzero(lengths >= min_share * len(ink_rows)))


def _unboxed_share(
    probability: FloatArray, boxes: Sequence[FloatArray], size: tuple[int, int], threshold: float
) -> float:
    """Return the share of text pixels of a probability map that lie outside every box.

    Text pixels are those above ``threshold``. ``boxes`` are in pixels of an image of ``size``
    (height, width), which the map covers whole at its own resolution.
    """
    text = probability > threshold
    total = int(np.count_nonzero(text))
    if total == 0:
        return 0.0
    rows, columns = probability.shape
    scale = np.array([columns / size[1], rows / size[0]], dtype=np.float32)
    covered = np.zeros((rows, columns), dtype=np.uint8)
    polygons = [np.round(box * scale).astype(np.int32) for box in boxes]
    cv2.fillPoly(covered, polygons, 1)
    # One pixel more around each box, for the rounding of its corners.
    grown = cv2.dilate(covered, np.ones((3, 3), dtype=np.uint8))
    return int(np.count_nonzero(text & (grown == 0))) / total


def _detector_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """Return the detector input size of an image scaled by ``scale``: multiples of 32."""
    det_height = max(_DET_STRIDE, round(height * scale / _DET_STRIDE) * _DET_STRIDE)
    det_width = max(_DET_STRIDE, round(width * scale / _DET_STRIDE) * _DET_STRIDE)
    return det_height, det_width


def _line_height(box: FloatArray) -> float:
    """Return the height of a line box: the mean length of its two shorter opposite sides."""
    sides = np.linalg.norm(box - np.roll(box, -1, axis=0), axis=1)
    return float(min(sides[0] + sides[2], sides[1] + sides[3]) / 2)


def _join_strips(strips: Sequence[tuple[list[FloatArray], list[FloatArray]]]) -> list[FloatArray]:
    """Combine the line boxes of overlapping detection strips into one box per line.

    ``strips`` holds, for each strip from the top, its boxes clear of the strip's inner
    edges (whole) and its boxes that touch one (cut). A line inside the overlap of two
    neighbouring strips is whole in both: the lower strip's copy is dropped when it and a
    box of the strip above cover half of the smaller one. A cut box is kept only when no
    whole box of a neighbouring strip covers half of it, which happens for lines taller
    than the overlap. Boxes of the same strip are never compared.
    """
    lines: list[tuple[int, FloatArray]] = []
    for index, (whole, _) in enumerate(strips):
        for box in whole:
            if not any(
                strip == index - 1 and _overlap_share(box, other) >= 0.5 for strip, other in lines
            ):
                lines.append((index, box))
    pieces = [
        box
        for index, (_, cut) in enumerate(strips)
        for box in cut
        if not any(
            abs(strip - index) == 1 and _overlap_share(box, other) >= 0.5 for strip, other in lines
        )
    ]
    return [box for _, box in lines] + pieces


def _overlap_share(box: FloatArray, other: FloatArray) -> float:
    """Return the area two convex quadrilaterals share, over the smaller one's area."""
    smaller = min(cv2.contourArea(box), cv2.contourArea(other))
    if smaller <= 0:
        return 0.0
    shared, _ = cv2.intersectConvexConvex(box, other)
    return float(shared) / float(smaller)


def _join_split_lines(
    boxes: list[FloatArray], enclosing_box: Callable[[Any], tuple[Any, float]]
) -> list[FloatArray]:
    """Join neighbouring boxes of one line that the detector split apart.

    In small print the DB detector often splits a line at a narrow gap, such as the point of
    a price ("17" and "87"), and each part alone is read as a short, padded line. Two boxes
    next to each other in reading order become one under three conditions. The shorter
    box is at least ``_JOIN_HEIGHT_RATIO`` times as high as the other. They overlap vertically
    by at least that share of the shorter box's height. The gap between them is at most
    ``_JOIN_GAP`` times that height. The joined box is the smallest rotated rectangle
    around both (``enclosing_box`` is rapidocr's ``get_mini_boxes``), so tilted lines stay
    tight.
    """
    joined: list[FloatArray] = []
    for box in boxes:
        if joined:
            left, top = joined[-1].min(axis=0)
            right, bottom = joined[-1].max(axis=0)
            next_left, next_top = box.min(axis=0)
            next_bottom = box[:, 1].max()
            shorter = min(bottom - top, next_bottom - next_top)
            taller = max(bottom - top, next_bottom - next_top)
            overlap = min(bottom, next_bottom) - max(top, next_top)
            gap = next_left - right
            if (
                shorter >= _JOIN_HEIGHT_RATIO * taller
                and overlap >= _JOIN_HEIGHT_RATIO * shorter
                and -_JOIN_GAP * shorter <= gap <= _JOIN_GAP * shorter
                and next_left > left
            ):
                points = np.concatenate([joined[-1], box]).reshape(-1, 1, 2)
                enclosing, _ = enclosing_box(points.astype(np.float32))
                joined[-1] = np.asarray(enclosing, dtype=np.float32)
                continue
        joined.append(box)
    return joined


def _reading_order(boxes: list[FloatArray]) -> list[FloatArray]:
    """Sort quadrilaterals top to bottom, and left to right within a line.

    Boxes whose vertical centres lie within half the smaller box height of a line's first
    box belong to that line.
    """
    by_top = sorted(boxes, key=lambda box: float(box[:, 1].min()))
    rows: list[list[FloatArray]] = []
    for box in by_top:
        centre = float(box[:, 1].mean())
        height = float(np.ptp(box[:, 1]))
        if rows:
            first = rows[-1][0]
            tolerance = min(height, float(np.ptp(first[:, 1]))) / 2
            if abs(centre - float(first[:, 1].mean())) <= tolerance:
                rows[-1].append(box)
                continue
        rows.append([box])
    return [box for row in rows for box in sorted(row, key=lambda box: float(box[:, 0].min()))]


def _clamped_box(points: FloatArray, width: int, height: int) -> Box:
    left = int(np.clip(np.floor(points[:, 0].min()), 0, width))
    top = int(np.clip(np.floor(points[:, 1].min()), 0, height))
    right = int(np.clip(np.ceil(points[:, 0].max()), left, width))
    bottom = int(np.clip(np.ceil(points[:, 1].max()), top, height))
    return Box(left, top, right - left, bottom - top)
