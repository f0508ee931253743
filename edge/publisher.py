"""MQTT publisher: results through a durable outbox, availability, reconnect with backoff.

Every frame result and event is committed to the outbox (:mod:`edge.outbox`) before it is
sent, and its row is deleted only when the broker's PUBACK arrives. While connected, one task
(``edge.mqtt``) sends rows in id order with at most ``mqtt.max_inflight`` unacknowledged, so
subscribers see results in order. After a reconnect or a restart it starts again from the
oldest row. Rows stored before the current connection carry ``"replayed": true``, and so
does a second copy of a message whose PUBACK was lost with the connection.

paho runs its network loop on its own thread, one fresh client per connection. Its callbacks
only hand their arguments to the event loop with ``call_soon_threadsafe``; an exception in
them is logged and never reaches paho's thread. The TCP connect and TLS handshake run in a
worker thread bounded by ``mqtt.connect_timeout``, so nothing here blocks the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode

from edge.config import MqttConfig, OutboxConfig
from edge.errors import PublishError
from edge.mqtt_client import (
    backoff_delay,
    build_client,
    default_client_id,
    read_password,
    tls_context,
)
from edge.outbox import AsyncOutbox, DropPolicy, OutboxStats
from edge.results import FrameResult

logger = logging.getLogger(__name__)

ONLINE = "online"
OFFLINE = "offline"
STOPPED = "stopped"

#: Seconds between time-to-live sweeps of the outbox while connected.
_EXPIRE_INTERVAL = 30.0
#: Seconds a clean exit waits for the PUBACK of the retained ``stopped`` message.
_STOPPED_ACK_WAIT = 2.0


@dataclass(frozen=True)
class PublisherStats:
    """Counters of the publisher since it started.

    Attributes:
        stored: Messages committed to the outbox.
        delivered: Messages acknowledged by the broker and deleted from the outbox.
        replayed: Sends marked ``replayed`` (after a reconnect, a restart or a lost PUBACK).
        depth: Messages in the outbox, including those in flight.
        inflight: Messages sent and not yet acknowledged.
        dropped_full: Messages dropped because the outbox reached its cap.
        dropped_expired: Messages deleted because they outlived the outbox time-to-live.
        store_failed: Messages lost because the outbox could not store them (disk errors).
        connected: Whether a connection is up now.
        connects: Successful connections.
        reconnects: Successful connections after the first one.
    """

    stored: int
    delivered: int
    replayed: int
    depth: int
    inflight: int
    dropped_full: int
    dropped_expired: int
    store_failed: int
    connected: bool
    connects: int
    reconnects: int


@dataclass(eq=False)
class _Connection:
    """State of one paho client from connect to disconnect."""

    client: mqtt.Client
    connack: asyncio.Future[ReasonCode]
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    #: paho message id to outbox row id, for the messages in flight.
    inflight: dict[int, int] = field(default_factory=dict)
    #: paho message ids of availability messages in flight.
    control: set[int] = field(default_factory=set)
    #: Rows with a lower id were stored before this connection and are sent as replayed.
    first_live_id: int = 0
    last_sent_id: int = 0


class _ConnectFailed(Exception):
    """Raised inside the publisher when one connection attempt fails."""


class MqttPublisher:
    """Publishes frame results, events and availability to one MQTT broker.

    Args:
        config: Broker address, credentials, topic prefix and client settings.
        device_id: Second topic level and the ``device_id`` of every payload.
        outbox_path: SQLite file of the outbox.
        outbox: Caps, time-to-live and drop policy of the outbox.
        discovery: Called on each connection and on each Home Assistant ``online`` with a
            function ``send(topic, payload)`` that publishes a retained message; ``None``
            sends no discovery messages.
    """

    def __init__(
        self,
        config: MqttConfig,
        device_id: str,
        outbox_path: Path,
        outbox: OutboxConfig | None = None,
        *,
        discovery: Callable[[Callable[[str, str], None]], None] | None = None,
    ) -> None:
        self._config = config
        self._device_id = device_id
        self._outbox_path = outbox_path
        self._outbox_config = outbox or OutboxConfig()
        self._discovery = discovery
        self._base = base = f"{config.topic_prefix}/{device_id}"
        self.frames_topic = f"{base}/frames"
        self.events_topic = f"{base}/events"
        self.stats_topic = f"{base}/stats"
        self.status_topic = f"{base}/status"
        self.client_id = config.client_id or default_client_id(device_id)
        self._password = read_password(config)
        self._tls: ssl.SSLContext | None = tls_context(config)
        self._outbox: AsyncOutbox | None = None
        self._task: asyncio.Task[None] | None = None
        self._conn: _Connection | None = None
        self._connected = asyncio.Event()
        self._wakeup = asyncio.Event()
        self._acked: list[int] = []
        self._stopping = False
        self._replayed = 0
        self._connects = 0
        self._store_failed = 0

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
        box = self._outbox.stats() if self._outbox is not None else _EMPTY_OUTBOX
        conn = self._conn
        return PublisherStats(
            stored=box.stored,
            delivered=box.acknowledged,
            replayed=self._replayed,
            depth=box.depth,
            inflight=len(conn.inflight) if conn is not None else 0,
            dropped_full=box.dropped_full,
            dropped_expired=box.dropped_expired,
            store_failed=self._store_failed,
            connected=self.connected,
            connects=self._connects,
            reconnects=max(0, self._connects - 1),
        )

    async def start(self) -> None:
        """Open the outbox and start connecting in the background.

        Raises:
            PublishError: The outbox cannot be opened or is used by another process.
        """
        box = self._outbox_config
        self._outbox = await AsyncOutbox.open(
            self._outbox_path,
            max_messages=box.max_messages,
            max_bytes=box.max_bytes,
            ttl=box.ttl or None,
            drop_policy=DropPolicy(box.drop_policy),
        )
        expired = await self._outbox.expire()
        depth = self._outbox.stats().depth
        logger.info(
            "outbox %s opened with %d messages to deliver (%d expired)",
            self._outbox_path,
            depth,
            expired,
        )
        self._task = asyncio.create_task(self._run(), name="edge.mqtt")
        logger.info("publisher started, connecting to %s as %s", self.endpoint, self.client_id)

    async def publish_frame(self, result: FrameResult) -> None:
        """Store one frame result in the outbox for delivery at QoS 1; returns once committed."""
        await self._store(self.frames_topic, result.to_json(self._device_id))

    async def publish_event(self, event: dict[str, Any]) -> None:
        """Store one tracker event (``events.schema.json``) for delivery at QoS 1."""
        await self._store(self.events_topic, _dumps(event))

    async def publish_state(self, name: str, data: dict[str, Any]) -> None:
        """Store a retained JSON state on ``{topic_prefix}/{device_id}/{name}`` (QoS 1)."""
        await self._store(f"{self._base}/{name}", _dumps(data), retain=True)

    def publish_stats_nowait(self, stats: dict[str, Any]) -> bool:
        """Send a stats message (``stats.schema.json``) at QoS 0 if connected; return whether.

        Stats are not stored in the outbox: an old snapshot is of no use after an outage.
        """
        return self._publish_nowait(self.stats_topic, _dumps(stats), qos=0)

    def publish_nowait(self, name: str, data: dict[str, Any]) -> bool:
        """Send JSON on ``{topic_prefix}/{device_id}/{name}`` at QoS 1 if connected, unstored.

        For messages that must not arrive late, such as Home Assistant tag scans.
        """
        return self._publish_nowait(f"{self._base}/{name}", _dumps(data), qos=1)

    def _publish_nowait(self, topic: str, payload: str, *, qos: int) -> bool:
        conn = self._conn
        if conn is None or not self.connected:
            return False
        info = conn.client.publish(topic, payload, qos=qos, retain=False)
        return info.rc == mqtt.MQTT_ERR_SUCCESS

    async def _store(self, topic: str, payload: str, *, retain: bool = False) -> None:
        if self._outbox is None:
            msg = "publisher not started; call start() first"
            raise PublishError(msg)
        try:
            await self._outbox.put(topic, payload.encode("utf-8"), retain=retain)
        except sqlite3.Error as exc:
            # Raising would stop the camera loop; dropping one message keeps the rest flowing.
            self._store_failed += 1
            logger.error(
                "storing a message for %s in the outbox %s failed, message lost: %s",
                topic,
                self._outbox_path,
                exc,
            )
            return
        self._wakeup.set()

    async def wait_connected(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for a connection; return whether there is one."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._connected.wait()
        return self.connected

    async def wait_drained(self, seconds: float) -> bool:
        """Wait up to ``seconds`` until the outbox is empty; return whether it is."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        # Acknowledgements update the counters on the event loop; polling them keeps the
        # acknowledgement path free of waiter bookkeeping.
        while self.stats().depth and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        return self.stats().depth == 0

    async def stop(self, grace: float | None = None) -> None:
        """Drain the outbox for up to ``grace`` seconds, publish ``stopped`` and disconnect.

        The drain is skipped when no connection came up during the run, so that a daemon
        without a broker exits at once. Its messages stay in the outbox for the next run.

        Args:
            grace: Seconds to wait for delivery; ``None`` uses ``mqtt.drain_grace``.
        """
        if self._task is None or self._outbox is None:
            return
        grace = self._config.drain_grace if grace is None else grace
        if self._connects and grace > 0:
            await self.wait_drained(grace)
        self._stopping = True
        conn = self._conn
        if conn is not None and self.connected:
            await self._publish_stopped(conn)
            conn.client.disconnect()
        else:
            self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        await self._delete_acked()
        left = self._outbox.stats().depth
        if left:
            logger.warning(
                "publisher stopped with %d messages in the outbox; they are sent on the next run",
                left,
            )
        await self._outbox.close()
        self._outbox = None
        logger.info("publisher stopped")

    async def _publish_stopped(self, conn: _Connection) -> None:
        info = conn.client.publish(self.status_topic, STOPPED, qos=1, retain=True)
        conn.control.add(info.mid)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _STOPPED_ACK_WAIT
        while info.mid in conn.control and not conn.closed.is_set():
            if loop.time() > deadline:
                logger.warning("broker %s did not acknowledge the stopped status", self.endpoint)
                return
            await asyncio.sleep(0.02)

    # Connection loop. The methods below run on the event loop.

    async def _run(self) -> None:
        attempt = 0
        while not self._stopping:
            try:
                conn = await self._connect()
            except _ConnectFailed as exc:
                delay = backoff_delay(
                    attempt, self._config.reconnect_min_delay, self._config.reconnect_max_delay
                )
                attempt += 1
                logger.warning(
                    "connecting to MQTT broker %s failed: %s; retrying in %.1f s",
                    self.endpoint,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            attempt = 0
            failed = False
            try:
                await self._serve(conn)
            except Exception:
                # An outbox error (a failing disk) ends this connection, not publishing for good.
                failed = True
                logger.exception("sending to MQTT broker %s failed; reconnecting", self.endpoint)
            finally:
                self._connected.clear()
                self._conn = None
                await _discard(conn.client)
            if failed:
                await asyncio.sleep(self._config.reconnect_max_delay)
            elif not self._stopping:
                logger.warning("lost connection to MQTT broker %s; reconnecting", self.endpoint)

    async def _connect(self) -> _Connection:
        """Open one connection and wait for a successful CONNACK."""
        loop = asyncio.get_running_loop()
        client = build_client(
            self._config,
            self.client_id,
            self.status_topic,
            OFFLINE,
            password=self._password,
            context=self._tls,
            max_inflight=self._config.max_inflight,
        )
        conn = _Connection(client=client, connack=loop.create_future())
        _bind_callbacks(self, conn, loop)
        opening = asyncio.create_task(
            asyncio.to_thread(self._open_socket, client), name="edge.mqtt.connect"
        )
        try:
            # paho bounds the TCP connect and the TLS handshake by connect_timeout, so the
            # worker thread ends on its own. Shielding it lets a cancellation wait for that.
            await asyncio.shield(opening)
            async with asyncio.timeout(self._config.connect_timeout):
                reason = await conn.connack
        except (OSError, ValueError) as exc:
            await _discard(client)
            raise _ConnectFailed(str(exc) or type(exc).__name__) from exc
        except TimeoutError:
            await _discard(client)
            msg = f"no CONNACK within {self._config.connect_timeout} s"
            raise _ConnectFailed(msg) from None
        except asyncio.CancelledError:
            with contextlib.suppress(OSError, ValueError):
                await opening
            await _discard(client)
            raise
        if reason.is_failure:
            await _discard(client)
            msg = f"broker rejected the connection: {reason}"
            raise _ConnectFailed(msg)
        return conn

    def _open_socket(self, client: mqtt.Client) -> None:
        """Connect and start paho's network thread; runs in a worker thread."""
        client.connect(self._config.host, self._config.port, keepalive=self._config.keepalive)
        client.loop_start()

    async def _serve(self, conn: _Connection) -> None:
        """Send availability, discovery and the outbox until the connection closes."""
        assert self._outbox is not None
        await self._delete_acked()
        conn.first_live_id = await self._outbox.next_id()
        self._conn = conn
        self._connects += 1
        self._connected.set()
        logger.info(
            "connected to MQTT broker %s (connection %d, %d messages queued)",
            self.endpoint,
            self._connects,
            self._outbox.stats().depth,
        )
        conn.client.publish(self.status_topic, ONLINE, qos=1, retain=True)
        if self._discovery is not None:
            conn.client.subscribe(f"{self._config.discovery_prefix}/status", qos=1)
            self._send_discovery(conn)
        await self._send_outbox(conn)

    async def _send_outbox(self, conn: _Connection) -> None:
        assert self._outbox is not None
        loop = asyncio.get_running_loop()
        next_expire = loop.time() + _EXPIRE_INTERVAL
        while not conn.closed.is_set():
            self._wakeup.clear()
            await self._delete_acked()
            if loop.time() >= next_expire:
                await self._outbox.expire()
                next_expire = loop.time() + _EXPIRE_INTERVAL
            room = self._config.max_inflight - len(conn.inflight)
            rows = await self._outbox.fetch(conn.last_sent_id, room) if room > 0 else []
            for row in rows:
                if conn.closed.is_set():
                    return
                payload = row.payload
                if row.id < conn.first_live_id:
                    payload = mark_replayed(payload)
                    self._replayed += 1
                info = conn.client.publish(row.topic, payload, qos=row.qos, retain=row.retain)
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    # The connection is going down; on_disconnect follows and ends this loop.
                    break
                conn.inflight[info.mid] = row.id
                conn.last_sent_id = row.id
            if rows and len(rows) == room:
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_EXPIRE_INTERVAL):
                    await self._wakeup.wait()

    async def _delete_acked(self) -> None:
        if self._acked and self._outbox is not None:
            ids, self._acked = self._acked, []
            await self._outbox.delete(ids)

    def _send_discovery(self, conn: _Connection) -> None:
        if self._discovery is None:
            return

        def send(topic: str, payload: str) -> None:
            conn.client.publish(topic, payload, qos=1, retain=True)

        try:
            self._discovery(send)
        except Exception:
            logger.exception("building Home Assistant discovery messages failed")

    # Handlers scheduled by the paho callbacks; they run on the event loop.

    def _handle_connack(self, conn: _Connection, reason: ReasonCode) -> None:
        if not conn.connack.done():
            conn.connack.set_result(reason)

    def _handle_disconnect(self, conn: _Connection, reason: ReasonCode) -> None:
        if not conn.connack.done():
            conn.connack.set_exception(ConnectionError(f"connection closed: {reason}"))
        conn.closed.set()
        self._connected.clear()
        self._wakeup.set()

    def _handle_puback(self, conn: _Connection, mid: int) -> None:
        row_id = conn.inflight.pop(mid, None)
        if row_id is not None:
            self._acked.append(row_id)
            self._wakeup.set()
        else:
            conn.control.discard(mid)

    def _handle_ha_status(self, conn: _Connection, payload: bytes) -> None:
        if payload.strip().lower() == b"online" and conn is self._conn:
            logger.info("Home Assistant came online; sending discovery messages again")
            self._send_discovery(conn)


_EMPTY_OUTBOX = OutboxStats(0, 0, 0, 0, 0, 0)


def _bind_callbacks(
    publisher: MqttPublisher, conn: _Connection, loop: asyncio.AbstractEventLoop
) -> None:
    """Route paho's callbacks for ``conn`` to the publisher's handlers on ``loop``."""

    def forward(handler: Callable[..., None], *args: object) -> None:
        # Runs on paho's thread: an exception here would stop its network loop, and a closed
        # event loop only means the daemon is exiting.
        try:
            loop.call_soon_threadsafe(handler, conn, *args)
        except RuntimeError:
            logger.debug("event loop closed; dropped an MQTT callback")
        except Exception:
            logger.exception("forwarding an MQTT callback failed")

    def on_connect(
        client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        forward(publisher._handle_connack, reason)

    def on_disconnect(
        client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        forward(publisher._handle_disconnect, reason)

    def on_publish(
        client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode, props: Any
    ) -> None:
        forward(publisher._handle_puback, mid)

    def on_message(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        forward(publisher._handle_ha_status, bytes(message.payload))

    conn.client.on_connect = on_connect
    conn.client.on_disconnect = on_disconnect
    conn.client.on_publish = on_publish
    conn.client.on_message = on_message


async def _discard(client: mqtt.Client) -> None:
    """Close a client's connection, if any, join its network thread and close its sockets."""
    with contextlib.suppress(Exception):
        client.disconnect()
    await asyncio.to_thread(client.loop_stop)
    # paho 2.2 closes the connection socket only from its network loop, which may never have
    # started, and the socket pair made by loop_start() only in Client.__del__; a garbage
    # collector run that finalises the sockets first then warns of unclosed sockets.
    with contextlib.suppress(Exception):
        client._reset_sockets()


def mark_replayed(payload: bytes) -> bytes:
    """Return the payload with its top-level ``replayed`` field set to true.

    Payloads that are not JSON objects with a ``replayed`` field are returned unchanged.
    """
    try:
        data = json.loads(payload)
    except ValueError:
        return payload
    if not isinstance(data, dict) or "replayed" not in data:
        return payload
    data["replayed"] = True
    return _dumps(data).encode("utf-8")


def _dumps(data: dict[str, Any]) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))
