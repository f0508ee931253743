"""Configuration loading and validation."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from edge.config import MODELS_DIR, Config, load_config, parse_config
from edge.errors import ConfigError


def test_config_defaults_without_file() -> None:
    """No file gives the defaults: simulated camera, MQTT on localhost:1883, bundled model."""
    config = load_config(None)
    assert config.camera.kind == "simulated"
    assert config.mqtt.port == 1883
    assert config.detector.model == MODELS_DIR / "detector.onnx"


def test_config_file_values_and_relative_paths(tmp_path: Path) -> None:
    """Values from the file are used and relative paths resolve against the file's folder."""
    (tmp_path / "frames").mkdir()
    path = tmp_path / "edge.toml"
    path.write_text(
        '[device]\nid = "pi-7"\n'
        '[camera]\nkind = "simulated"\npath = "frames"\nfps = 5\nloop = true\n'
        '[mqtt]\nhost = "127.0.0.1"\nport = 1884\ntopic_prefix = "plant"\n'
    )
    config = load_config(path)
    assert config.device.id == "pi-7"
    assert config.camera.path == tmp_path / "frames"
    assert config.camera.fps == 5.0
    assert config.camera.loop is True
    assert config.mqtt.topic_prefix == "plant"


@pytest.mark.parametrize(
    ("data", "key"),
    [
        pytest.param({"mqtt": {"prot": 1883}}, "mqtt.prot", id="unknown-key"),
        pytest.param({"cammera": {}}, "cammera", id="unknown-section"),
        pytest.param({"mqtt": {"port": "1883"}}, "mqtt.port", id="string-for-int"),
        pytest.param({"mqtt": {"port": 70000}}, "mqtt.port", id="port-out-of-range"),
        pytest.param({"camera": {"loop": 1}}, "camera.loop", id="int-for-bool"),
        pytest.param({"camera": {"kind": "webcam"}}, "camera.kind", id="unknown-kind"),
        pytest.param({"camera": {"fps": -1}}, "camera.fps", id="negative-fps"),
        pytest.param({"camera": {"fps": float("nan")}}, "camera.fps", id="nan-fps"),
        pytest.param({"pipeline": {"concurrency": 0}}, "pipeline.concurrency", id="zero-limit"),
        pytest.param({"pipeline": {"op_timeout": 20.0}}, "pipeline.op_timeout", id="op-over-frame"),
        pytest.param({"readers": {"routes": {"text": "ocr"}}}, "readers.routes.text", id="reader"),
        pytest.param({"detector": {"model": "missing.onnx"}}, "detector.model", id="no-model"),
        pytest.param({"camera": {"path": "nowhere"}}, "camera.path", id="no-camera-path"),
        pytest.param({"logging": {"levels": {"edge": "LOUD"}}}, "logging.levels.edge", id="level"),
        pytest.param({"mqtt": []}, "mqtt", id="list-for-table"),
        pytest.param({"device": {"id": "pi/7"}}, "device.id", id="slash-in-device-id"),
        pytest.param({"mqtt": {"topic_prefix": "edge/#"}}, "mqtt.topic_prefix", id="wildcard"),
        pytest.param({"mqtt": {"protocol": "4"}}, "mqtt.protocol", id="mqtt-protocol"),
        pytest.param({"mqtt": {"max_inflight": 0}}, "mqtt.max_inflight", id="zero-inflight"),
        pytest.param(
            {"mqtt": {"reconnect_min_delay": 10.0, "reconnect_max_delay": 5.0}},
            "mqtt.reconnect_min_delay",
            id="backoff-min-over-max",
        ),
        pytest.param({"mqtt": {"ca_file": "no-ca.pem"}}, "mqtt.ca_file", id="no-ca-file"),
        pytest.param({"mqtt": {"cert_file": "c.pem"}}, "mqtt.key_file", id="cert-without-key"),
        pytest.param(
            {"mqtt": {"password_file": "edge.toml"}}, "mqtt.password_file", id="no-username"
        ),
        pytest.param({"outbox": {"max_messages": 0}}, "outbox.max_messages", id="zero-cap"),
        pytest.param({"outbox": {"ttl": -1}}, "outbox.ttl", id="negative-ttl"),
        pytest.param({"outbox": {"drop_policy": "drop_all"}}, "outbox.drop_policy", id="policy"),
        pytest.param({"outbox": {"path": ""}}, "outbox.path", id="empty-outbox-path"),
        pytest.param({"tracker": {"min_iou": 1.5}}, "tracker.min_iou", id="iou-over-one"),
        pytest.param({"tracker": {"gone_after": 0}}, "tracker.gone_after", id="zero-gone-after"),
        pytest.param({"detector": {"tile_scale": 0.5}}, "detector.tile_scale", id="tile-scale"),
        pytest.param({"detector": {"merge_classes": "text"}}, "detector.merge_classes", id="merge"),
        pytest.param(
            {"detector": {"merge_classes": [""]}}, "detector.merge_classes", id="merge-empty"
        ),
        pytest.param(
            {"readers": {"text": {"max_detect_pixels": 10}}},
            "readers.text.max_detect_pixels",
            id="detect-pixels",
        ),
    ],
)
def test_config_invalid_value_names_key(tmp_path: Path, data: dict[str, object], key: str) -> None:
    """Every invalid value is rejected with its dotted key path."""
    (tmp_path / "edge.toml").write_text("")
    with pytest.raises(ConfigError) as caught:
        parse_config(data, base_dir=tmp_path)
    assert caught.value.key == key
    assert str(caught.value).startswith(key)


def test_config_merge_classes(tmp_path: Path) -> None:
    """merge_classes defaults to the default model's classes; an empty array turns it off."""
    assert parse_config({}).detector.merge_classes == ("text", "qr_code", "barcode")
    config = parse_config({"detector": {"merge_classes": []}}, base_dir=tmp_path)
    assert config.detector.merge_classes == ()
    config = parse_config({"detector": {"merge_classes": ["text", "barcode"]}})
    assert config.detector.merge_classes == ("text", "barcode")


def test_config_missing_file_names_path(tmp_path: Path) -> None:
    """A missing file is a ConfigError naming the path."""
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match=r"absent\.toml"):
        load_config(path)


def test_config_invalid_toml_names_file(tmp_path: Path) -> None:
    """A syntax error is a ConfigError naming the file."""
    path = tmp_path / "bad.toml"
    path.write_text("[mqtt\nport = 1")
    with pytest.raises(ConfigError, match=r"invalid TOML in .*bad\.toml"):
        load_config(path)


def test_config_is_frozen() -> None:
    """Sections cannot be changed after load."""
    config = Config()
    with pytest.raises(AttributeError):
        config.mqtt.port = 1  # type: ignore[misc]


def test_config_mqtt_and_outbox_values(tmp_path: Path) -> None:
    """TLS, authentication and outbox keys load, with paths resolved against the file."""
    _make_certificate(tmp_path, "ca")
    (tmp_path / "password").write_text("")
    (tmp_path / "model.onnx").write_text("")
    path = tmp_path / "edge.toml"
    path.write_text(
        '[detector]\nmodel = "model.onnx"\n'
        '[mqtt]\nprotocol = "5"\nca_file = "ca.pem"\nusername = "edge"\n'
        'password_file = "password"\nmax_inflight = 5\n'
        '[outbox]\npath = "state/outbox.sqlite3"\nmax_messages = 10\nttl = 60\n'
        'drop_policy = "drop_newest"\n'
    )
    config = load_config(path)
    assert config.mqtt.protocol == "5"
    assert config.mqtt.ca_file == tmp_path / "ca.pem"
    assert config.mqtt.password_file == tmp_path / "password"
    assert config.outbox.path == tmp_path / "state" / "outbox.sqlite3"
    assert config.outbox.drop_policy == "drop_newest"
    assert config.outbox.ttl == 60.0


def test_config_outbox_defaults() -> None:
    """By default the outbox has a cap, a time-to-live of a week and drops the oldest."""
    config = Config()
    assert config.outbox.path is None
    assert config.outbox.max_messages == 50_000
    assert config.outbox.ttl == 7 * 24 * 3600.0
    assert config.outbox.drop_policy == "drop_oldest"
    assert config.mqtt.protocol == "3.1.1"


def _make_certificate(folder: Path, name: str) -> tuple[Path, Path]:
    """Create a self-signed certificate and its unencrypted key with openssl."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed for the TLS configuration tests")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN={name}"],
        cwd=folder, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return folder / f"{name}.pem", folder / f"{name}.key"


def test_config_tls_files_valid(tmp_path: Path) -> None:
    cert, key = _make_certificate(tmp_path, "client")
    mqtt = {"ca_file": str(cert), "cert_file": str(cert), "key_file": str(key)}
    config = parse_config({"mqtt": mqtt}, base_dir=tmp_path)
    assert config.mqtt.key_file == key


@pytest.mark.parametrize(
    ("broken", "key", "reason"),
    [
        pytest.param("ca_file", "mqtt.ca_file", "as PEM CA certificates", id="garbage-ca"),
        pytest.param("cert_file", "mqtt.cert_file", "as a PEM certificate", id="garbage-cert"),
        pytest.param("key_file", "mqtt.key_file", "as the private key", id="garbage-key"),
    ],
)
def test_config_invalid_tls_file_names_key(
    tmp_path: Path, broken: str, key: str, reason: str
) -> None:
    """A CA, certificate or key file that TLS cannot load is rejected at load time."""
    cert, private_key = _make_certificate(tmp_path, "client")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("this is not PEM\n")
    mqtt = {"ca_file": str(cert), "cert_file": str(cert), "key_file": str(private_key)}
    mqtt[broken] = str(garbage)
    with pytest.raises(ConfigError, match=reason) as caught:
        parse_config({"mqtt": mqtt}, base_dir=tmp_path)
    assert caught.value.key == key


def test_config_key_of_other_certificate_rejected(tmp_path: Path) -> None:
    cert, _ = _make_certificate(tmp_path, "client")
    _, other_key = _make_certificate(tmp_path, "other")
    mqtt = {"tls": True, "cert_file": str(cert), "key_file": str(other_key)}
    with pytest.raises(ConfigError, match="matches the certificate") as caught:
        parse_config({"mqtt": mqtt}, base_dir=tmp_path)
    assert caught.value.key == "mqtt.key_file"


def test_config_encrypted_key_rejected(tmp_path: Path) -> None:
    """An encrypted key is rejected instead of making OpenSSL prompt for its password."""
    cert, key = _make_certificate(tmp_path, "client")
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(
        ["openssl", "pkey", "-in", str(key), "-aes256", "-passout", "pass:secret",
         "-out", str(encrypted)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    mqtt = {"tls": True, "cert_file": str(cert), "key_file": str(encrypted)}
    with pytest.raises(ConfigError, match="is encrypted") as caught:
        parse_config({"mqtt": mqtt}, base_dir=tmp_path)
    assert caught.value.key == "mqtt.key_file"


def test_config_empty_passphrase_key_rejected(tmp_path: Path) -> None:
    """A key encrypted with an empty passphrase is rejected too, as the publisher would."""
    cert, key = _make_certificate(tmp_path, "client")
    encrypted = tmp_path / "empty-passphrase.key"
    subprocess.run(
        ["openssl", "pkcs8", "-topk8", "-in", str(key), "-passout", "pass:",
         "-out", str(encrypted)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    assert b"ENCRYPTED" in encrypted.read_bytes()
    mqtt = {"tls": True, "cert_file": str(cert), "key_file": str(encrypted)}
    with pytest.raises(ConfigError, match="is encrypted") as caught:
        parse_config({"mqtt": mqtt}, base_dir=tmp_path)
    assert caught.value.key == "mqtt.key_file"


def test_config_tls_files_unchecked_without_tls(tmp_path: Path) -> None:
    """Certificate files that the publisher would not use (TLS off) are not parsed."""
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("this is not PEM\n")
    mqtt = {"cert_file": str(garbage), "key_file": str(garbage)}
    config = parse_config({"mqtt": mqtt}, base_dir=tmp_path)
    assert config.mqtt.cert_file == garbage


def test_config_truncated_certificate_names_cert(tmp_path: Path) -> None:
    cert, key = _make_certificate(tmp_path, "client")
    text = cert.read_text()
    cert.write_text(text[: len(text) // 2] + "\n-----END CERTIFICATE-----\n")
    mqtt = {"tls": True, "cert_file": str(cert), "key_file": str(key)}
    with pytest.raises(ConfigError) as caught:
        parse_config({"mqtt": mqtt}, base_dir=tmp_path)
    assert caught.value.key == "mqtt.cert_file"


def test_config_unreadable_file_names_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A certificate the daemon's user may not read is rejected with the OS reason.

    The tests run as root, which can read any file, so the permission error is raised by a
    patched ``Path.open`` for that one file.
    """
    cert, key = _make_certificate(tmp_path, "client")
    original_open = Path.open

    def open_denied(self: Path, *args: object, **kwargs: object) -> object:
        if self == key:
            raise PermissionError(13, "Permission denied", str(self))
        return original_open(self, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(Path, "open", open_denied)
    mqtt = {"tls": True, "cert_file": str(cert), "key_file": str(key)}
    with pytest.raises(ConfigError, match=r"cannot read .*Permission denied") as caught:
        parse_config({"mqtt": mqtt}, base_dir=tmp_path)
    assert caught.value.key == "mqtt.key_file"


def test_config_rewrite_models_reaches_reader() -> None:
    from edge.factory import build_readers

    config = parse_config({"readers": {"text": {"rewrite_models": False}}})
    reader = build_readers(config)["text"]

    assert config.readers.text.rewrite_models is False
    assert getattr(reader, "rewrite_models", None) is False


@pytest.mark.parametrize("concurrency", [1, 3])
def test_config_concurrency_sets_ocr_workers(concurrency: int) -> None:
    """The text reader gets one model-run worker per concurrent read."""
    from edge.factory import build_readers

    config = parse_config({"pipeline": {"concurrency": concurrency}})
    assert getattr(build_readers(config)["text"], "workers", None) == concurrency
