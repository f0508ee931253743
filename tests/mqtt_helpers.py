"""Test support for MQTT delivery: a recording subscriber, synthetic results, tallies."""

from __future__ import annotations

import json
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge.results import (
    Box,
    Code,
    FrameResult,
    Reading,
    Region,
    RegionResult,
    RegionStatus,
    TextLine,
)


@dataclass(frozen=True)
class Received:
    """One message as the subscriber got it."""

    topic: str
    payload: bytes
    retain: bool
    dup: bool


class Recorder:
    """A QoS 1 subscriber with a persistent session that reconnects on its own.

    Its session survives a broker restart (the test broker persists it), so that messages the
    broker accepted while the subscriber was reconnecting are still delivered to it.
    """

    def __init__(
        self,
        host: str,
        port: int,
        topic: str,
        *,
        tls: ssl.SSLContext | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.messages: list[Received] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._topic = topic
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"rec-{uuid.uuid4().hex[:12]}",
            clean_session=False,
        )
        self._client.reconnect_delay_set(1, 2)
        if tls is not None:
            self._client.tls_set_context(tls)
        if username is not None:
            self._client.username_pw_set(username, password)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = lambda *_: self._subscribed.set()
        self._client.on_message = self._on_message
        self._client.connect(host, port)
        self._client.loop_start()
        assert self._subscribed.wait(20), "subscription not acknowledged"

    def _on_connect(self, client: mqtt.Client, *_: Any) -> None:
        client.subscribe(self._topic, qos=1)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(Received(msg.topic, bytes(msg.payload), msg.retain, bool(msg.dup)))

    def on(self, suffix: str) -> list[Received]:
        """Return the messages whose topic ends with ``suffix``, in arrival order."""
        with self._lock:
            return [m for m in self.messages if m.topic.endswith(suffix)]

    def wait_for(self, condition: Callable[[], bool], seconds: float) -> bool:
        """Poll ``condition`` until it is true or ``seconds`` pass; return its last value."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if condition():
                return True
            time.sleep(0.1)
        return condition()

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self._client.disconnect()
        self._client.loop_stop()
        # paho 2.2 closes the socket pair of loop_start() only in Client.__del__.
        self._client._reset_sockets()


def synthetic_result(seq: int, *, captured_at: float | None = None) -> FrameResult:
    """Return a frame result with one QR code region and one text region."""
    code = Code("QRCODE", f"item-{seq}".encode(), f"item-{seq}", Box(10, 10, 50, 50))
    qr = RegionResult(
        Region("qr_code", 0.9, Box(5, 5, 60, 60)),
        "codes",
        RegionStatus.OK,
        Reading(codes=(code,)),
        elapsed_ms=1.5,
    )
    text = RegionResult(
        Region("text", 0.8, Box(100, 100, 200, 40)),
        "text",
        RegionStatus.OK,
        Reading(lines=(TextLine("BEST BEFORE 2027-01-01", 0.95, Box(100, 100, 200, 40)),)),
        elapsed_ms=12.0,
    )
    return FrameResult(
        seq=seq,
        captured_at=time.time() if captured_at is None else captured_at,
        width=640,
        height=480,
        source="synthetic",
        regions=(qr, text),
        timings_ms={"detect": 5.0, "read": 12.0, "total": 17.0},
    )


@dataclass
class Tally:
    """Delivery figures of a run of frame results with ``seq`` 0..sent-1.

    Attributes:
        sent: Results handed to the publisher.
        delivered: Distinct results that reached the subscriber.
        duplicated: Copies beyond the first.
        lost: Results that never arrived.
        unmarked_duplicates: Copies beyond the first that carry neither ``replayed`` nor the
            MQTT DUP flag.
        out_of_order: First copies that arrived after a higher ``seq``.
        replayed: Messages marked ``replayed``.
    """

    sent: int
    delivered: int = 0
    duplicated: int = 0
    lost: int = 0
    unmarked_duplicates: int = 0
    out_of_order: int = 0
    replayed: int = 0
    lost_seqs: list[int] = field(default_factory=list)

    def line(self, name: str) -> str:
        """Return the figures as one printable line."""
        return (
            f"{name}: sent {self.sent}, delivered {self.delivered}, duplicated "
            f"{self.duplicated}, lost {self.lost}, replayed-marked {self.replayed}"
        )


def tally(messages: list[Received], sent: int) -> Tally:
    """Count delivered, duplicated, lost and out-of-order results among frame messages."""
    result = Tally(sent=sent)
    seen: set[int] = set()
    highest = -1
    for message in messages:
        payload = json.loads(message.payload)
        seq = payload["frame"]["seq"]
        if payload["replayed"]:
            result.replayed += 1
        if seq in seen:
            result.duplicated += 1
            if not payload["replayed"] and not message.dup:
                result.unmarked_duplicates += 1
            continue
        seen.add(seq)
        if seq < highest:
            result.out_of_order += 1
        highest = max(highest, seq)
    result.delivered = len(seen)
    result.lost_seqs = sorted(set(range(sent)) - seen)
    result.lost = len(result.lost_seqs)
    return result
