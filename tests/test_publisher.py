"""Publisher set-up: TLS, authentication, MQTT v5, client ids, credentials, callbacks."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import sqlite3
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from conftest import Broker, BrokerProcess, free_port
from mqtt_helpers import Recorder, synthetic_result, tally
from paho.mqtt.enums import CallbackAPIVersion

from edge.config import MqttConfig, OutboxConfig
from edge.mqtt_client import backoff_delay, default_client_id, read_password
from edge.publisher import MqttPublisher, _bind_callbacks, _Connection, mark_replayed
from edge.service import outbox_path

#: Password of the test broker's only user.
PASSWORD = "s3cret-Pa55"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=120)


def _make_pki(folder: Path) -> None:
    """Create a test CA, a server certificate for 127.0.0.1 and a client certificate."""
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", "/CN=edge test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=folder,
    )  # fmt: skip
    (folder / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    (folder / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name, ext in (("server", "server.ext"), ("client", "client.ext")):
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", "-subj", f"/CN=edge test {name}",
            cwd=folder,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", ext,
            cwd=folder,
        )  # fmt: skip


@pytest.fixture
async def tls_broker(tmp_path: Path) -> AsyncIterator[BrokerProcess]:
    """A mosquitto with TLS, a required client certificate and password authentication."""
    if shutil.which("openssl") is None or shutil.which("mosquitto_passwd") is None:
        pytest.fail("openssl and mosquitto_passwd are needed for the TLS tests")
    folder = tmp_path / "tls-broker"
    folder.mkdir()
    await asyncio.to_thread(_make_pki, folder)
    passwords = folder / "passwd"
    await asyncio.to_thread(
        subprocess.run,
        ["mosquitto_passwd", "-b", "-c", str(passwords), "edge", PASSWORD],
        check=True,
        capture_output=True,
        timeout=60,
    )
    port_holder = BrokerProcess(folder)
    conf = (
        f"listener {port_holder.port} 127.0.0.1\n"
        f"cafile {folder / 'ca.pem'}\ncertfile {folder / 'server.pem'}\n"
        f"keyfile {folder / 'server.key'}\nrequire_certificate true\n"
        f"allow_anonymous false\npassword_file {passwords}\n"
    )
    broker = BrokerProcess(folder, extra_conf=conf, port=port_holder.port)
    await asyncio.to_thread(broker.start)
    yield broker
    await asyncio.to_thread(broker.stop)


def _tls_config(broker: BrokerProcess, prefix: str, **overrides: object) -> MqttConfig:
    folder = broker.workdir
    (folder / "password").write_text(PASSWORD + "\n")
    options: dict[str, object] = {
        "host": broker.host,
        "port": broker.port,
        "topic_prefix": prefix,
        "ca_file": folder / "ca.pem",
        "cert_file": folder / "client.pem",
        "key_file": folder / "client.key",
        "username": "edge",
        "password_file": folder / "password",
        "reconnect_min_delay": 0.2,
        "reconnect_max_delay": 1.0,
        **overrides,
    }
    return MqttConfig(**options)  # type: ignore[arg-type]


def _recorder_tls(folder: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(folder / "ca.pem"))
    context.load_cert_chain(str(folder / "client.pem"), str(folder / "client.key"))
    return context


@pytest.mark.broker
async def test_publisher_tls_with_password_delivers(
    tmp_path: Path, tls_broker: BrokerProcess, topic_prefix: str
) -> None:
    """Over TLS with a client certificate and a password, every result arrives."""
    recorder = await asyncio.to_thread(
        Recorder,
        tls_broker.host,
        tls_broker.port,
        f"{topic_prefix}/#",
        tls=_recorder_tls(tls_broker.workdir),
        username="edge",
        password=PASSWORD,
    )
    publisher = MqttPublisher(_tls_config(tls_broker, topic_prefix), "pi", tmp_path / "o.db")
    await publisher.start()
    sent = 50
    for seq in range(sent):
        await publisher.publish_frame(synthetic_result(seq))
    drained = await publisher.wait_drained(120)
    await publisher.stop()
    frames_arrived = await asyncio.to_thread(
        recorder.wait_for, lambda: len(recorder.on("/frames")) >= sent, 60
    )
    await asyncio.to_thread(recorder.close)

    figures = tally(recorder.on("/frames"), sent)
    print(figures.line("TLS and password"))
    assert drained
    assert frames_arrived
    assert figures.lost == 0


@pytest.mark.broker
async def test_publisher_wrong_password_not_logged(
    tmp_path: Path,
    tls_broker: BrokerProcess,
    topic_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A rejected password keeps the publisher retrying, and no log line contains it."""
    caplog.set_level(logging.DEBUG)
    config = _tls_config(tls_broker, topic_prefix)
    wrong = "wrong-" + PASSWORD
    assert config.password_file is not None
    config.password_file.write_text(wrong)
    publisher = MqttPublisher(config, "pi", tmp_path / "o.db")
    await publisher.start()
    connected = await publisher.wait_connected(5)
    await publisher.stop(grace=0)
    assert not connected
    assert "rejected the connection" in caplog.text
    assert wrong not in caplog.text


@pytest.mark.broker
async def test_publisher_untrusted_ca_not_connected(
    tmp_path: Path,
    tls_broker: BrokerProcess,
    topic_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A broker certificate from another CA fails the handshake with a logged reason."""
    other = tmp_path / "other-ca"
    other.mkdir()
    await asyncio.to_thread(_make_pki, other)
    config = _tls_config(tls_broker, topic_prefix, ca_file=other / "ca.pem")
    publisher = MqttPublisher(config, "pi", tmp_path / "o.db")
    await publisher.start()
    connected = await publisher.wait_connected(5)
    await publisher.stop(grace=0)
    assert not connected
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.text


@pytest.mark.broker
async def test_publisher_mqtt5_delivers(tmp_path: Path, broker: Broker, topic_prefix: str) -> None:
    """With protocol 5 the publisher connects and its results arrive."""
    recorder = await asyncio.to_thread(Recorder, broker.host, broker.port, f"{topic_prefix}/#")
    config = MqttConfig(host=broker.host, port=broker.port, topic_prefix=topic_prefix, protocol="5")
    publisher = MqttPublisher(config, "pi", tmp_path / "o.db")
    await publisher.start()
    for seq in range(10):
        await publisher.publish_frame(synthetic_result(seq))
    drained = await publisher.wait_drained(120)
    await publisher.stop()
    await asyncio.to_thread(recorder.wait_for, lambda: len(recorder.on("/frames")) >= 10, 60)
    await asyncio.to_thread(recorder.close)
    assert drained
    assert tally(recorder.on("/frames"), 10).lost == 0


@pytest.mark.broker
async def test_publisher_discovery_resent_on_ha_online(
    tmp_path: Path, broker: Broker, topic_prefix: str
) -> None:
    """Discovery configs go out on connect and again when Home Assistant sends online."""
    ha_prefix = f"{topic_prefix}/ha"
    recorder = await asyncio.to_thread(Recorder, broker.host, broker.port, f"{ha_prefix}/#")
    config = MqttConfig(
        host=broker.host,
        port=broker.port,
        topic_prefix=topic_prefix,
        discovery=True,
        discovery_prefix=ha_prefix,
    )
    from edge.discovery import discovery_sender

    sender = discovery_sender(ha_prefix, topic_prefix, "pi")
    publisher = MqttPublisher(config, "pi", tmp_path / "o.db", discovery=sender)
    await publisher.start()
    assert await publisher.wait_connected(30)
    await asyncio.to_thread(recorder.wait_for, lambda: len(recorder.on("/config")) >= 3, 30)
    first = len(recorder.on("/config"))
    helper = mqtt.Client(CallbackAPIVersion.VERSION2)
    await asyncio.to_thread(helper.connect, broker.host, broker.port)
    helper.loop_start()
    helper.publish(f"{ha_prefix}/status", "online", qos=1).wait_for_publish(30)
    helper.disconnect()
    await asyncio.to_thread(helper.loop_stop)
    helper._reset_sockets()
    resent = await asyncio.to_thread(
        recorder.wait_for, lambda: len(recorder.on("/config")) >= 2 * first, 30
    )
    await publisher.stop()
    await asyncio.to_thread(recorder.close)
    late = await asyncio.to_thread(Recorder, broker.host, broker.port, f"{ha_prefix}/+/+/+/config")
    await asyncio.to_thread(late.wait_for, lambda: len(late.messages) >= first, 30)
    await asyncio.to_thread(late.close)
    configs = [json.loads(m.payload) for m in recorder.on("/config")]
    assert first == 3
    assert resent
    assert [m.retain for m in late.messages] == [True] * first
    assert configs[0]["availability_topic"] == f"{topic_prefix}/pi/status"
    assert {c["device"]["identifiers"][0] for c in configs} == {"edge_pi"}


def test_default_client_id_uses_machine_id(tmp_path: Path) -> None:
    """Two machines with the same device id get different client ids."""
    first = tmp_path / "a"
    second = tmp_path / "b"
    first.write_text("0123456789abcdef0123456789abcdef\n")
    second.write_text("fedcba9876543210fedcba9876543210\n")
    assert default_client_id("pi", first) != default_client_id("pi", second)
    assert default_client_id("pi", first).startswith("edge-pi-")


def test_default_client_id_without_machine_id(tmp_path: Path) -> None:
    """Without a readable machine id the client id is edge-{device_id}."""
    assert default_client_id("pi", tmp_path / "missing") == "edge-pi"


def test_read_password_prefers_credential(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The systemd credential wins over the password file and the environment."""
    (tmp_path / "mqtt-password").write_text("from-credential\n")
    (tmp_path / "file").write_text("from-file")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    monkeypatch.setenv("EDGE_MQTT_PASSWORD", "from-env")
    config = MqttConfig(username="edge", password_file=tmp_path / "file")
    assert read_password(config) == "from-credential"


def test_read_password_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a credential or a file, the environment variable is used."""
    monkeypatch.setenv("EDGE_MQTT_PASSWORD", "from-env")
    assert read_password(MqttConfig(username="edge")) == "from-env"


def test_read_password_without_username() -> None:
    """No user name means no password at all."""
    assert read_password(MqttConfig()) is None


def test_backoff_delay_stays_under_cap() -> None:
    """Delays never exceed the cap, and grow with the attempt number up to it."""
    delays = [backoff_delay(attempt, 1.0, 30.0) for attempt in range(50) for _ in range(20)]
    assert max(delays) <= 30.0
    assert max(backoff_delay(0, 1.0, 30.0) for _ in range(200)) <= 1.0


def test_mark_replayed_rewrites_flag_only() -> None:
    """mark_replayed sets replayed and keeps every other field, captured_at included."""
    payload = synthetic_result(3, captured_at=1_700_000_000.0).to_json("pi").encode()
    marked = json.loads(mark_replayed(payload))
    original = json.loads(payload)
    assert marked["replayed"] is True
    assert marked["frame"] == original["frame"]


def test_mark_replayed_leaves_other_payloads() -> None:
    """Payloads without a replayed field pass unchanged."""
    assert mark_replayed(b"online") == b"online"


async def test_callback_after_loop_closed_is_harmless(tmp_path: Path) -> None:
    """A paho callback arriving after the event loop closed neither raises nor blocks."""
    publisher = MqttPublisher(MqttConfig(), "pi", tmp_path / "o.db")
    other = asyncio.new_event_loop()
    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    conn = _Connection(client=client, connack=other.create_future())
    _bind_callbacks(publisher, conn, other)
    other.close()
    on_publish: Any = client.on_publish
    on_publish(client, None, 1, None, None)


def test_outbox_path_prefers_state_directory(tmp_path: Path) -> None:
    """Under systemd the outbox goes to the first StateDirectory, even with outbox.path set."""
    config = OutboxConfig(path=tmp_path / "configured.sqlite3")
    path = outbox_path(config, {"STATE_DIRECTORY": "/var/lib/edge:/var/lib/other"})
    assert path == Path("/var/lib/edge/outbox.sqlite3")


def test_outbox_path_uses_configured_path(tmp_path: Path) -> None:
    """Without STATE_DIRECTORY the configured path is used."""
    config = OutboxConfig(path=tmp_path / "configured.sqlite3")
    assert outbox_path(config, {}) == tmp_path / "configured.sqlite3"


def test_outbox_path_defaults_per_user() -> None:
    """Without either, the outbox is in XDG_STATE_HOME/edge."""
    path = outbox_path(OutboxConfig(), {"XDG_STATE_HOME": "/home/pi/.state"})
    assert path == Path("/home/pi/.state/edge/outbox.sqlite3")


async def test_publisher_store_error_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A disk error while storing loses that message only: counted, logged, no exception."""
    config = MqttConfig(host="127.0.0.1", port=free_port())
    publisher = MqttPublisher(config, "pi", tmp_path / "o.db")
    await publisher.start()
    assert publisher._outbox is not None

    def fail(*args: object, **kwargs: object) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(publisher._outbox.outbox, "put", fail)
    await publisher.publish_frame(synthetic_result(0))
    stats = publisher.stats()
    await publisher.stop(grace=0)
    assert stats.store_failed == 1
    assert "disk I/O error" in caplog.text
