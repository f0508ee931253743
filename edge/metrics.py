"""Daemon metrics in the Prometheus text exposition format, served over HTTP on loopback.

:class:`Metrics` collects counters, gauges and histograms that the service updates per frame;
:class:`MetricsServer` serves them at ``GET /metrics`` with :func:`asyncio.start_server`, so no
HTTP library is needed. The format is version 0.0.4 of the Prometheus text format: ``# HELP``
and ``# TYPE`` lines, then one sample per line.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import threading
import time
from collections.abc import Iterable, Sequence

from edge import __version__
from edge.results import FrameResult, RegionStatus

logger = logging.getLogger(__name__)

#: Default TCP port of the metrics endpoint, bound to 127.0.0.1 unless configured otherwise.
DEFAULT_PORT = 9464
#: Upper bounds in seconds of the stage latency histogram buckets; ``+Inf`` is added.
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Pipeline stages timed in :attr:`FrameResult.timings_ms`.
STAGES = ("detect", "queue", "read", "total")
#: Content type of the Prometheus text format, version 0.0.4.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Seconds a client may take to send its request head before the connection is closed.
_REQUEST_TIMEOUT = 5.0
#: Largest request head accepted, in bytes.
_MAX_REQUEST_BYTES = 8192


class _Histogram:
    """Bucket counts (not cumulative), sum and count of observed values."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for index, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[index] += 1
                break
        else:
            self.counts[-1] += 1
        self.sum += value
        self.count += 1


class Metrics:
    """Counters and gauges of one daemon run. Safe to update from any thread.

    Args:
        buckets: Upper bounds in seconds of the latency histogram buckets, increasing.

    Raises:
        ValueError: ``buckets`` is empty, not increasing, or contains a non-finite value.
    """

    def __init__(self, buckets: Sequence[float] = DEFAULT_BUCKETS) -> None:
        if not buckets or any(not math.isfinite(b) for b in buckets):
            msg = f"buckets must be a non-empty sequence of finite numbers, got {buckets!r}"
            raise ValueError(msg)
        if any(low >= high for low, high in itertools.pairwise(buckets)):
            msg = f"buckets must be strictly increasing, got {buckets!r}"
            raise ValueError(msg)
        self._lock = threading.Lock()
        self._frames_processed = 0
        self._frames_dropped = 0
        self._last_dropped_total = 0
        self._latency = {stage: _Histogram(buckets) for stage in STAGES}
        self._reader_timeouts: dict[str, int] = {}
        self._reader_errors: dict[str, int] = {}
        self._outbox_depth = 0
        self._mqtt_connected = False
        self._last_frame_time = 0.0

    def observe_frame(self, result: FrameResult, dropped_total: int) -> None:
        """Count one processed frame and its stage latencies, timeouts and errors.

        Args:
            result: The pipeline's result for the frame.
            dropped_total: The camera's running count of dropped frames
                (:attr:`Camera.dropped`). A value lower than the previous one is taken as a
                new camera whose count restarted at 0, so the counter never decreases.
        """
        with self._lock:
            self._frames_processed += 1
            self._last_frame_time = time.time()
            if dropped_total >= self._last_dropped_total:
                self._frames_dropped += dropped_total - self._last_dropped_total
            else:
                self._frames_dropped += dropped_total
            self._last_dropped_total = dropped_total
            for stage in STAGES:
                milliseconds = result.timings_ms.get(stage)
                if milliseconds is not None and math.isfinite(milliseconds):
                    self._latency[stage].observe(max(milliseconds, 0.0) / 1000)
            for region in result.regions:
                if region.reader is None:
                    continue
                if region.status == RegionStatus.TIMEOUT:
                    counts = self._reader_timeouts
                elif region.status == RegionStatus.ERROR:
                    counts = self._reader_errors
                else:
                    continue
                counts[region.reader] = counts.get(region.reader, 0) + 1

    def set_outbox_depth(self, depth: int) -> None:
        """Set the number of messages waiting in the publisher's outbox."""
        with self._lock:
            self._outbox_depth = depth

    def set_mqtt_connected(self, connected: bool) -> None:
        """Set whether the MQTT client is connected to the broker."""
        with self._lock:
            self._mqtt_connected = connected

    def render(self) -> str:
        """Return every metric in the Prometheus text format, ending with a newline."""
        with self._lock:
            lines: list[str] = []
            _family(
                lines,
                "edge_build_info",
                "gauge",
                "Version of the running daemon; the value is always 1.",
                [(f'{{version="{_escape(__version__)}"}}', "1")],
            )
            _family(
                lines,
                "edge_frames_processed_total",
                "counter",
                "Frames that went through the pipeline.",
                [("", str(self._frames_processed))],
            )
            _family(
                lines,
                "edge_frames_dropped_total",
                "counter",
                "Frames the camera replaced by a newer one while the pipeline was busy.",
                [("", str(self._frames_dropped))],
            )
            _family(
                lines,
                "edge_last_frame_timestamp_seconds",
                "gauge",
                "Unix time when the last frame finished processing; 0 before the first.",
                [("", _number(self._last_frame_time))],
            )
            self._render_latency(lines)
            _family(
                lines,
                "edge_reader_timeouts_total",
                "counter",
                "Region reads that timed out, per reader.",
                _per_reader(self._reader_timeouts),
            )
            _family(
                lines,
                "edge_reader_errors_total",
                "counter",
                "Region reads that failed with an error, per reader.",
                _per_reader(self._reader_errors),
            )
            _family(
                lines,
                "edge_outbox_depth",
                "gauge",
                "Messages waiting in the publisher's outbox.",
                [("", str(self._outbox_depth))],
            )
            _family(
                lines,
                "edge_mqtt_connected",
                "gauge",
                "1 while the MQTT client is connected to the broker, else 0.",
                [("", "1" if self._mqtt_connected else "0")],
            )
        return "\n".join(lines) + "\n"

    def _render_latency(self, lines: list[str]) -> None:
        name = "edge_stage_latency_seconds"
        lines.append(f"# HELP {name} Time per frame spent in a pipeline stage.")
        lines.append(f"# TYPE {name} histogram")
        for stage, histogram in self._latency.items():
            cumulative = 0
            bounds = [*histogram.bounds, math.inf]
            for bound, count in zip(bounds, histogram.counts, strict=True):
                cumulative += count
                lines.append(f'{name}_bucket{{stage="{stage}",le="{_number(bound)}"}} {cumulative}')
            lines.append(f'{name}_sum{{stage="{stage}"}} {_number(histogram.sum)}')
            lines.append(f'{name}_count{{stage="{stage}"}} {histogram.count}')


def _family(
    lines: list[str], name: str, kind: str, help_text: str, samples: Iterable[tuple[str, str]]
) -> None:
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} {kind}")
    lines.extend(f"{name}{labels} {value}" for labels, value in samples)


def _per_reader(counts: dict[str, int]) -> list[tuple[str, str]]:
    return [(f'{{reader="{_escape(r)}"}}', str(n)) for r, n in sorted(counts.items())]


def _escape(value: str) -> str:
    """Escape a label value: backslash, double quote and line feed."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class MetricsServer:
    """Serve :meth:`Metrics.render` at ``GET /metrics`` over HTTP/1.1.

    Each connection gets one response and is then closed. Other paths get 404 and other
    methods 405.

    Args:
        metrics: The metrics to serve.
        host: Address to bind; the default keeps the endpoint on this machine.
        port: TCP port; 0 picks a free one (see :attr:`port` after :meth:`start`).
    """

    def __init__(self, metrics: Metrics, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> None:
        self._metrics = metrics
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None

    @property
    def host(self) -> str:
        """The bound address once started, else the configured one."""
        if self._server is not None and self._server.sockets:
            host: str = self._server.sockets[0].getsockname()[0]
            return host
        return self._host

    @property
    def port(self) -> int:
        """The bound port once started, else the configured one."""
        if self._server is not None and self._server.sockets:
            port: int = self._server.sockets[0].getsockname()[1]
            return port
        return self._port

    async def start(self) -> None:
        """Bind and start accepting connections.

        Raises:
            OSError: The address cannot be bound, for example because the port is in use.
        """
        self._server = await asyncio.start_server(
            self._handle, self._host, self._port, limit=_MAX_REQUEST_BYTES
        )
        logger.info("metrics endpoint ready: http://%s:%d/metrics", self._host, self.port)

    async def close(self) -> None:
        """Stop accepting connections and wait for the listening socket to close."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        await server.wait_closed()
        logger.info("metrics endpoint stopped")

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(_REQUEST_TIMEOUT):
                    head = await reader.readuntil(b"\r\n\r\n")
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                logger.debug("metrics request rejected: %s", type(exc).__name__)
                await _respond(writer, 400, "Bad Request", "incomplete or oversized request\n")
                return
            status, reason, body = self._route(head)
            await _respond(writer, status, reason, body, head_only=head.startswith(b"HEAD "))
        except ConnectionError as exc:
            logger.debug("metrics client went away: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _route(self, head: bytes) -> tuple[int, str, str]:
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return 400, "Bad Request", "malformed request line\n"
        method, target, _ = parts
        path = target.split("?", 1)[0]
        if path != "/metrics":
            return 404, "Not Found", "not found; metrics are served at /metrics\n"
        if method not in ("GET", "HEAD"):
            return 405, "Method Not Allowed", "only GET and HEAD are allowed\n"
        return 200, "OK", self._metrics.render()


async def _respond(
    writer: asyncio.StreamWriter,
    status: int,
    reason: str,
    body: str,
    *,
    head_only: bool = False,
) -> None:
    payload = body.encode()
    content_type = CONTENT_TYPE if status == 200 else "text/plain; charset=utf-8"
    headers = (
        f"HTTP/1.1 {status} {reason}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(payload)}\r\n"
        "Connection: close\r\n"
        "\r\n"
    )
    writer.write(headers.encode("latin-1"))
    if not head_only:
        writer.write(payload)
    await writer.drain()
