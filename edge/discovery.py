"""Home Assistant MQTT discovery: the device, two sensors and a tag scanner.

Home Assistant reads retained JSON configs under ``{discovery_prefix}/{component}/{node}/...``
(format documented at https://www.home-assistant.io/integrations/mqtt/#mqtt-discovery). The
sensors show the last text and the last code read. They read retained JSON state topics that
the service updates on each ``first_seen`` event. A QR code seen for the first time is sent to
the tag topic as a tag scan.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from edge import __version__

LAST_TEXT = "last_text"
LAST_CODE = "last_code"
TAG = "tag"


def node_id(device_id: str) -> str:
    """Return the device id reduced to the characters Home Assistant accepts in a node id."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", device_id)


def discovery_messages(
    discovery_prefix: str, topic_prefix: str, device_id: str
) -> list[tuple[str, dict[str, Any]]]:
    """Return ``(topic, config)`` for every discovery message of this device."""
    node = node_id(device_id)
    base = f"{topic_prefix}/{device_id}"
    device = {
        "identifiers": [f"edge_{node}"],
        "name": f"edge {device_id}",
        "manufacturer": "edge",
        "model": "edge vision daemon",
        "sw_version": __version__,
    }
    # "stopped" after a clean exit means unavailable as well as the Last Will "offline".
    availability = {
        "availability_topic": f"{base}/status",
        "availability_template": "{{ 'online' if value == 'online' else 'offline' }}",
        "payload_available": "online",
        "payload_not_available": "offline",
    }
    sensors = [
        (LAST_TEXT, "Last text", "mdi:text-recognition"),
        (LAST_CODE, "Last code", "mdi:qrcode-scan"),
    ]
    messages: list[tuple[str, dict[str, Any]]] = []
    for key, name, icon in sensors:
        config = {
            "name": name,
            "unique_id": f"edge_{node}_{key}",
            "object_id": f"edge_{node}_{key}",
            "state_topic": f"{base}/{key}",
            "value_template": "{{ value_json.value[:255] }}",
            "json_attributes_topic": f"{base}/{key}",
            "icon": icon,
            "device": device,
            **availability,
        }
        messages.append((f"{discovery_prefix}/sensor/{node}/{key}/config", config))
    tag = {
        "topic": f"{base}/{TAG}",
        "value_template": "{{ value_json.value }}",
        "device": device,
    }
    messages.append((f"{discovery_prefix}/tag/{node}/qr/config", tag))
    return messages


def discovery_sender(
    discovery_prefix: str, topic_prefix: str, device_id: str
) -> Callable[[Callable[[str, str], None]], None]:
    """Return the callback that :class:`~edge.publisher.MqttPublisher` calls to send them."""
    messages = [
        (topic, json.dumps(config, separators=(",", ":")))
        for topic, config in discovery_messages(discovery_prefix, topic_prefix, device_id)
    ]

    def send_all(send: Callable[[str, str], None]) -> None:
        for topic, payload in messages:
            send(topic, payload)

    return send_all
