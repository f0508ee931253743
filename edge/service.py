"""The daemon: camera to pipeline to publisher until the source ends or a signal arrives."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import sys
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge import __version__
from edge.camera.base import Camera
from edge.camera.factory import create_camera
from edge.config import SAMPLES_DIR, Config, OutboxConfig, load_config
from edge.discovery import LAST_CODE, LAST_TEXT, TAG, discovery_sender
from edge.errors import ConfigError, EdgeError, SourceExhausted
from edge.factory import build_pipeline
from edge.metrics import Metrics, MetricsServer
from edge.mqtt_stats import StatsCollector
from edge.notify import Notifier, Watchdog
from edge.pipeline import FailedFrame, Pipeline
from edge.publisher import MqttPublisher
from edge.results import Frame, FrameResult, RegionStatus
from edge.signals import SignalInbox
from edge.tracker import FIRST_SEEN, Tracker

logger = logging.getLogger(__name__)

#: Seconds between two log messages about frames the pipeline could not process.
_FAILURE_LOG_INTERVAL = 60.0

#: File name of the outbox inside the state directory.
OUTBOX_FILE = "outbox.sqlite3"
#: Seconds to wait at start for a first broker connection before frames flow anyway.
CONNECT_WAIT = 2.0


@dataclass
class RunSummary:
    """Counters of one run, logged at exit."""

    frames: int = 0
    regions: int = 0
    codes: int = 0
    lines: int = 0
    failed_regions: int = 0
    #: Frames the pipeline could not process (an unconvertible image, a detector failure).
    failed_frames: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    #: The run stopped for SIGHUP with this new, already validated configuration.
    reload_config: Config | None = None

    def add(self, result: FrameResult) -> None:
        """Count one frame result."""
        self.frames += 1
        for region in result.regions:
            self.regions += 1
            self.codes += len(region.reading.codes)
            self.lines += len(region.reading.lines)
            key = str(region.status)
            self.statuses[key] = self.statuses.get(key, 0) + 1
            if region.status in (RegionStatus.ERROR, RegionStatus.TIMEOUT):
                self.failed_regions += 1


async def run_service(
    config: Config,
    *,
    max_frames: int | None = None,
    stdout: bool = False,
    config_path: Path | None = None,
    signals: SignalInbox | None = None,
) -> RunSummary:
    """Run the daemon until the source ends, ``max_frames`` are done, or a signal arrives.

    SIGTERM and SIGINT stop it. SIGHUP reads ``config_path`` again: when the file is valid the
    run stops cleanly and the returned summary carries the new configuration in
    ``reload_config`` for the caller to start the next run with. An invalid file is logged
    and the run goes on with the old configuration.

    Args:
        config: Validated configuration.
        max_frames: Stop after this many frames; ``None`` runs until the source ends.
        stdout: Also print every frame result as one JSON line on standard output.
        config_path: The file ``config`` came from, read again on SIGHUP; ``None`` reloads
            the defaults.
        signals: An installed inbox that also keeps signals between runs. With ``None``,
            the run takes signals only while frames flow.
    """
    logger.info(
        "edge %s starting: device %s, camera %s, model %s",
        __version__,
        config.device.id,
        config.camera.kind,
        config.detector.model,
    )
    notifier = Notifier.from_environment()
    watchdog = Watchdog.from_environment(
        notifier, stall_window=config.service.watchdog_stall or None
    )
    # Started first: until arm(), it pings while the model loads and the camera opens.
    watchdog_task = asyncio.create_task(watchdog.run(), name="edge.watchdog")
    metrics = Metrics()
    server = (
        MetricsServer(metrics, config.service.metrics_host, config.service.metrics_port)
        if config.service.metrics
        else None
    )
    summary = RunSummary()
    try:
        await _run_stages(
            config,
            notifier,
            watchdog,
            metrics,
            server,
            summary,
            max_frames,
            stdout,
            config_path,
            signals,
        )
    finally:
        watchdog_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watchdog_task
    logger.info(
        "processed %d frames: %d regions (%s), %d codes, %d text lines; %d frames failed",
        summary.frames,
        summary.regions,
        ", ".join(f"{k} {v}" for k, v in sorted(summary.statuses.items())) or "none",
        summary.codes,
        summary.lines,
        summary.failed_frames,
    )
    return summary


async def _run_stages(
    config: Config,
    notifier: Notifier,
    watchdog: Watchdog,
    metrics: Metrics,
    server: MetricsServer | None,
    summary: RunSummary,
    max_frames: int | None,
    stdout: bool,
    config_path: Path | None = None,
    signals: SignalInbox | None = None,
) -> None:
    """Bring up camera, model, publisher and metrics, run frames, then stop them in reverse."""
    camera = camera_from_config(config)
    notifier.status("loading the model")
    pipeline = await asyncio.to_thread(build_pipeline, config)
    logger.info("pipeline ready")
    publisher: MqttPublisher | None = None

    def stopped_early() -> bool:
        # A stop kept by the inbox during start-up ends the run before the next stage.
        if signals is None or signals.stop_signum is None:
            return False
        name = signal.Signals(signals.stop_signum).name
        logger.info("received %s during start-up, stopping", name)
        summary.reload_config = None
        return True

    def observe(result: FrameResult) -> None:
        watchdog.frame_processed()
        metrics.observe_frame(result, camera.dropped)
        if publisher is not None:
            stats = publisher.stats()
            metrics.set_outbox_depth(stats.depth)
            metrics.set_mqtt_connected(stats.connected)

    try:
        if stopped_early():
            return
        publisher = _publisher_from_config(config) if config.mqtt.enabled else None
        if publisher is not None:
            notifier.status("connecting to the MQTT broker")
            await publisher.start()
            if not await publisher.wait_connected(CONNECT_WAIT):
                logger.warning(
                    "MQTT broker %s not reachable yet; results are queued until it is",
                    publisher.endpoint,
                )
        if server is not None:
            await server.start()
        if stopped_early():
            return
        async with camera:
            logger.info("camera ready: %s", camera.description)
            notifier.ready(f"processing frames from {camera.description}")
            watchdog.arm()
            frame_loop = _FrameLoop(
                config,
                camera,
                pipeline,
                publisher,
                summary,
                max_frames=max_frames,
                stdout=stdout,
                observe=observe,
                config_path=config_path,
                signals=signals,
            )
            await frame_loop.run_until_stopped()
            logger.info("camera stopped, %d frames dropped while busy", camera.dropped)
    finally:
        stopping = signals is not None and signals.stop_signum is not None
        if summary.reload_config is not None and not stopping:
            notifier.notify("RELOADING=1", "STATUS=reloading the configuration")
        else:
            notifier.stopping("stopping: draining reads and the outbox")
        await _close_stages(pipeline, server, publisher)


async def _close_stages(
    pipeline: Pipeline, server: MetricsServer | None, publisher: MqttPublisher | None
) -> None:
    """Stop the stages in reverse order; a failure in one is logged and the rest still stop."""
    try:
        await pipeline.aclose()
        logger.info("pipeline stopped")
    except Exception:
        logger.exception("failed to stop the pipeline cleanly")
    try:
        if server is not None:
            await server.close()
    except Exception:
        logger.exception("failed to stop the metrics endpoint cleanly")
    if publisher is not None:
        await publisher.stop()


def outbox_path(config: OutboxConfig, environ: Mapping[str, str] | None = None) -> Path:
    """Return the outbox file: in ``$STATE_DIRECTORY`` under systemd, else ``outbox.path``.

    Without either, the per-user default is ``$XDG_STATE_HOME/edge/outbox.sqlite3``, with
    ``XDG_STATE_HOME`` defaulting to ``~/.local/state``.
    """
    env = os.environ if environ is None else environ
    # systemd separates several StateDirectory= entries with colons; the first is ours.
    state_directory = env.get("STATE_DIRECTORY", "").split(":")[0]
    if state_directory:
        return Path(state_directory) / OUTBOX_FILE
    if config.path is not None:
        return config.path
    state_home = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state_home) / "edge" / OUTBOX_FILE


def _publisher_from_config(config: Config) -> MqttPublisher:
    mqtt = config.mqtt
    discovery = (
        discovery_sender(mqtt.discovery_prefix, mqtt.topic_prefix, config.device.id)
        if mqtt.discovery
        else None
    )
    return MqttPublisher(
        mqtt,
        config.device.id,
        outbox_path(config.outbox),
        config.outbox,
        discovery=discovery,
    )


def camera_from_config(config: Config) -> Camera:
    """Create the configured camera; the simulated one replays the bundled samples by default."""
    camera = config.camera
    if camera.kind == "simulated":
        return create_camera(
            "simulated", path=camera.path or SAMPLES_DIR, fps=camera.fps or None, loop=camera.loop
        )
    device: int | str = int(camera.device) if camera.device.isdigit() else camera.device
    return create_camera(
        camera.kind,
        device=device,
        width=camera.width or None,
        height=camera.height or None,
        fps=camera.fps or None,
    )


class _FrameLoop:
    """Reads, processes and publishes frames, detecting each one while the previous is read.

    At most two frames are in flight. One is in its read stage, and the next is detected
    or waits for those reads. Results are published in frame order.
    """

    def __init__(
        self,
        config: Config,
        camera: Camera,
        pipeline: Pipeline,
        publisher: MqttPublisher | None,
        summary: RunSummary,
        *,
        max_frames: int | None,
        stdout: bool,
        observe: Callable[[FrameResult], None] | None = None,
        config_path: Path | None = None,
        signals: SignalInbox | None = None,
    ) -> None:
        self._config_path = config_path
        self._signals = signals
        self._device_id = config.device.id
        self._observe = observe
        self._config = config
        self._camera = camera
        self._pipeline = pipeline
        self._publisher = publisher
        self._summary = summary
        self._max_frames = max_frames
        self._stdout = stdout
        self._stop_signal: int | None = None
        self._camera_read: asyncio.Future[Frame] | None = None
        self._stopping = asyncio.Event()
        self._cancel_timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._tracker = (
            Tracker(config.tracker, config.device.id) if config.tracker.enabled else None
        )
        self._stats = StatsCollector(config.device.id)
        self._failure_logged_at = -math.inf
        self._failures_unlogged = 0

    async def run_until_stopped(self) -> None:
        """Run the loop until the source ends or SIGTERM, SIGINT or a valid SIGHUP arrives."""
        loop = asyncio.get_running_loop()
        inbox = self._signals
        replaced: dict[int, Any] = {}
        if inbox is None:
            inbox = SignalInbox()
            replaced = inbox.install()
        try:
            inbox.attach(loop, self._request_stop, self._request_reload)
        except BaseException:
            for signum, handler in replaced.items():
                signal.signal(signum, handler)
            raise
        # A stop that the inbox kept runs on the loop, after these tasks exist.
        self._task = asyncio.create_task(self._run(), name="edge.frames")
        stats_task = asyncio.create_task(self._send_stats(), name="edge.stats")
        try:
            await self._task
        except asyncio.CancelledError:
            # Only a cancellation this loop issued for a signal ends quietly; one aimed at the
            # caller's task belongs to the caller and propagates.
            current = asyncio.current_task()
            outside = current is not None and current.cancelling() > 0
            if self._stop_signal is None or not self._task.cancelled() or outside:
                raise
        finally:
            # From here the inbox keeps signals for the caller, so a stop while the run
            # drains still ends the process cleanly.
            inbox.detach()
            for signum, handler in replaced.items():
                signal.signal(signum, handler)
            if self._cancel_timer is not None:
                self._cancel_timer.cancel()
            stats_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stats_task
        await self._finish_tracks()

    def _request_reload(self) -> None:
        if self._stop_signal is not None and self._stop_signal != signal.SIGHUP:
            logger.info("received SIGHUP while stopping; ignored")
            return
        source = self._config_path or "the built-in defaults"
        logger.info("received SIGHUP, reloading the configuration from %s", source)
        try:
            new_config = load_config(self._config_path)
        except ConfigError as exc:
            # During a reload, the file read at the earlier SIGHUP is the one kept.
            in_use = "the running one" if self._stop_signal is None else "the one read before"
            logger.error("configuration not reloaded, keeping %s: %s", in_use, exc)
            return
        self._summary.reload_config = new_config
        self._stop(signal.SIGHUP)

    def _request_stop(self, signum: int) -> None:
        logger.info("received %s, stopping", signal.Signals(signum).name)
        # A stop wins over a reload requested before it.
        self._summary.reload_config = None
        self._stop(signum)

    def _stop(self, signum: int) -> None:
        """End the loop after the frame being read, and stop waiting for the camera."""
        self._stop_signal = signum
        self._stopping.set()
        task = self._task
        if task is None or task.done():
            return
        if self._camera_read is not None:
            self._camera_read.cancel()
        if self._cancel_timer is None:
            # The frame being read gets its deadline to finish, so its result is published.
            # A detected frame whose reads have not begun is dropped.
            grace = self._config.pipeline.frame_deadline + 1.0
            self._cancel_timer = asyncio.get_running_loop().call_later(
                grace, self._cancel_reads, grace
            )

    def _cancel_reads(self, grace: float) -> None:
        if self._task is None or self._task.done():
            return
        logger.warning("frame loop still running %.1f s after the stop, cancelling it", grace)
        self._task.cancel()

    async def _run(self) -> None:
        async with (
            contextlib.aclosing(self._frames()) as frames,
            contextlib.aclosing(self._pipeline.stream(frames, stop=self._stopping)) as results,
        ):
            async for item in results:
                if isinstance(item, FailedFrame):
                    # One bad frame costs itself only. Frames that keep failing send no
                    # watchdog ping, so under systemd a persistent failure ends in a restart.
                    self._summary.failed_frames += 1
                    self._log_failed_frame(item.frame, item.error)
                else:
                    await self._handle(item)

    async def _frames(self) -> AsyncGenerator[Frame, None]:
        """Yield camera frames until the source ends, ``max_frames`` are taken or a stop."""
        frames_taken = 0
        while self._stop_signal is None and (
            self._max_frames is None or frames_taken < self._max_frames
        ):
            frame = await self._next_frame()
            if frame is None:
                return
            frames_taken += 1
            yield frame

    async def _next_frame(self) -> Frame | None:
        """Return the camera's next frame, or ``None`` when the source ended or a stop came."""
        read = asyncio.ensure_future(self._camera.read())
        self._camera_read = read
        try:
            return await read
        except SourceExhausted:
            logger.info("camera source has no more frames")
            return None
        except asyncio.CancelledError:
            # Only the stop cancels the camera read alone. A cancellation of this task
            # (the stop's grace timer, or the caller) propagates.
            current = asyncio.current_task()
            outside = current is not None and current.cancelling() > 0
            if self._stop_signal is None or not read.cancelled() or outside:
                raise
            return None
        finally:
            self._camera_read = None

    async def _handle(self, result: FrameResult) -> None:
        """Count, observe and publish one frame result."""
        self._summary.add(result)
        logger.debug(
            "frame %d: %d regions in %.0f ms",
            result.seq,
            len(result.regions),
            result.timings_ms["total"],
        )
        self._stats.add(result)
        if self._observe is not None:
            self._observe(result)
        if self._publisher is not None:
            await self._publisher.publish_frame(result)
            if self._tracker is not None:
                await self._publish_events(self._tracker.update(result))
        if self._stdout:
            sys.stdout.write(result.to_json(self._device_id) + "\n")
            sys.stdout.flush()

    def _log_failed_frame(self, frame: Frame, error: EdgeError) -> None:
        """Log a failed frame: the first at once, then at most one message a minute.

        Each message carries the count of failures since the previous one, and the run
        summary logged at exit has the total.
        """
        now = time.monotonic()
        self._failures_unlogged += 1
        if now - self._failure_logged_at < _FAILURE_LOG_INTERVAL:
            return
        logger.error(
            "frame %d skipped (%d frames failed since the last message): %s",
            frame.seq,
            self._failures_unlogged,
            error,
        )
        self._failure_logged_at = now
        self._failures_unlogged = 0

    async def _publish_events(self, events: list[dict[str, Any]]) -> None:
        publisher = self._publisher
        assert publisher is not None
        for event in events:
            await publisher.publish_event(event)
            if event["event"] != FIRST_SEEN or not self._config.mqtt.discovery:
                continue
            state = {
                "value": event["value"],
                "class": event["class"],
                "format": event["format"],
                "seen_at": event["frame"]["captured_at"],
            }
            await publisher.publish_state(
                LAST_TEXT if event["format"] is None else LAST_CODE, state
            )
            if event["format"] == "QRCODE":
                publisher.publish_nowait(TAG, {"value": event["value"]})

    async def _finish_tracks(self) -> None:
        if self._tracker is not None and self._publisher is not None:
            await self._publish_events(self._tracker.finish())

    async def _send_stats(self) -> None:
        interval = self._config.mqtt.stats_interval
        if self._publisher is None or interval <= 0:
            return
        while True:
            await asyncio.sleep(interval)
            payload = self._stats.payload(self._camera.dropped, self._publisher.stats())
            if not self._publisher.publish_stats_nowait(payload):
                logger.debug("stats not sent: not connected to the MQTT broker")
