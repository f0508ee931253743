"""Typed, validated daemon configuration loaded from TOML.

Every section is a frozen dataclass. :func:`load_config` rejects unknown keys, wrong types and
out-of-range values with a :class:`~edge.errors.ConfigError` naming the dotted key path, so a
bad file fails at start instead of in the middle of the night.
"""

from __future__ import annotations

import dataclasses
import math
import socket
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edge.errors import ConfigError
from edge.tls import TlsFileError, build_tls_context, uses_tls

#: Folder of the default detector shipped with the project (``models/`` beside ``edge/``).
MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
#: Bundled sample frames that ``edge run`` replays when no configuration is given.
SAMPLES_DIR = Path(__file__).resolve().parent / "samples"


def _bounds(low: float | None = None, high: float | None = None) -> dict[str, Any]:
    return {"min": low, "max": high}


@dataclass(frozen=True)
class DeviceConfig:
    """Identity of this device.

    Attributes:
        id: Device id used in MQTT topics and payloads; defaults to the host name.
    """

    id: str = field(default_factory=socket.gethostname)


@dataclass(frozen=True)
class CameraConfig:
    """Where frames come from.

    Attributes:
        kind: ``simulated`` (image file, folder of images or video file), ``opencv`` (USB
            webcam through V4L2) or ``picamera2`` (Raspberry Pi camera).
        path: File or folder for ``simulated``; ``None`` replays the bundled sample frames.
        fps: Capture rate in frames per second; 0 hands every frame over in order as fast as
            the pipeline takes them (simulated only).
        loop: Start the simulated source over after its last frame.
        device: Device index or path for ``opencv``.
        width: Requested capture width in pixels for live cameras; 0 keeps the default.
        height: Requested capture height in pixels for live cameras; 0 keeps the default.
    """

    kind: Literal["simulated", "opencv", "picamera2"] = "simulated"
    path: Path | None = None
    fps: float = field(default=2.0, metadata=_bounds(0, 240))
    loop: bool = False
    device: str = "0"
    width: int = field(default=0, metadata=_bounds(0, 10000))
    height: int = field(default=0, metadata=_bounds(0, 10000))


#: Default ``detector.merge_classes``: every class of the default model.
DEFAULT_MERGE_CLASSES = ("text", "qr_code", "barcode")


@dataclass(frozen=True)
class DetectorConfig:
    """The ONNX region detector.

    Attributes:
        model: ONNX model file; defaults to ``models/detector.onnx`` of the project.
        labels: Optional file with one class name per line, for models without ``names``
            metadata.
        score_threshold: Minimum confidence of a detection, 0..1.
        iou_threshold: Overlap above which non-maximum suppression drops a box, 0..1.
        threads: onnxruntime intra-op threads. 0 means the CPUs this process may use minus
            the cores that region reads can keep busy (``pipeline.concurrency`` times
            ``readers.text.threads`` with OCR), and at least 1, because each frame is
            detected while the previous frame's regions are read.
        tile_scale: Frames that the model input shrinks by more than this factor are also
            detected in four overlapping tiles (with the 416-pixel default model: frames
            wider than 1664 pixels). 0 turns tiling off.
        merge_classes: Classes whose overlapping boxes are merged into one region, their
            union, so that a text block the model splits into overlapping parts is read
            once, and a code boxed twice (whole and in part) is decoded once. A name the
            model does not have is an error, except in the default, which skips such names
            so that a model with other classes loads unchanged. Empty merges nothing.
    """

    model: Path = MODELS_DIR / "detector.onnx"
    labels: Path | None = None
    score_threshold: float = field(default=0.5, metadata=_bounds(0, 1))
    iou_threshold: float = field(default=0.45, metadata=_bounds(0, 1))
    threads: int = field(default=0, metadata=_bounds(0, 64))
    tile_scale: float = field(default=4.0, metadata=_bounds(0, 100))
    merge_classes: tuple[str, ...] = DEFAULT_MERGE_CLASSES


@dataclass(frozen=True)
class TextReaderConfig:
    """OCR settings.

    Attributes:
        threads: onnxruntime intra-op threads per OCR call.
        use_angle_classifier: Run the text-direction classifier (for upside-down text).
        min_score: Lines recognised with a lower confidence (0..1) are dropped.
        max_detect_pixels: Text regions with more pixels are downscaled to this size for
            text detection (lines are still recognised at full resolution). When the lines
            found there are small, such a region is detected again at full resolution in
            overlapping strips of at most this many pixels each. Each detection
            needs about 230 bytes of memory per pixel, so this bounds the daemon's peak.
            Concurrent reads share 1.5 times this budget: their detections add up to about
            that many pixels at most at once.
        rewrite_models: Run the OCR models with exact graph rewrites that make them faster
            (``edge/readers/graph.py``). Turn it off only to compare or to rule it out.
    """

    threads: int = field(default=1, metadata=_bounds(1, 64))
    use_angle_classifier: bool = False
    min_score: float = field(default=0.5, metadata=_bounds(0, 1))
    max_detect_pixels: int = field(default=300_000, metadata=_bounds(1024, 100_000_000))
    rewrite_models: bool = True


@dataclass(frozen=True)
class ReadersConfig:
    """Which reader handles which detector class.

    Attributes:
        routes: Detector class name to reader name (``text`` or ``codes``); regions of
            classes not listed are reported without being read.
        text: OCR settings.
    """

    routes: dict[str, str] = field(
        default_factory=lambda: {"text": "text", "qr_code": "codes", "barcode": "codes"}
    )
    text: TextReaderConfig = field(default_factory=TextReaderConfig)


@dataclass(frozen=True)
class PipelineConfig:
    """How regions are read.

    Attributes:
        concurrency: Region reads running at once, across all readers.
        op_timeout: Seconds one region read may take before it is reported as ``timeout``.
        frame_deadline: Seconds all region reads of one frame may take together.
        full_frame_codes: When to decode codes over the whole frame as well: ``never``,
            ``always``, or ``when_none_read`` (when no detected region yielded a code, unless
            a code region's crop is the whole frame and its read succeeded without a code: it
            scanned the same pixels). A frame of over 500,000 pixels is scanned once, without
            the retries of regions.
        reuse_unchanged: Repeat the previous frame's reading of a region whose box and pixels
            did not change, instead of reading it again. Such regions are marked ``reused``.
            The full-frame code decode's reading is repeated when no tile of the frame changed.
        code_workers: Worker processes that decode codes; 0 means one per concurrent read.
            Values above ``concurrency`` act as ``concurrency``, since workers start when a
            read needs one.
            Each one takes about 36 to 42 MB resident between reads, and up to about 60 MB
            while it decodes a large frame (x86-64). Code reads wait for a free worker
            without holding one of the ``concurrency`` read slots, so text reads go on
            meanwhile, and their timeout starts when they get a worker and a slot. On the
            real-image corpus (2-core x86-64), a second worker's effect on speed stayed within
            the spread of runs, and it raised the daemon's peak by 32 to 55 MB.
        document_share: A frame whose text boxes (of classes routed to the ``text`` reader)
            cover at least this share of it is taken to be a document, such as a receipt or
            an invoice held up to the camera. Its text is read as one region, the whole
            frame, with ``origin`` ``document``. The next frame of the same camera or video
            and size stays a document down to 0.8 of this share, so that the text of frames
            near the share is not read as one region on one frame and as several on the
            next. 0 turns this off.
    """

    concurrency: int = field(default=2, metadata=_bounds(1, 64))
    op_timeout: float = field(default=5.0, metadata=_bounds(0.01, 600))
    frame_deadline: float = field(default=10.0, metadata=_bounds(0.01, 3600))
    full_frame_codes: Literal["never", "always", "when_none_read"] = "when_none_read"
    reuse_unchanged: bool = True
    code_workers: int = field(default=1, metadata=_bounds(0, 64))
    document_share: float = field(default=0.5, metadata=_bounds(0, 1))


@dataclass(frozen=True)
class MqttConfig:
    """The MQTT broker results are published to.

    Attributes:
        enabled: Publish at all; ``false`` publishes nothing (``edge run --stdout`` still
            prints the results).
        host: Broker host name or address.
        port: Broker TCP port (8883 is the usual port with TLS).
        topic_prefix: First topic level; topics are ``{topic_prefix}/{device_id}/...``.
        client_id: MQTT client id; defaults to ``edge-{device_id}-{machine}``, where
            ``machine`` is derived from ``/etc/machine-id``, so devices that share a host
            name still get different ids.
        protocol: MQTT protocol version, ``3.1.1`` or ``5``.
        keepalive: Seconds between keep-alive pings.
        connect_timeout: Seconds for the TCP connect, the TLS handshake and the CONNACK each.
        reconnect_min_delay: Seconds before the first reconnect attempt; the delay doubles
            after each failure up to ``reconnect_max_delay`` and is drawn at random below it.
        reconnect_max_delay: Cap on the reconnect delay in seconds.
        max_inflight: QoS 1 messages sent and not yet acknowledged at any time.
        drain_grace: Seconds a clean exit waits for the outbox to be delivered. It is not
            waited for when the broker was never reached during the run.
        stats_interval: Seconds between messages on the ``stats`` topic; 0 sends none.
        tls: Connect with TLS. Also switched on by ``ca_file``.
        ca_file: PEM file of the certificate authorities to trust; ``None`` with ``tls``
            uses the system store.
        cert_file: PEM client certificate, for brokers that require one.
        key_file: PEM private key of ``cert_file``. Under systemd ``LoadCredential=`` this can
            point into ``/run/credentials/{unit name}/``.
        username: User name for password authentication.
        password_file: File holding the password. The credential ``mqtt-password`` in
            ``$CREDENTIALS_DIRECTORY`` takes precedence, and ``EDGE_MQTT_PASSWORD`` in the
            environment is used when neither exists.
        discovery: Publish Home Assistant MQTT discovery messages.
        discovery_prefix: Home Assistant's discovery prefix; its status topic is
            ``{discovery_prefix}/status``.
    """

    enabled: bool = True
    host: str = "localhost"
    port: int = field(default=1883, metadata=_bounds(1, 65535))
    topic_prefix: str = "edge"
    client_id: str | None = None
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    keepalive: int = field(default=30, metadata=_bounds(5, 3600))
    connect_timeout: float = field(default=5.0, metadata=_bounds(0.1, 120))
    reconnect_min_delay: float = field(default=1.0, metadata=_bounds(0.01, 3600))
    reconnect_max_delay: float = field(default=60.0, metadata=_bounds(0.01, 3600))
    max_inflight: int = field(default=20, metadata=_bounds(1, 1000))
    drain_grace: float = field(default=10.0, metadata=_bounds(0, 3600))
    stats_interval: float = field(default=60.0, metadata=_bounds(0, 86400))
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password_file: Path | None = None
    discovery: bool = False
    discovery_prefix: str = "homeassistant"


@dataclass(frozen=True)
class OutboxConfig:
    """The durable outbox that keeps results until the broker acknowledges them.

    Attributes:
        path: SQLite file. ``$STATE_DIRECTORY/outbox.sqlite3`` is used instead when systemd
            sets ``STATE_DIRECTORY`` (``StateDirectory=`` in the unit). ``None`` defaults to
            ``$XDG_STATE_HOME/edge/outbox.sqlite3`` (``~/.local/state/edge/outbox.sqlite3``).
        max_messages: Cap on stored messages.
        max_bytes: Cap on the sum of stored payload sizes in bytes.
        ttl: Seconds a message may wait for the broker before it is deleted; 0 keeps
            messages until they are delivered or dropped by the cap.
        drop_policy: At the cap, ``drop_oldest`` deletes the oldest messages and
            ``drop_newest`` rejects new ones. Both are counted in the ``stats`` topic.
    """

    path: Path | None = None
    max_messages: int = field(default=50_000, metadata=_bounds(1, 10_000_000))
    max_bytes: int = field(default=100 * 1024 * 1024, metadata=_bounds(1024, 2**40))
    ttl: float = field(default=7 * 24 * 3600.0, metadata=_bounds(0, 365 * 24 * 3600))
    drop_policy: Literal["drop_oldest", "drop_newest"] = "drop_oldest"


@dataclass(frozen=True)
class TrackerConfig:
    """Settings of the tracker that turns repeated reads into events on the ``events`` topic.

    Attributes:
        enabled: Publish events at all.
        min_iou: Intersection over union (0..1) above which a read in a new frame continues
            a track of the same class and value; 0 accepts any overlap.
        seen_again_interval: Minimum seconds between two ``seen_again`` events of one track.
        gone_after: Seconds without a matching read after which a track ends with ``gone``.
    """

    enabled: bool = True
    min_iou: float = field(default=0.0, metadata=_bounds(0, 1))
    seen_again_interval: float = field(default=60.0, metadata=_bounds(0, 86400))
    gone_after: float = field(default=10.0, metadata=_bounds(0.1, 86400))


@dataclass(frozen=True)
class LoggingConfig:
    """Log levels.

    Attributes:
        level: Level of the root logger (``DEBUG``, ``INFO``, ``WARNING``, ``ERROR``).
        levels: Levels of single loggers by name, e.g. ``{"edge.pipeline" = "DEBUG"}``.
    """

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    levels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ServiceConfig:
    """Integration with the service manager and monitoring.

    Attributes:
        metrics: Serve Prometheus metrics over HTTP at ``/metrics``.
        metrics_host: Address the metrics endpoint binds; keep it local unless a scraper on
            another host needs it.
        metrics_port: TCP port of the metrics endpoint.
        watchdog_stall: Seconds without a processed frame after which systemd watchdog pings
            stop, so systemd restarts the daemon; 0 uses half the unit's ``WatchdogSec=``.
            Set it above the longest gap between frames (1 / fps plus processing time).
    """

    metrics: bool = False
    metrics_host: str = "127.0.0.1"
    metrics_port: int = field(default=9464, metadata=_bounds(1, 65535))
    watchdog_stall: float = field(default=0.0, metadata=_bounds(0, 3600))


@dataclass(frozen=True)
class Config:
    """The whole configuration; every section has defaults."""

    device: DeviceConfig = field(default_factory=DeviceConfig)
    camera: CameraConfig = field(default_factory=CameraConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    readers: ReadersConfig = field(default_factory=ReadersConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


_READERS = ("text", "codes")
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def load_config(path: Path | None) -> Config:
    """Load and validate a TOML configuration file; ``None`` gives the defaults.

    Relative paths in the file are resolved against the file's folder.

    Raises:
        ConfigError: The file is missing, is not valid TOML, or has an invalid value.
    """
    if path is None:
        return parse_config({})
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        msg = f"configuration file not found: {path}"
        raise ConfigError(msg) from None
    except (OSError, UnicodeDecodeError) as exc:
        msg = f"cannot read configuration file {path}: {exc}"
        raise ConfigError(msg) from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = f"invalid TOML in {path}: {exc}"
        raise ConfigError(msg) from exc
    return parse_config(data, base_dir=path.resolve().parent)


def parse_config(data: dict[str, Any], *, base_dir: Path | None = None) -> Config:
    """Validate a configuration mapping (as parsed from TOML) into a :class:`Config`.

    Raises:
        ConfigError: An unknown key, a wrong type or an out-of-range value, naming its key path.
    """
    config: Config = _build(Config, data, "", base_dir or Path.cwd())
    _check_cross_fields(config)
    return config


def _build(cls: type[Any], data: object, prefix: str, base_dir: Path) -> Any:
    if not isinstance(data, dict):
        msg = f"expected a table, got {type(data).__name__}"
        raise ConfigError(msg, key=prefix.rstrip(".") or None)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        msg = f"unknown key; valid keys here are {', '.join(sorted(fields))}"
        raise ConfigError(msg, key=prefix + unknown[0])
    values = {
        name: _convert(hints[name], value, prefix + name, fields[name].metadata, base_dir)
        for name, value in data.items()
    }
    return cls(**values)


def _convert(
    hint: Any, value: object, key: str, meta: typing.Mapping[str, Any], base_dir: Path
) -> object:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(typing.cast("type[Any]", hint), value, key + ".", base_dir)
    if origin in (types.UnionType, typing.Union):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return _convert(options[0], value, key, meta, base_dir)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            msg = f"invalid value {value!r}; expected one of {', '.join(map(repr, choices))}"
            raise ConfigError(msg, key=key)
        return value
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            msg = "expected a table of strings"
            raise ConfigError(msg, key=key)
        return dict(value)
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            msg = f"expected an array of non-empty strings, got {value!r}"
            raise ConfigError(msg, key=key)
        return tuple(value)
    if hint is Path:
        if not isinstance(value, str) or not value:
            msg = f"expected a non-empty path string, got {value!r}"
            raise ConfigError(msg, key=key)
        path = Path(value).expanduser()
        return path if path.is_absolute() else base_dir / path
    return _convert_scalar(hint, value, key, meta)


def _convert_scalar(hint: Any, value: object, key: str, meta: typing.Mapping[str, Any]) -> object:
    # bool is a subclass of int in Python; TOML keeps them apart, and so do we.
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value  # type: ignore[arg-type]
    else:
        ok = isinstance(value, hint)
    if not ok:
        msg = f"expected {hint.__name__}, got {type(value).__name__} {value!r}"
        raise ConfigError(msg, key=key)
    if isinstance(value, float) and not math.isfinite(value):
        msg = f"expected a finite number, got {value!r}"
        raise ConfigError(msg, key=key)
    low, high = meta.get("min"), meta.get("max")
    if isinstance(value, int | float) and (
        (low is not None and value < low) or (high is not None and value > high)
    ):
        msg = f"value {value!r} out of range; expected {low} to {high}"
        raise ConfigError(msg, key=key)
    if isinstance(value, str) and not value:
        msg = "expected a non-empty string"
        raise ConfigError(msg, key=key)
    return value


def _check_cross_fields(config: Config) -> None:
    for class_name, reader in config.readers.routes.items():
        if reader not in _READERS:
            msg = f"unknown reader {reader!r}; expected one of {', '.join(_READERS)}"
            raise ConfigError(msg, key=f"readers.routes.{class_name}")
    for logger_name, level in config.logging.levels.items():
        if level.upper() not in _LEVELS:
            msg = f"invalid log level {level!r}; expected one of {', '.join(_LEVELS)}"
            raise ConfigError(msg, key=f"logging.levels.{logger_name}")
    if config.pipeline.op_timeout > config.pipeline.frame_deadline:
        msg = (
            f"op_timeout {config.pipeline.op_timeout} s exceeds frame_deadline "
            f"{config.pipeline.frame_deadline} s; lower op_timeout or raise frame_deadline"
        )
        raise ConfigError(msg, key="pipeline.op_timeout")
    _check_mqtt(config.mqtt)
    _check_topic_levels(config)
    if config.camera.kind != "simulated" and config.camera.path is not None:
        msg = f"path is only used by the simulated camera, not by {config.camera.kind!r}"
        raise ConfigError(msg, key="camera.path")
    path = config.camera.path
    if config.camera.kind == "simulated" and path is not None and not path.exists():
        msg = f"path not found: {path}; set camera.path to an image, a folder or a video"
        raise ConfigError(msg, key="camera.path")
    model = config.detector.model
    if not model.is_file():
        msg = f"model file not found: {model}; set detector.model to an ONNX file"
        raise ConfigError(msg, key="detector.model")
    if 0 < config.detector.tile_scale <= 1:
        msg = f"tile_scale must be 0 (off) or above 1, got {config.detector.tile_scale}"
        raise ConfigError(msg, key="detector.tile_scale")
    if config.detector.labels is not None and not config.detector.labels.is_file():
        msg = f"labels file not found: {config.detector.labels}"
        raise ConfigError(msg, key="detector.labels")


def _check_readable_file(path: Path, key: str) -> None:
    if not path.is_file():
        msg = f"file not found: {path}; set {key} to an existing file"
        raise ConfigError(msg, key=key)
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        msg = f"cannot read {path}: {exc.strerror}; make it readable by the daemon's user"
        raise ConfigError(msg, key=key) from exc


def _check_tls_files(mqtt: MqttConfig) -> None:
    """Load the CA file and the client certificate and key as the publisher will."""
    if not (mqtt.enabled and uses_tls(mqtt)):
        return
    try:
        build_tls_context(mqtt)
    except TlsFileError as exc:
        raise ConfigError(str(exc), key=exc.key) from exc


def _check_topic_levels(config: Config) -> None:
    """Reject topic parts that MQTT forbids in a publish topic or that would add levels."""
    parts = {"device.id": config.device.id, "mqtt.topic_prefix": config.mqtt.topic_prefix}
    for key, value in parts.items():
        bad = sorted(
            {c for c in value if c in "+#\0"}
            | ({"/"} if key == "device.id" and "/" in value else set())
        )
        if bad:
            msg = (
                f"invalid value {value!r}: it contains {', '.join(map(repr, bad))}, which MQTT "
                "topics do not allow here. Remove those characters"
            )
            raise ConfigError(msg, key=key)


def _check_mqtt(mqtt: MqttConfig) -> None:
    if mqtt.reconnect_min_delay > mqtt.reconnect_max_delay:
        msg = (
            f"reconnect_min_delay {mqtt.reconnect_min_delay} s exceeds reconnect_max_delay "
            f"{mqtt.reconnect_max_delay} s; lower the first or raise the second"
        )
        raise ConfigError(msg, key="mqtt.reconnect_min_delay")
    if (mqtt.cert_file is None) != (mqtt.key_file is None):
        msg = "cert_file and key_file must be set together for a TLS client certificate"
        raise ConfigError(msg, key="mqtt.cert_file" if mqtt.cert_file is None else "mqtt.key_file")
    for name in ("ca_file", "cert_file", "key_file", "password_file"):
        path: Path | None = getattr(mqtt, name)
        if path is not None:
            _check_readable_file(path, f"mqtt.{name}")
    _check_tls_files(mqtt)
    if mqtt.password_file is not None and mqtt.username is None:
        msg = "password_file needs a username; set mqtt.username"
        raise ConfigError(msg, key="mqtt.password_file")
