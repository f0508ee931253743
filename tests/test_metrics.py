"""Tests for the metrics collector and its HTTP endpoint, scraped over a real loopback socket."""

from __future__ import annotations

import asyncio
import re
import urllib.error
import urllib.request
from collections.abc import AsyncIterator

import pytest

from edge.metrics import CONTENT_TYPE, Metrics, MetricsServer
from edge.results import Box, FrameResult, Region, RegionResult, RegionStatus

SAMPLE = re.compile(r"^([a-z_]+)(\{[^}]*\})? (\S+)$")


def region(reader: str | None, status: RegionStatus) -> RegionResult:
    """A region result read by ``reader`` with ``status``."""
    return RegionResult(Region("text", 0.9, Box(0, 0, 10, 10)), reader, status)


def frame_result(
    *regions: RegionResult, detect: float = 40.0, read: float = 120.0, total: float = 170.0
) -> FrameResult:
    """A frame result with the given regions and stage timings in milliseconds."""
    return FrameResult(
        seq=0,
        captured_at=0.0,
        width=64,
        height=48,
        source=None,
        regions=regions,
        timings_ms={"detect": detect, "read": read, "total": total},
    )


def samples(text: str) -> dict[str, float]:
    """Parse sample lines into {name plus labels: value}."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        match = SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        values[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return values


@pytest.fixture
async def server() -> AsyncIterator[tuple[Metrics, MetricsServer]]:
    """A metrics endpoint on a free loopback port."""
    metrics = Metrics()
    endpoint = MetricsServer(metrics, port=0)
    await endpoint.start()
    yield metrics, endpoint
    await endpoint.close()


async def fetch(port: int, path: str = "/metrics") -> tuple[int, str, str]:
    """GET a path with urllib on a worker thread; return status, content type and body."""

    def get() -> tuple[int, str, str]:
        url = f"http://127.0.0.1:{port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.status, response.headers["Content-Type"], response.read().decode()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, exc.headers["Content-Type"], exc.read().decode()

    return await asyncio.to_thread(get)


async def raw_request(port: int, request: bytes) -> bytes:
    """Send raw bytes and return everything the server sends before it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    response = await asyncio.wait_for(reader.read(), timeout=10)
    writer.close()
    await writer.wait_closed()
    return response


def test_metrics_counts_frames() -> None:
    """Each observed frame adds one to the processed counter."""
    metrics = Metrics()
    metrics.observe_frame(frame_result(), dropped_total=0)
    metrics.observe_frame(frame_result(), dropped_total=0)

    assert samples(metrics.render())["edge_frames_processed_total"] == 2


def test_metrics_dropped_follows_camera_total() -> None:
    """The dropped counter follows the camera's running total."""
    metrics = Metrics()
    metrics.observe_frame(frame_result(), dropped_total=3)
    metrics.observe_frame(frame_result(), dropped_total=5)

    assert samples(metrics.render())["edge_frames_dropped_total"] == 5


def test_metrics_dropped_never_decreases() -> None:
    """A camera total that restarts at 0 adds to the counter instead of lowering it."""
    metrics = Metrics()
    metrics.observe_frame(frame_result(), dropped_total=5)
    metrics.observe_frame(frame_result(), dropped_total=2)

    assert samples(metrics.render())["edge_frames_dropped_total"] == 7


def test_metrics_reader_failures_per_reader() -> None:
    """Timeouts and errors are counted per reader; ok and unrouted regions are not."""
    metrics = Metrics()
    metrics.observe_frame(
        frame_result(
            region("text", RegionStatus.TIMEOUT),
            region("text", RegionStatus.TIMEOUT),
            region("codes", RegionStatus.ERROR),
            region("codes", RegionStatus.OK),
            region(None, RegionStatus.ERROR),
        ),
        dropped_total=0,
    )
    values = samples(metrics.render())

    assert values['edge_reader_timeouts_total{reader="text"}'] == 2
    assert values['edge_reader_errors_total{reader="codes"}'] == 1
    assert 'edge_reader_errors_total{reader="text"}' not in values


def test_metrics_histogram_cumulative() -> None:
    """Bucket counts are cumulative and +Inf equals _count."""
    metrics = Metrics(buckets=(0.05, 0.2))
    for detect in (10.0, 100.0, 150.0, 900.0):
        metrics.observe_frame(frame_result(detect=detect), dropped_total=0)
    values = samples(metrics.render())
    prefix = "edge_stage_latency_seconds"

    assert values[f'{prefix}_bucket{{stage="detect",le="0.05"}}'] == 1
    assert values[f'{prefix}_bucket{{stage="detect",le="0.2"}}'] == 3
    assert values[f'{prefix}_bucket{{stage="detect",le="+Inf"}}'] == 4
    assert values[f'{prefix}_count{{stage="detect"}}'] == 4
    assert values[f'{prefix}_sum{{stage="detect"}}'] == pytest.approx(1.16)


def test_metrics_histogram_every_stage() -> None:
    """The latency histogram has detect, queue, read and total series."""
    values = samples(Metrics().render())

    for stage in ("detect", "queue", "read", "total"):
        assert f'edge_stage_latency_seconds_count{{stage="{stage}"}}' in values


def test_metrics_gauges_set() -> None:
    """Outbox depth and MQTT connection state are reported as set."""
    metrics = Metrics()
    metrics.set_outbox_depth(17)
    metrics.set_mqtt_connected(True)
    values = samples(metrics.render())

    assert values["edge_outbox_depth"] == 17
    assert values["edge_mqtt_connected"] == 1


def test_metrics_help_and_type_lines() -> None:
    """Every metric family has one HELP and one TYPE line before its samples."""
    text = Metrics().render()
    families = {m.group(1) for m in re.finditer(r"^# TYPE (\S+) (\S+)$", text, re.M)}
    helped = {m.group(1) for m in re.finditer(r"^# HELP (\S+) ", text, re.M)}

    assert families == helped
    assert "edge_stage_latency_seconds" in families
    assert "# TYPE edge_stage_latency_seconds histogram" in text
    assert "# TYPE edge_frames_processed_total counter" in text
    assert "# TYPE edge_outbox_depth gauge" in text


def test_metrics_label_value_escaped() -> None:
    """Quotes, backslashes and newlines in a reader name are escaped."""
    metrics = Metrics()
    metrics.observe_frame(frame_result(region('a"b\\c\nd', RegionStatus.ERROR)), dropped_total=0)

    assert 'edge_reader_errors_total{reader="a\\"b\\\\c\\nd"} 1' in metrics.render()


def test_metrics_unsorted_buckets_raise() -> None:
    """Buckets that do not increase raise ValueError."""
    with pytest.raises(ValueError, match="strictly increasing"):
        Metrics(buckets=(1.0, 0.5))


async def test_metrics_server_serves_text(server: tuple[Metrics, MetricsServer]) -> None:
    """GET /metrics returns 200 with the Prometheus content type and the rendered text."""
    metrics, endpoint = server
    metrics.observe_frame(frame_result(), dropped_total=1)
    status, content_type, body = await fetch(endpoint.port)

    assert status == 200
    assert content_type == CONTENT_TYPE
    assert samples(body)["edge_frames_processed_total"] == 1
    assert body.endswith("\n")


async def test_metrics_server_binds_loopback(server: tuple[Metrics, MetricsServer]) -> None:
    """The default host is 127.0.0.1 and port 0 picks a free port."""
    _, endpoint = server

    assert endpoint.host == "127.0.0.1"
    assert endpoint.port > 0


async def test_metrics_server_unknown_path_404(server: tuple[Metrics, MetricsServer]) -> None:
    """Another path returns 404 naming /metrics."""
    _, endpoint = server
    status, _, body = await fetch(endpoint.port, "/")

    assert status == 404
    assert "/metrics" in body


async def test_metrics_server_post_405(server: tuple[Metrics, MetricsServer]) -> None:
    """POST /metrics returns 405."""
    _, endpoint = server
    response = await raw_request(endpoint.port, b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n")

    assert response.startswith(b"HTTP/1.1 405 ")


async def test_metrics_server_head_no_body(server: tuple[Metrics, MetricsServer]) -> None:
    """HEAD /metrics returns the headers and no body."""
    _, endpoint = server
    response = await raw_request(endpoint.port, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")

    assert response.startswith(b"HTTP/1.1 200 OK\r\n")
    assert response.endswith(b"\r\n\r\n")


async def test_metrics_server_garbage_400(server: tuple[Metrics, MetricsServer]) -> None:
    """A malformed request line returns 400."""
    _, endpoint = server
    response = await raw_request(endpoint.port, b"hello\r\n\r\n")

    assert response.startswith(b"HTTP/1.1 400 ")


async def test_metrics_server_oversized_head_400(server: tuple[Metrics, MetricsServer]) -> None:
    """A request head over the size limit returns 400 instead of being buffered."""
    _, endpoint = server
    request = b"GET /metrics HTTP/1.1\r\nX-Padding: " + b"a" * 10000 + b"\r\n\r\n"
    response = await raw_request(endpoint.port, request)

    assert response.startswith(b"HTTP/1.1 400 ")


async def test_metrics_server_close_stops_listening() -> None:
    """After close() the port refuses connections."""
    endpoint = MetricsServer(Metrics(), port=0)
    await endpoint.start()
    port = endpoint.port
    await endpoint.close()

    with pytest.raises(OSError, match=r"refused|Connect call failed"):
        await asyncio.open_connection("127.0.0.1", port)
