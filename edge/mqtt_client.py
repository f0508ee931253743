"""Set-up of one paho client per connection attempt: client id, protocol, TLS, credentials.

The publisher makes a fresh client for every connection, so that paho keeps no in-flight
messages of its own across a reconnect: the outbox alone decides what is sent again, and it
marks those messages as replayed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import socket
import ssl
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge.config import MqttConfig
from edge.errors import PublishError
from edge.tls import TlsFileError, build_tls_context, uses_tls

logger = logging.getLogger(__name__)

#: Name of the systemd credential (``LoadCredential=mqtt-password:...``) holding the password.
PASSWORD_CREDENTIAL = "mqtt-password"
#: Environment variable read for the password when no credential or file provides one.
PASSWORD_ENV = "EDGE_MQTT_PASSWORD"
_MACHINE_ID = Path("/etc/machine-id")


def default_client_id(device_id: str, machine_id_file: Path = _MACHINE_ID) -> str:
    """Return ``edge-{device_id}-{8 hex digits of the machine id}``.

    Two devices left with the same host name (``raspberrypi``) would otherwise take each
    other's session on the broker. Without a readable machine id the suffix is left out.
    """
    try:
        machine_id = machine_id_file.read_text("ascii").strip()
    except (OSError, UnicodeDecodeError):
        machine_id = ""
    if not machine_id:
        return f"edge-{device_id}"
    digest = hashlib.sha256(machine_id.encode("ascii")).hexdigest()[:8]
    return f"edge-{device_id}-{digest}"


def read_password(config: MqttConfig) -> str | None:
    """Return the broker password, or ``None`` when no user name is configured.

    Sources in order: the ``mqtt-password`` credential in ``$CREDENTIALS_DIRECTORY``, the
    file ``mqtt.password_file``, the environment variable ``EDGE_MQTT_PASSWORD``.

    Raises:
        PublishError: A password file exists but cannot be read.
    """
    if config.username is None:
        return None
    candidates: list[Path] = []
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials:
        candidates.append(Path(credentials) / PASSWORD_CREDENTIAL)
    if config.password_file is not None:
        candidates.append(config.password_file)
    for path in candidates:
        if not path.exists():
            continue
        try:
            # A trailing newline is an artefact of editors and `echo`, never part of a password.
            return path.read_text("utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            msg = f"cannot read the MQTT password file {path}: {exc}"
            raise PublishError(msg) from exc
    return os.environ.get(PASSWORD_ENV)


def tls_context(config: MqttConfig) -> ssl.SSLContext | None:
    """Build the TLS context for the broker, or return ``None`` when TLS is off.

    Raises:
        PublishError: A certificate or key file is invalid.
    """
    if not uses_tls(config):
        return None
    try:
        return build_tls_context(config)
    except TlsFileError as exc:
        msg = f"{exc.key}: {exc}"
        raise PublishError(msg) from exc


class _Client(mqtt.Client):
    """paho client that closes the TLS socket when the handshake fails.

    paho-mqtt 2.2.0 ``Client._ssl_wrap_socket`` leaves the wrapped socket open when
    ``do_handshake()`` raises (an untrusted certificate, a timeout), so every failed attempt
    leaks a file descriptor until garbage collection.
    """

    def _ssl_wrap_socket(self, tcp_sock: socket.socket) -> ssl.SSLSocket:
        context = self._ssl_context
        if context is None:
            msg = "TLS requested without an SSL context"
            raise ValueError(msg)
        ssl_sock = context.wrap_socket(
            tcp_sock, server_hostname=self._host, do_handshake_on_connect=False
        )
        try:
            ssl_sock.settimeout(self._connect_timeout)
            ssl_sock.do_handshake()
        except BaseException:
            ssl_sock.close()
            raise
        # tls_context() builds contexts with check_hostname on, so the handshake has already
        # matched the certificate to the host name.
        return ssl_sock


def build_client(
    config: MqttConfig,
    client_id: str,
    will_topic: str,
    will_payload: str,
    *,
    password: str | None,
    context: ssl.SSLContext | None,
    max_inflight: int,
) -> mqtt.Client:
    """Create a paho client that does not reconnect on its own; callbacks are left to the caller."""
    protocol = mqtt.MQTTv5 if config.protocol == "5" else mqtt.MQTTv311
    client = _Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=protocol,
        reconnect_on_failure=False,
    )
    client.connect_timeout = config.connect_timeout
    client.max_inflight_messages_set(max_inflight)
    # Messages beyond the in-flight window stay in the outbox, not in paho's memory; this bound
    # only matters for availability and discovery messages.
    client.max_queued_messages_set(max_inflight + 100)
    client.will_set(will_topic, will_payload, qos=1, retain=True)
    if config.username is not None:
        client.username_pw_set(config.username, password)
    if context is not None:
        client.tls_set_context(context)
    return client


def backoff_delay(attempt: int, min_delay: float, max_delay: float) -> float:
    """Return the delay before reconnect ``attempt`` (0 for the first), with full jitter.

    The cap doubles from ``min_delay`` per attempt up to ``max_delay``. The delay is drawn
    uniformly below the cap, so that many devices do not reconnect in step after an outage.
    """
    cap = min(max_delay, min_delay * 2 ** min(attempt, 32))
    return max(0.01, random.uniform(0, cap))
