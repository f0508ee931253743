"""Counters of the running daemon, published on the ``stats`` topic (``stats.schema.json``)."""

from __future__ import annotations

import math
import time
from typing import Any

from edge.publisher import PublisherStats
from edge.results import SCHEMA_VERSION, FrameResult, format_timestamp

_STATUSES = ("ok", "empty", "timeout", "error")
#: Latencies kept per interval; older ones are overwritten, so memory stays bounded.
_MAX_SAMPLES = 10_000


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile (``fraction`` in 0..1) of a sorted, non-empty list."""
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


class StatsCollector:
    """Counts frames and region outcomes and builds the stats payload.

    Frame and reader counters run from the start of the daemon; latency percentiles cover the
    frames since the previous payload.

    Args:
        device_id: ``device_id`` of every payload.
    """

    def __init__(self, device_id: str) -> None:
        self._device_id = device_id
        self._started = time.monotonic()
        self._last_report = self._started
        self._frames = 0
        self._latencies: list[float] = []
        self._next_sample = 0
        self._readers: dict[str, dict[str, int]] = {}

    def add(self, result: FrameResult) -> None:
        """Count one frame result."""
        self._frames += 1
        total = result.timings_ms.get("total", 0.0)
        if len(self._latencies) < _MAX_SAMPLES:
            self._latencies.append(total)
        else:
            self._latencies[self._next_sample] = total
            self._next_sample = (self._next_sample + 1) % _MAX_SAMPLES
        for region in result.regions:
            if region.reader is None:
                continue
            counts = self._readers.setdefault(region.reader, dict.fromkeys(_STATUSES, 0))
            counts[str(region.status)] += 1

    def payload(self, camera_dropped: int, publisher: PublisherStats | None) -> dict[str, Any]:
        """Build the stats payload and start a new latency interval."""
        now = time.monotonic()
        latencies = sorted(self._latencies)
        self._latencies = []
        self._next_sample = 0
        latency: dict[str, Any] = {"count": len(latencies)}
        for name, fraction in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
            latency[name] = round(percentile(latencies, fraction), 2) if latencies else None
        latency["max"] = round(latencies[-1], 2) if latencies else None
        interval = now - self._last_report
        self._last_report = now
        data: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "device_id": self._device_id,
            "sent_at": format_timestamp(time.time()),
            "uptime_s": round(now - self._started, 1),
            "interval_s": round(interval, 1),
            "frames": {"processed": self._frames, "dropped": camera_dropped},
            "latency_ms": latency,
            "readers": {name: dict(counts) for name, counts in sorted(self._readers.items())},
        }
        if publisher is not None:
            data["outbox"] = {
                "depth": publisher.depth,
                "inflight": publisher.inflight,
                "stored": publisher.stored,
                "delivered": publisher.delivered,
                "replayed": publisher.replayed,
                "dropped_full": publisher.dropped_full,
                "dropped_expired": publisher.dropped_expired,
                "store_failed": publisher.store_failed,
            }
            data["mqtt"] = {
                "connected": publisher.connected,
                "connects": publisher.connects,
                "reconnects": publisher.reconnects,
            }
        return data
