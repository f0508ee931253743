"""Frame to frame result: detect regions, read each one under the WaitGroup, collect outcomes.

Detection runs on a dedicated single-thread executor, because one onnxruntime session already
uses the cores it is given. Region reads are WaitGroup operations: thread kind for readers that
release the GIL (OCR), process kind for readers that may crash or hang (zbar). One reusable
group serves every frame and bounds the reads of all frames together. A read that overruns
``op_timeout`` costs its own region only, and each frame's reads end at its frame deadline.

A frame goes through two stages, :meth:`Pipeline.detect` and :meth:`Pipeline.read`. Read stages
start in the order they were called: a frame's reads take the group's slots once every
region read of the previous frame has started. So the next frame's reads fill the slots that the
previous frame's last reads leave free, and a caller may detect the next frame meanwhile.
:meth:`Pipeline.stream` drives frames that way.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import logging
import re
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

import numpy as np

from edge.errors import ImageError, ModelError
from edge.images import to_bgr8
from edge.memory import trim_heap
from edge.readers.base import Cancellation, OpKind, Reader
from edge.results import (
    Box,
    Code,
    Frame,
    FrameResult,
    Image,
    Origin,
    Reading,
    Region,
    RegionResult,
    RegionStatus,
    TextLine,
)
from edge.reuse import CachedRead, ReuseCache, Signature, frame_signature, signature
from edge.waitgroup import Limiter, OpHandle, OpResult, Outcome, WaitGroup

logger = logging.getLogger(__name__)

# After a document frame, the next frame of the same stream and size is a document until its
# text boxes cover less than this share of document_share. Boxes shift a little from frame to
# frame, so with one limit the text of a frame near it would be read as one region, then as
# several, and each change defeats the reuse of unchanged regions.
# NOTE: 0.8 is a chosen margin, not a measured one: no camera's frame-to-frame box jitter
# has been measured.
_DOCUMENT_KEEP = 0.8
# The simulated camera names a video frame by the video's path, "#" and the frame's index.
_FRAME_INDEX = re.compile(r"#\d+$")
# Reuse cache key of the full-frame code decode. Its leading NUL sets it apart from the
# detector's class names.
_FULL_FRAME_KEY = "\0full frame"

FullFramePolicy = Literal["never", "always", "when_none_read"]

#: Boxes narrower or lower than this many pixels are rejected before any reader sees them.
MIN_REGION_SIDE = 4


class RegionDetector(Protocol):
    """Detector interface the pipeline uses."""

    def detect_counted(self, image: Image) -> tuple[list[Region], int]:
        """Return the regions found in a BGR frame and the count of boxes it discarded."""
        ...

    def close(self) -> None:
        """Release the model."""
        ...


@dataclass(frozen=True)
class PipelineOptions:
    """Settings of :class:`Pipeline`; see ``PipelineConfig`` for their meaning.

    Documents are off unless ``document_classes`` names the classes of text regions: the
    factory passes those routed to the ``text`` reader.
    """

    concurrency: int = 2
    op_timeout: float = 5.0
    frame_deadline: float = 10.0
    full_frame_codes: FullFramePolicy = "when_none_read"
    reuse_unchanged: bool = True
    code_workers: int = 1
    document_share: float = 0.0
    document_classes: frozenset[str] = frozenset()


@dataclass(frozen=True, eq=False)
class DetectedFrame:
    """A frame after detection, ready for :meth:`Pipeline.read`.

    Attributes:
        frame: The frame, its image converted to 8-bit BGR.
        regions: Regions accepted for reading.
        rejected: Detections dropped as degenerate or discarded by the detector.
        started: ``time.perf_counter()`` when the frame entered the pipeline.
        detected_at: ``time.perf_counter()`` when detection ended.
        document: The whole frame as one region of a document class, read in place of the
            regions of those classes. It is ``None`` unless they cover ``document_share`` of
            the frame.
        parts: The regions that ``document`` replaces.
    """

    frame: Frame
    regions: list[Region]
    rejected: int
    started: float
    detected_at: float
    document: Region | None = None
    parts: tuple[Region, ...] = ()


@dataclass(frozen=True, eq=False)
class FailedFrame:
    """A frame that :meth:`Pipeline.stream` could not process, with the error."""

    frame: Frame
    error: ImageError | ModelError


@dataclass(frozen=True, eq=False)
class _TakenFrame:
    """A frame taken by :meth:`Pipeline.stream`, detected or failed (neither after a stop)."""

    frame: Frame
    detected: DetectedFrame | None = None
    failure: FailedFrame | None = None


@dataclass(eq=False)
class _ReadTurn:
    """Progress of one frame's read stage, which the next frame's read stage waits on.

    Attributes:
        began: A read of the frame has a slot of the group, or the stage ended.
        started: Every region read of the frame has had a slot or missed the deadline, or
            the stage ended.
        settled: The stage submits no more reads: the full-frame decode that follows the
            code region reads is submitted or not needed, or the stage ended.
        ended: The stage ended.
    """

    began: asyncio.Event = field(default_factory=asyncio.Event)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(frozen=True, eq=False)
class _Reading:
    """A frame's read stage in :meth:`Pipeline.stream`."""

    seq: int
    task: asyncio.Task[FrameResult]
    turn: _ReadTurn
    dropped: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    def start(cls, pipeline: Pipeline, detected: DetectedFrame) -> _Reading:
        turn = _ReadTurn()
        name = f"edge.frame[{detected.frame.seq}]"
        task = asyncio.create_task(pipeline._read(detected, turn), name=name)
        return cls(detected.frame.seq, task, turn)

    def drop(self) -> None:
        """Cancel the stage; :meth:`result` then gives ``None``."""
        self.task.cancel()
        self.dropped.set()
        logger.info("frame %d dropped: the stop came before its reads began", self.seq)

    async def result(self) -> FrameResult | None:
        """Wait for the stage and return its result, ``None`` if it was dropped."""
        if self.dropped.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            return None
        return await self.task


class _WorkerSlots:
    """Slot limiter of reads in worker processes: a worker first, then a shared read slot."""

    def __init__(self, workers: Limiter, shared: Limiter) -> None:
        self._workers = workers
        self._shared = shared

    async def acquire(self) -> None:
        """Wait for a free worker, then for a shared slot, and take both."""
        await self._workers.acquire()
        try:
            await self._shared.acquire()
        except BaseException:
            self._workers.release()
            raise

    def acquire_nowait(self) -> bool:
        """Take a worker and a shared slot if both are free with no caller waiting."""
        if not self._workers.acquire_nowait():
            return False
        if not self._shared.acquire_nowait():
            self._workers.release()
            return False
        return True

    def release(self) -> None:
        """Return the shared slot and the worker."""
        self._shared.release()
        self._workers.release()


@dataclass(frozen=True, eq=False)
class _Job:
    """One region to read: the crop a reader gets and where it sits in the frame."""

    region: Region
    reader: Reader | None
    origin: Origin
    crop: Image | None = None
    offset: tuple[int, int] = (0, 0)
    signature: Signature | None = None
    reused: Reading | None = None
    #: The previous frame's read of the same pixels, still running when this job was made.
    pending: CachedRead | None = None


class Pipeline:
    """Turns frames into :class:`FrameResult` objects.

    Args:
        detector: Finds regions in a frame.
        routes: Detector class name to the reader of that class; regions of other classes
            are reported with no reader and status ``empty``.
        code_reader: Reader for the full-frame code decode (see ``full_frame_codes``), or
            ``None`` to never run it. Regions routed to a reader of the same ``name`` are
            the code regions of the ``when_none_read`` policy. Under that policy, a code
            region whose crop is the whole frame and reads nothing stands for the decode, so
            the routed reader must retry at least as much as this one.
        options: Concurrency, timeouts and the full-frame policy.
    """

    def __init__(
        self,
        detector: RegionDetector,
        routes: Mapping[str, Reader],
        *,
        code_reader: Reader | None = None,
        options: PipelineOptions | None = None,
    ) -> None:
        self._detector = detector
        self._routes = dict(routes)
        self._code_reader = code_reader
        self._options = options or PipelineOptions()
        self._detect_executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="edge-detector"
        )
        self._trim_executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="edge-trim"
        )
        self._trim: concurrent.futures.Future[bool] | None = None
        # Reads in worker processes have a group of their own, so that a read waiting for a
        # busy worker takes none of the slots that all reads share.
        slots = Limiter(self._options.concurrency)
        workers = min(self._options.code_workers or self._options.concurrency, slots.total)
        self._group = WaitGroup(
            limiter=slots,
            op_timeout=self._options.op_timeout,
            thread_workers=self._options.concurrency,
            name="edge.readers",
        )
        self._process_group = WaitGroup(
            limiter=_WorkerSlots(Limiter(workers), slots),
            op_timeout=self._options.op_timeout,
            process_workers=workers,
            name="edge.decoders",
        )
        self._reuse = ReuseCache() if self._options.reuse_unchanged else None
        # Stream and size of the last detected frame if it was a document (see _as_document).
        self._document: tuple[str, int, int] | None = None
        # Read stages share the group and the reuse cache, so each one begins once the
        # previous one has started all its reads.
        self._last_turn: _ReadTurn | None = None

    @property
    def group(self) -> WaitGroup:
        """The WaitGroup that runs region reads on threads (for statistics)."""
        return self._group

    @property
    def decoders(self) -> WaitGroup:
        """The WaitGroup that runs region reads in worker processes (for statistics)."""
        return self._process_group

    async def process(self, frame: Frame) -> FrameResult:
        """Detect and read every region of one frame: :meth:`detect`, then :meth:`read`.

        Raises:
            ImageError: The frame's shape or dtype cannot be converted.
            ModelError: The detector failed on this frame.
        """
        return await self.read(await self.detect(frame))

    async def stream(
        self, frames: AsyncIterable[Frame] | Iterable[Frame], *, stop: asyncio.Event | None = None
    ) -> AsyncGenerator[FrameResult | FailedFrame, None]:
        """Yield the result of every frame in order, detecting each while the previous is read.

        The next frame is taken from ``frames`` and detected while the current one is read.
        Its reads begin once every read of the current frame has started (see :meth:`read`),
        and the frame after it is taken once the current frame's reads end. So at most two
        frames are read at once, and no frame is taken while two are read. A result is
        yielded as soon as its reads end, even while the next frame is still awaited or
        detected.

        A frame that cannot be converted or detected yields a :class:`FailedFrame` and costs
        itself only. An error raised by ``frames`` propagates after the results in flight.
        Once ``stop`` is set, no frame is taken or detected, the wait for one is cut short,
        and a detected frame whose reads have not begun is dropped, so a stop waits for two
        frames' reads at most. Close the generator (``contextlib.aclosing``) to cancel the
        reads still in flight when leaving early. ``frames`` is not closed here, so an async
        generator there is the caller's to close.
        """
        source = aiter(frames) if isinstance(frames, AsyncIterable) else _from_iterable(frames)
        # Read stages in frame order: at most two, the oldest first.
        reading: collections.deque[_Reading] = collections.deque()
        incoming: asyncio.Task[_TakenFrame | None] | None = None
        stopped = asyncio.ensure_future(stop.wait()) if stop is not None else None
        if stopped is not None:
            stopped.add_done_callback(lambda _: _drop_unbegun(reading))

        async def finish_oldest() -> FrameResult | None:
            # The stage leaves the queue once it ended, so a stop never drops it.
            result = await reading[0].result()
            reading.popleft()
            return result

        try:
            while stopped is None or not stopped.done():
                incoming = asyncio.create_task(self._take(source, stop), name="edge.next-frame")
                while not incoming.done() and (stopped is None or not stopped.done()):
                    waiters: set[asyncio.Future[Any]] = {incoming}
                    if reading:
                        waiters.add(reading[0].task)
                    if stopped is not None:
                        waiters.add(stopped)
                    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                    while reading and reading[0].task.done():
                        if (result := await finish_oldest()) is not None:
                            yield result
                if not incoming.done():
                    # The stop came first, so the frame being taken or detected is dropped.
                    break
                try:
                    next_item = incoming.result()
                except Exception:
                    while reading:
                        if (result := await finish_oldest()) is not None:
                            yield result
                    raise
                finally:
                    incoming = None
                if next_item is None:
                    break
                if next_item.detected is not None and stopped is not None and stopped.done():
                    logger.info(
                        "frame %d dropped: the stop came before its reads began",
                        next_item.frame.seq,
                    )
                elif next_item.detected is not None:
                    reading.append(_Reading.start(self, next_item.detected))
                # The next frame is taken once the oldest frame's reads end, and a failed
                # frame is yielded after the frames before it.
                limit = 0 if next_item.failure is not None else 1
                while len(reading) > limit:
                    if (result := await finish_oldest()) is not None:
                        yield result
                if next_item.failure is not None:
                    yield next_item.failure
            while reading:
                if (result := await finish_oldest()) is not None:
                    yield result
        finally:
            for task in (incoming, *(r.task for r in reading), stopped):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    async def _take(
        self, source: AsyncIterator[Frame], stop: asyncio.Event | None
    ) -> _TakenFrame | None:
        """Take the next frame and detect it; ``None`` at the end of ``source``."""
        frame = await _next_frame(source)
        if frame is None:
            return None
        if stop is not None and stop.is_set():
            return _TakenFrame(frame)
        try:
            return _TakenFrame(frame, detected=await self.detect(frame))
        except (ImageError, ModelError) as exc:
            return _TakenFrame(frame, failure=FailedFrame(frame, exc))

    async def detect(self, frame: Frame) -> DetectedFrame:
        """Find the regions of one frame, to be read by :meth:`read`.

        Frames that are grey, BGRA, 16-bit, floating point (0..1) or not C-contiguous are
        converted to C-contiguous 8-bit BGR first.

        Raises:
            ImageError: The frame's shape or dtype cannot be converted, for example a
                channels-first array or an integer type other than uint8 and uint16.
            ModelError: The detector failed on this frame.
        """
        started = time.perf_counter()
        image = to_bgr8(frame.image)
        if image is not frame.image:
            frame = replace(frame, image=image)
        loop = asyncio.get_running_loop()
        detections, discarded = await loop.run_in_executor(
            self._detect_executor, self._detector.detect_counted, frame.image
        )
        detected_at = time.perf_counter()
        regions, rejected = _accept_regions(detections, frame.seq)
        regions, document, parts = self._as_document(frame, regions)
        return DetectedFrame(
            frame, regions, rejected + discarded, started, detected_at, document, parts
        )

    def _as_document(
        self, frame: Frame, regions: list[Region]
    ) -> tuple[list[Region], Region | None, tuple[Region, ...]]:
        """Replace the regions of document classes by the whole frame if they cover enough.

        Returns the regions left, the whole-frame region and the regions it replaces, or the
        regions unchanged, ``None`` and no parts. The whole-frame region takes the class and
        score of the highest-scoring region it replaces. After a document frame, the next
        frame of the same stream and size is a document while its text boxes cover at least
        ``_DOCUMENT_KEEP`` times ``document_share``. The stream is the frame's ``source``
        without a video frame's ``#`` index: a camera or a video is one stream, and each
        image file is one of its own. Frames with no ``source`` get no such margin.

        NOTE: the document is one read, so a read that times out loses all of its text. The
        read of a 2481x993 receipt took about 1 s on x86-64, and no slower board is measured.
        """
        share = self._options.document_share
        classes = self._options.document_classes & self._routes.keys()
        parts = tuple(r for r in regions if r.class_name in classes)
        key = None
        if frame.source is not None:
            key = (_FRAME_INDEX.sub("", frame.source), frame.width, frame.height)
        last, self._document = self._document, None
        if share <= 0 or not parts:
            return regions, None, ()
        covered = _union_area([r.box for r in parts]) / (frame.width * frame.height)
        keep = key is not None and key == last
        if covered < (share * _DOCUMENT_KEEP if keep else share):
            return regions, None, ()
        self._document = key
        best = max(parts, key=lambda region: region.score)
        document = Region(best.class_name, best.score, Box(0, 0, frame.width, frame.height))
        logger.debug(
            "frame %d: %d text regions cover %.0f%% of it, so it is read whole",
            frame.seq,
            len(parts),
            covered * 100,
        )
        return [r for r in regions if r.class_name not in classes], document, parts

    async def read(self, detected: DetectedFrame) -> FrameResult:
        """Read every region of a detected frame, after the frames whose reads began before.

        This frame's reads begin once every region read of the previous call has started.
        They take free slots of the group at once, and queue for one only behind the
        previous frame's reads, including its full-frame code decode. The frame deadline
        counts from that moment, not from the wait for the previous frame, which
        ``timings_ms["queue"]`` reports. A region whose pixels match one that the previous
        frame is still reading waits for that read and reuses its result, when
        ``reuse_unchanged`` is on.
        """
        return await self._read(detected, _ReadTurn())

    async def _read(self, detected: DetectedFrame, turn: _ReadTurn) -> FrameResult:
        previous, self._last_turn = self._last_turn, turn
        frame = detected.frame
        try:
            if previous is not None:
                await previous.started.wait()
            reading_at = time.perf_counter()
            results = await self._read_all(detected, turn, previous)
        finally:
            for event in (turn.began, turn.started, turn.settled, turn.ended):
                event.set()
        finished = time.perf_counter()
        # The frame's temporary buffers are freed by now. Without a trim, glibc keeps them and
        # resident memory stays at the largest frame's peak. A trim of a large, fragmented
        # heap took up to 160 ms, so it runs on a thread of its own and nothing waits for it.
        if self._trim is None or self._trim.done():
            # A read that ends while aclose() runs finds the trim thread shut down already.
            with contextlib.suppress(RuntimeError):
                self._trim = self._trim_executor.submit(trim_heap)
        return FrameResult(
            seq=frame.seq,
            captured_at=frame.captured_at,
            width=frame.width,
            height=frame.height,
            source=frame.source,
            regions=tuple(results),
            timings_ms={
                "detect": (detected.detected_at - detected.started) * 1000,
                "queue": (reading_at - detected.detected_at) * 1000,
                "read": (finished - reading_at) * 1000,
                "total": (finished - detected.started) * 1000,
            },
            rejected_regions=detected.rejected,
        )

    async def _read_all(
        self, detected: DetectedFrame, turn: _ReadTurn, previous: _ReadTurn | None
    ) -> list[RegionResult]:
        frame, regions = detected.frame, detected.regions
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._options.frame_deadline
        jobs = [self._job_for(frame, region) for region in regions]
        if detected.document is not None:
            jobs.append(self._document_job(frame, detected.document, detected.parts))
        if previous is not None and any(job.pending is not None for job in jobs):
            # The previous frame's reads of these pixels end before its entries are final.
            await self._until_ended(previous, deadline)
            jobs = [self._with_reuse(job) if job.pending is not None else job for job in jobs]
        policy = self._options.full_frame_codes
        code_name = self._code_reader.name if self._code_reader is not None else None
        code_classes = {c for c, r in self._routes.items() if r.name == code_name}
        has_code_region = any(r.class_name in code_classes for r in regions)
        code_jobs = [job for job in jobs if job.region.class_name in code_classes]
        # With no code region detected, the full-frame decode cannot be made redundant by a
        # region read, so it starts at once beside them instead of after them.
        early_fallback = self._code_reader is not None and (
            policy == "always" or (policy == "when_none_read" and not has_code_region)
        )
        # A full-frame decode follows the code region reads when none of them finds a code.
        late_fallback = (
            not early_fallback
            and policy == "when_none_read"
            and has_code_region
            and not any(job.reused is not None and job.reused.codes for job in code_jobs)
        )
        full_frame = self._full_frame_job(frame) if early_fallback or late_fallback else None
        entries = self._remember(jobs if full_frame is None else [*jobs, full_frame])
        late: tuple[_Job, Sequence[_Job]] | None = None
        if early_fallback and full_frame is not None and full_frame.pending is None:
            jobs.append(full_frame)
        elif early_fallback and full_frame is not None:
            # The previous frame's decode of these pixels is still running. Waiting for it
            # here would hold back this frame's region reads, so it is awaited once they
            # have started, as a late decode is.
            late = (full_frame, [])
        elif late_fallback and full_frame is not None:
            late = (full_frame, code_jobs)
        reused_late: list[_Job] = []
        outcomes = await self._run(
            frame, jobs, deadline, turn, previous, late=late, reused_late=reused_late
        )
        if late is not None and id(late[0]) in outcomes:
            jobs.append(late[0])
        for job in reused_late:
            jobs.append(job)
            # This frame's entry was stored as pending: it gets the reading it repeats.
            entry = entries.pop(id(full_frame), None)
            if entry is not None and self._reuse is not None and job.signature is not None:
                entry.signature = job.signature
                self._reuse.resolve(entry, job.reused)
        self._resolve(entries, outcomes)
        return _split_full_frame(_assemble(jobs, outcomes))

    @staticmethod
    async def _until_ended(previous: _ReadTurn, deadline: float) -> None:
        """Wait until the previous frame's reads end, or until ``deadline``."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                await previous.ended.wait()

    def _with_reuse(self, job: _Job) -> _Job:
        """Attach the crop's signature and, if its pixels did not change, the old reading.

        A reused reading keeps the signature of the pixels it was read from, so slow changes
        add up until the region is read again. When the old read is still running, the job
        gets it as ``pending`` instead, and is looked up again once that read ends.
        """
        if self._reuse is None or job.reader is None or job.crop is None:
            return job
        crop_signature = job.signature if job.signature is not None else signature(job.crop)
        cached = self._reuse.lookup(_reuse_key(job), job.region.box, crop_signature)
        if cached is None:
            return replace(job, signature=crop_signature, pending=None)
        if cached.pending:
            return replace(job, signature=crop_signature, pending=cached)
        return replace(job, signature=cached.signature, reused=cached.reading, pending=None)

    def _remember(self, jobs: Sequence[_Job]) -> dict[int, CachedRead]:
        """Store this frame's regions for the next frame, those still to be read as pending.

        Returns the pending entries by job, to be resolved when the reads end.
        """
        if self._reuse is None:
            return {}
        entries = {}
        for job in jobs:
            if job.signature is not None:
                entry = self._reuse.store(
                    _reuse_key(job), job.region.box, job.signature, job.reused
                )
                if entry.pending:
                    entries[id(job)] = entry
        self._reuse.next_frame()
        return entries

    def _resolve(
        self, entries: Mapping[int, CachedRead], outcomes: Mapping[int, OpResult[Reading] | None]
    ) -> None:
        """Give the pending entries their readings; drop those whose reads failed."""
        if self._reuse is None:
            return
        for key, entry in entries.items():
            op = outcomes.get(key)
            succeeded = op is not None and op.outcome is Outcome.SUCCEEDED
            self._reuse.resolve(entry, op.value if succeeded and op is not None else None)

    def _job_for(self, frame: Frame, region: Region) -> _Job:
        reader = self._routes.get(region.class_name)
        if reader is None:
            return _Job(region, None, Origin.DETECTOR)
        crop, offset = crop_with_margin(frame.image, region.box, reader.crop_margin)
        return self._with_reuse(_Job(region, reader, Origin.DETECTOR, crop, offset))

    def _document_job(self, frame: Frame, document: Region, parts: Sequence[Region]) -> _Job:
        """Return the job that reads a document frame whole (see :meth:`_as_document`).

        Its reuse signature stacks those of the crops of the regions it replaces, so each
        part is compared as closely as a region read on its own. A whole-frame signature
        missed a changed line.
        """
        reader = self._routes[document.class_name]
        ordered = sorted(parts, key=lambda region: (region.box.y, region.box.x))
        crops = [crop_with_margin(frame.image, r.box, reader.crop_margin)[0] for r in ordered]
        stacked = np.concatenate([signature(crop) for crop in crops])
        job = _Job(document, reader, Origin.DOCUMENT, frame.image, signature=stacked)
        return self._with_reuse(job)

    def _full_frame_job(self, frame: Frame) -> _Job:
        """Return the full-frame decode's job, with its reuse signature and cache lookup.

        As for a region, the job gets the last decode's reading if the frame did not change,
        or that decode as ``pending`` if it is still running. The signature stacks those of
        the frame's tiles (see ``frame_signature``), because one signature of the whole frame
        misses a small code that appears or changes.
        """
        box = Box(0, 0, frame.width, frame.height)
        region = Region("frame", 1.0, box)
        job = _Job(region, self._code_reader, Origin.FULL_FRAME, frame.image)
        if self._reuse is None:
            return job
        return self._with_reuse(replace(job, signature=frame_signature(frame.image)))

    async def _run(
        self,
        frame: Frame,
        jobs: Sequence[_Job],
        deadline: float,
        turn: _ReadTurn,
        previous: _ReadTurn | None,
        *,
        late: tuple[_Job, Sequence[_Job]] | None = None,
        reused_late: list[_Job] | None = None,
    ) -> dict[int, OpResult[Reading] | None]:
        """Read the jobs in the group and wait for their outcomes, until ``deadline``.

        ``deadline`` is on the event loop's clock. A job not started by then gets ``None``,
        and a read still running then is cancelled and reported as timed out. A job takes a
        free slot at once, but queues for one only after ``previous`` has settled, so the
        previous frame's reads go first. ``turn`` is marked started once every job has a
        slot, and settled once the frame submits no more reads.

        ``late`` is a job to read once the jobs it comes with have ended, if none of them
        found a code. Its outcome is returned only if it was read, or ``None`` if the
        deadline came before it could start. When it repeats the previous frame's reading
        instead, it is added to ``reused_late``.
        """
        loop = asyncio.get_running_loop()
        handles: dict[int, OpHandle[Reading]] = {}
        expired: set[int] = set()

        def expire() -> None:
            for key, handle in handles.items():
                if handle.cancel("frame deadline"):
                    expired.add(key)

        timer = loop.call_at(deadline, expire)
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    waiting: dict[OpKind, list[_Job]] = {}
                    for job in sorted(jobs, key=_estimated_cost, reverse=True):
                        if job.reader is None or job.crop is None or job.reused is not None:
                            continue
                        if loop.time() >= deadline:
                            break
                        handle = self._submit(frame, job.reader, job.crop)
                        if handle is None:
                            waiting.setdefault(job.reader.kind, []).append(job)
                        else:
                            handles[id(job)] = handle
                            turn.began.set()
                    if waiting and previous is not None:
                        await previous.settled.wait()
                    # Each group has a queue of its own, so code reads waiting for a code
                    # worker do not hold back the text reads behind them.
                    queues = [
                        asyncio.ensure_future(self._queue(frame, queued, handles, turn))
                        for queued in waiting.values()
                    ]
                    try:
                        await asyncio.gather(*queues)
                    finally:
                        # One queue failed (its group was closed): stop the other one too.
                        for queue in queues:
                            queue.cancel()
            except TimeoutError:
                pass
            finally:
                turn.started.set()
            missed_late = late is not None and await self._read_late(
                frame, late, deadline, handles, previous, reused_late
            )
            turn.settled.set()
            if handles:
                await asyncio.gather(*handles.values(), return_exceptions=True)
        finally:
            timer.cancel()
            # Left early (the frame's read stage was cancelled): stop the reads of this frame.
            for handle in handles.values():
                handle.cancel("frame read cancelled")
        self._group.take_results()
        self._process_group.take_results()
        outcomes: dict[int, OpResult[Reading] | None] = {}
        late_read = (
            [late[0]] if late is not None and (id(late[0]) in handles or missed_late) else []
        )
        for job in [*jobs, *late_read]:
            started = handles.get(id(job))
            if started is None:
                if job.reader is not None and job.crop is not None and job.reused is None:
                    outcomes[id(job)] = None
                continue
            result = started.result
            if id(job) in expired and result is not None and result.outcome is Outcome.CANCELLED:
                result = replace(result, outcome=Outcome.TIMED_OUT, reason="deadline")
            outcomes[id(job)] = result
        return outcomes

    async def _read_late(
        self,
        frame: Frame,
        late: tuple[_Job, Sequence[_Job]],
        deadline: float,
        handles: dict[int, OpHandle[Reading]],
        previous: _ReadTurn | None,
        reused_late: list[_Job] | None,
    ) -> bool:
        """Start the late job unless one of the jobs it waits for found a code.

        Nor is it started after a job that scanned the whole frame this frame (see
        :func:`_scanned_whole_frame`): it is added to ``reused_late`` with an empty reading,
        so that the next frame can reuse it. A late job whose pixels the previous
        frame decoded is not started either: it is added to ``reused_late`` with that
        reading. If that decode was still running, it is awaited first, and its reading is
        reused only if its signature matches this frame's. A reading the job had before the
        wait is added even if the deadline cuts the wait short.

        Returns:
            Whether the deadline came before the job could start, while no job it waits for
            had made it needless.
        """
        job, waited = late
        reader, crop = job.reader, job.crop
        assert reader is not None
        assert crop is not None
        waiting = [handles[id(w)] for w in waited if id(w) in handles]
        try:
            async with asyncio.timeout_at(deadline):
                await asyncio.gather(*waiting, return_exceptions=True)
                if _late_needless(late, handles, frame, reused_late):
                    return False
                cached = job.pending
                if cached is not None and previous is not None and self._reuse is not None:
                    await previous.ended.wait()
                    # A reused reading keeps the signature it was read with, which may be
                    # older than the one this frame matched while the decode was pending.
                    signature_now = job.signature
                    if (
                        cached.reading is not None
                        and signature_now is not None
                        and self._reuse.matches(cached.signature, signature_now)
                    ):
                        job = replace(
                            job, reused=cached.reading, signature=cached.signature, pending=None
                        )
                if job.reused is not None:
                    if reused_late is not None:
                        reused_late.append(job)
                    return False
                started = self._submit(frame, reader, crop)
                if started is None:
                    started = await self._submit_queued(frame, reader, crop)
                handles[id(job)] = started
        except TimeoutError:
            # Reads that ended before the deadline may have made the job needless.
            if id(job) in handles or _late_needless(late, handles, frame, reused_late):
                return False
            # The last decode's reading, in hand before the wait, still stands for this one.
            if job.reused is not None and reused_late is not None:
                reused_late.append(job)
                return False
            return True
        return False

    async def _queue(
        self,
        frame: Frame,
        jobs: Sequence[_Job],
        handles: dict[int, OpHandle[Reading]],
        turn: _ReadTurn,
    ) -> None:
        """Start jobs one after the other, each waiting in its group's queue for a slot."""
        for job in jobs:
            assert job.reader is not None
            assert job.crop is not None
            handles[id(job)] = await self._submit_queued(frame, job.reader, job.crop)
            turn.began.set()

    def _submit(self, frame: Frame, reader: Reader, crop: Image) -> OpHandle[Reading] | None:
        """Start one read if the group has a free slot and no read queued, else return None."""
        read, on_cancel = _cancellable(reader)
        group = self._process_group if reader.kind == "process" else self._group
        return group.try_go(
            read,
            crop,
            kind=reader.kind,
            name=f"edge.read.{reader.name}[{frame.seq}]",
            timeout=self._options.op_timeout,
            on_cancel=on_cancel,
        )

    async def _submit_queued(self, frame: Frame, reader: Reader, crop: Image) -> OpHandle[Reading]:
        """Start one read, waiting in the group's queue for a slot."""
        read, on_cancel = _cancellable(reader)
        group = self._process_group if reader.kind == "process" else self._group
        return await group.go(
            read,
            crop,
            kind=reader.kind,
            name=f"edge.read.{reader.name}[{frame.seq}]",
            timeout=self._options.op_timeout,
            on_cancel=on_cancel,
        )

    async def aclose(self) -> None:
        """Stop the reader workers and the detector thread, then release the models."""
        try:
            await self._group.aclose()
        finally:
            # Closed even when the wait for the thread reads is cancelled, so that no worker
            # process is left running.
            await self._process_group.aclose()
        # A running detection blocks the shutdown until it ends, so wait off the event loop.
        await asyncio.to_thread(self._detect_executor.shutdown, wait=True, cancel_futures=True)
        await asyncio.to_thread(self._trim_executor.shutdown, wait=True, cancel_futures=True)
        readers = {id(r): r for r in [*self._routes.values(), self._code_reader] if r is not None}
        for reader in readers.values():
            reader.close()
        self._detector.close()


def _cancellable(reader: Reader) -> tuple[Callable[[Image], Reading], Callable[[], None] | None]:
    """Return the reader's read function and what cancels it, if the reader can stop."""
    # A timed-out thread cannot be killed, so a cancellable reader gets a cancellation
    # request, stops its model run and frees its thread for the next read.
    if reader.kind == "thread" and reader.cancellable:
        cancellation = Cancellation()
        return functools.partial(reader.read, cancellation=cancellation), cancellation.cancel
    return reader.read, None


def _drop_unbegun(reading: Iterable[_Reading]) -> None:
    """Drop the read stages, after the oldest, none of whose reads has had a slot yet."""
    for stage in list(reading)[1:]:
        if not stage.turn.began.is_set() and not stage.task.done():
            stage.drop()


async def _next_frame(source: AsyncIterator[Frame]) -> Frame | None:
    """Return the next frame of ``source``, or ``None`` at its end."""
    try:
        return await anext(source)
    except StopAsyncIteration:
        return None


async def _from_iterable(frames: Iterable[Frame]) -> AsyncIterator[Frame]:
    for frame in frames:
        yield frame


def _estimated_cost(job: _Job) -> float:
    """Estimate a read's CPU time in relative units, to start the longest reads first.

    With reads started longest first, the last reads of a frame are short ones, so fewer
    slots sit idle while one long read finishes.
    """
    if job.reader is None or job.crop is None:
        return 0.0
    return float(job.crop.shape[0] * job.crop.shape[1]) * job.reader.cost_per_pixel


def _accept_regions(detections: Sequence[Region], seq: int) -> tuple[list[Region], int]:
    accepted = [
        r
        for r in detections
        if r.box.w >= MIN_REGION_SIDE and r.box.h >= MIN_REGION_SIDE and np.isfinite(r.score)
    ]
    rejected = len(detections) - len(accepted)
    if rejected:
        logger.debug("frame %d: rejected %d degenerate regions", seq, rejected)
    return accepted, rejected


def _union_area(boxes: Sequence[Box]) -> int:
    """Return the area in pixels that at least one of the boxes covers."""
    xs = sorted({edge for box in boxes for edge in (box.x, box.x + box.w)})
    ys = sorted({edge for box in boxes for edge in (box.y, box.y + box.h)})
    covered = np.zeros((len(ys), len(xs)), dtype=bool)
    for box in boxes:
        top, bottom = ys.index(box.y), ys.index(box.y + box.h)
        left, right = xs.index(box.x), xs.index(box.x + box.w)
        covered[top:bottom, left:right] = True
    # Cell (i, j) spans ys[i]..ys[i + 1] and xs[j]..xs[j + 1]. The last row and column are empty.
    heights = np.diff(np.asarray(ys, dtype=np.int64), append=ys[-1] if ys else 0)
    widths = np.diff(np.asarray(xs, dtype=np.int64), append=xs[-1] if xs else 0)
    return int(heights @ covered @ widths)


def crop_with_margin(image: Image, box: Box, margin: float) -> tuple[Image, tuple[int, int]]:
    """Cut a box out of a frame, widened on each side by ``margin`` of its width and height.

    Returns:
        The C-contiguous crop, clamped to the frame, and its top-left corner (x, y) in
        frame pixels.
    """
    height, width = image.shape[:2]
    margin_x = round(box.w * margin)
    margin_y = round(box.h * margin)
    left, top = max(0, box.x - margin_x), max(0, box.y - margin_y)
    right = min(width, box.x + box.w + margin_x)
    bottom = min(height, box.y + box.h + margin_y)
    return np.ascontiguousarray(image[top:bottom, left:right]), (left, top)


def _shift(box: Box | None, dx: int, dy: int) -> Box | None:
    return None if box is None else Box(box.x + dx, box.y + dy, box.w, box.h)


def _to_frame(reading: Reading, offset: tuple[int, int]) -> Reading:
    dx, dy = offset
    if dx == 0 and dy == 0:
        return reading
    codes = tuple(Code(c.format, c.data, c.text, _shift(c.box, dx, dy)) for c in reading.codes)
    lines = tuple(TextLine(t.text, t.score, _shift(t.box, dx, dy)) for t in reading.lines)
    return Reading(codes, lines)


def _assemble(
    jobs: Sequence[_Job], outcomes: Mapping[int, OpResult[Reading] | None]
) -> list[RegionResult]:
    results = []
    for job in jobs:
        if job.reader is None:
            results.append(RegionResult(job.region, None, RegionStatus.EMPTY, origin=job.origin))
            continue
        results.append(_region_result(job, job.reader.name, outcomes.get(id(job))))
    return results


def _region_result(job: _Job, reader: str, op: OpResult[Reading] | None) -> RegionResult:
    if job.reused is not None:
        reading = _to_frame(job.reused, job.offset)
        status = RegionStatus.EMPTY if reading.empty else RegionStatus.OK
        return RegionResult(job.region, reader, status, reading, 0.0, job.origin, reused=True)
    if op is None or op.outcome is Outcome.REJECTED:
        return RegionResult(
            job.region,
            reader,
            RegionStatus.TIMEOUT,
            origin=job.origin,
            error="not started before the frame deadline",
        )
    if op.outcome is Outcome.CANCELLED:
        return RegionResult(
            job.region, reader, RegionStatus.ERROR, origin=job.origin, error="read cancelled"
        )
    elapsed = (op.run_time or 0.0) * 1000
    if op.outcome is Outcome.SUCCEEDED:
        assert op.value is not None
        reading = _to_frame(op.value, job.offset)
        status = RegionStatus.EMPTY if reading.empty else RegionStatus.OK
        return RegionResult(job.region, reader, status, reading, elapsed, job.origin)
    if op.outcome is Outcome.TIMED_OUT:
        why = "frame deadline" if op.reason == "deadline" else "operation timeout"
        logger.warning("%s: read of %s region timed out (%s)", op.name, job.region.class_name, why)
        return RegionResult(
            job.region,
            reader,
            RegionStatus.TIMEOUT,
            elapsed_ms=elapsed,
            origin=job.origin,
            error=f"timed out ({why}) after {elapsed:.0f} ms",
        )
    error = f"{type(op.error).__name__}: {op.error}"
    logger.warning("%s: read of %s region failed: %s", op.name, job.region.class_name, error)
    return RegionResult(
        job.region, reader, RegionStatus.ERROR, elapsed_ms=elapsed, origin=job.origin, error=error
    )


def _late_needless(
    late: tuple[_Job, Sequence[_Job]],
    handles: Mapping[int, OpHandle[Reading]],
    frame: Frame,
    reused_late: list[_Job] | None,
) -> bool:
    """Return whether a job that the late job waits for found a code or scanned the frame.

    When one scanned the whole frame and found nothing, the late job is added to
    ``reused_late`` with an empty reading, which then stands for its decode.
    """
    job, waited = late
    for other in waited:
        handle = handles.get(id(other))
        result = handle.result if handle is not None else None
        if result is not None and result.value is not None and result.value.codes:
            return True
    if not any(_scanned_whole_frame(w, handles.get(id(w)), frame) for w in waited):
        return False
    if reused_late is not None:
        reused_late.append(replace(job, reused=Reading(), pending=None))
    return True


def _scanned_whole_frame(job: _Job, handle: OpHandle[Reading] | None, frame: Frame) -> bool:
    """Return whether a code region's crop is the whole frame and its read found no code.

    A low-resolution photo of one code is often boxed so that the crop's margin reaches
    every edge. Its full-frame decode would then scan the same pixels again: the region
    reader retries at least as much as the full-frame reader, so the decode can find
    nothing new. Only a read of this frame that succeeded counts. A reading repeated from
    an earlier frame does not: the crop's one signature can miss a small code that
    appeared since, which the decode's tile signatures catch.
    """
    if job.crop is None or job.crop.shape[:2] != frame.image.shape[:2]:
        return False
    result = handle.result if handle is not None else None
    return (
        result is not None
        and result.outcome is Outcome.SUCCEEDED
        and result.value is not None
        and not result.value.codes
    )


def _reuse_key(job: _Job) -> str:
    """Return the key of a job's entries in the reuse cache: its class, or the full frame's."""
    return _FULL_FRAME_KEY if job.origin is Origin.FULL_FRAME else job.region.class_name


def _split_full_frame(results: list[RegionResult]) -> list[RegionResult]:
    """Replace the full-frame result by one region per code it found, skipping known codes."""
    known = {
        (c.format, c.data)
        for r in results
        if r.origin is not Origin.FULL_FRAME
        for c in r.reading.codes
    }
    output = [r for r in results if r.origin is not Origin.FULL_FRAME]
    for result in results:
        if result.origin is not Origin.FULL_FRAME:
            continue
        if result.status is not RegionStatus.OK:
            if result.status is not RegionStatus.EMPTY:
                output.append(result)
            continue
        for code in result.reading.codes:
            if (code.format, code.data) in known:
                continue
            known.add((code.format, code.data))
            class_name = "qr_code" if code.format == "QRCODE" else "barcode"
            box = code.box or result.region.box
            output.append(
                RegionResult(
                    Region(class_name, 1.0, box),
                    result.reader,
                    RegionStatus.OK,
                    Reading(codes=(code,)),
                    result.elapsed_ms,
                    Origin.FULL_FRAME,
                    reused=result.reused,
                )
            )
    return output
