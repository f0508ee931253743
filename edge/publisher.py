"""MQTT publisher: one QoS 1 JSON message per frame, a retained availability topic.

paho-mqtt runs its network loop on its own thread; the event loop only hands messages to it
(``publish`` is thread-safe and does not block). Connecting never blocks the event loop either:
``connect_async`` plus paho's loop thread retries in the background with a capped backoff, so
the daemon starts and keeps working while no broker is reachable.

QoS 1 messages published while disconnected wait in paho's memory queue (bounded by
``max_queued``) and are sent after the next connect; messages beyond the bound are dropped and
counted.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from edge.config import MqttConfig
from edge.results import FrameResult

logger = logging.getLogger(__name__)

ONLINE = "online"
OFFLINE = "offline"
STOPPED = "stopped"


@dataclass(frozen=True)
class PublisherStats:
    """Counters of the publisher since it started."""

    published: int
    delivered: int
    pending: int
    dropped: int
    connected: bool
    connects: int


class MqttPublisher:
    """Publishes frame results and availability to one MQTT broker.

    Args:
        config: Broker address, topic prefix and client settings.
        device_id: Second topic level and the ``device_id`` of every payload.
        max_queued: Messages kept in memory while the broker is unreachable; more are dropped.
    """

    def __init__(self, config: MqttConfig, device_id: str, *, max_queued: int = 1000) -> None:
        self._config = config
        self._device_id = device_id
        base = f"{config.topic_prefix}/{device_id}"
        self.frames_topic = f"{base}/frames"
        self.status_topic = f"{base}/status"
        self._lock = threading.Lock()
        self._pending: set[int] = set()
        self._published = 0
        self._delivered = 0
        self._dropped = 0
        self._connects = 0
        self._connected = threading.Event()
        self._started = False
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=config.client_id or f"edge-{device_id}",
            protocol=mqtt.MQTTv311,
        )
        self._client.max_queued_messages_set(max_queued)
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        self._client.connect_timeout = config.connect_timeout
        self._client.will_set(self.status_topic, OFFLINE, qos=1, retain=True)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish

    @property
    def endpoint(self) -> str:
        """``host:port`` of the broker, for logs."""
        return f"{self._config.host}:{self._config.port}"

    @property
    def connected(self) -> bool:
        """Whether the broker has accepted the connection and it is still up."""
        return self._connected.is_set()

    def stats(self) -> PublisherStats:
        """Return a snapshot of the counters."""
        with self._lock:
            return PublisherStats(
                published=self._published,
                delivered=self._delivered,
                pending=len(self._pending),
                dropped=self._dropped,
                connected=self.connected,
                connects=self._connects,
            )

    def start(self) -> None:
        """Start connecting in the background; returns at once."""
        self._client.connect_async(
            self._config.host, self._config.port, keepalive=self._config.keepalive
        )
        self._client.loop_start()
        self._started = True
        logger.info("publisher started, connecting to %s", self.endpoint)

    def publish_frame(self, result: FrameResult) -> None:
        """Queue one frame result for delivery at QoS 1."""
        self._publish(self.frames_topic, result.to_json(self._device_id), retain=False)

    def _publish(self, topic: str, payload: str, *, retain: bool) -> None:
        with self._lock:
            info = self._client.publish(topic, payload, qos=1, retain=retain)
            if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
                self._dropped += 1
                logger.warning("MQTT queue full, dropped a message for %s", topic)
                return
            self._published += 1
            # on_publish for this mid cannot have run yet: it needs the lock held here.
            self._pending.add(info.mid)

    async def wait_connected(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for a connection; return whether there is one."""
        return await asyncio.to_thread(self._connected.wait, seconds)

    async def stop(self, grace: float = 5.0) -> None:
        """Publish ``stopped``, wait up to ``grace`` seconds for deliveries, then disconnect."""
        if not self._started:
            return
        if self.connected:
            self._publish(self.status_topic, STOPPED, retain=True)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + grace
            # Acknowledgements arrive on paho's thread; polling the counter keeps that thread
            # free of event-loop calls.
            while self.stats().pending and self.connected and loop.time() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        left = self.stats().pending
        if left:
            logger.warning("publisher stopped with %d messages not acknowledged", left)
        self._client.disconnect()
        await asyncio.to_thread(self._client.loop_stop)
        self._started = False
        logger.info("publisher stopped")

    # The callbacks below run on paho's network thread. An exception escaping them would be
    # logged by paho and stop its loop thread, so each one catches and logs its own errors.

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Any,
    ) -> None:
        try:
            if reason_code.is_failure:
                logger.warning("broker %s refused the connection: %s", self.endpoint, reason_code)
                return
            with self._lock:
                self._connects += 1
            self._connected.set()
            logger.info("connected to MQTT broker %s", self.endpoint)
            self._publish(self.status_topic, ONLINE, retain=True)
        except Exception:
            logger.exception("error in MQTT connect callback")

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Any,
    ) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        if was_connected and reason_code.is_failure:
            logger.warning("lost connection to MQTT broker %s: %s", self.endpoint, reason_code)

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Any,
    ) -> None:
        with self._lock:
            if mid in self._pending:
                self._pending.discard(mid)
                self._delivered += 1
