"""Tests for the systemd unit and sysusers file in systemd/, and edge check-config.

The static checks run everywhere. The checks with systemd-analyze and systemd-sysusers run
where those programs exist and are skipped elsewhere; none of them needs systemd as PID 1.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from edge import cli

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "edge.service"
SYSUSERS = REPO / "systemd" / "edge.sysusers.conf"
EDGE_BINARY = "/opt/edge/bin/edge"
CONFIG = "/etc/edge/edge.toml"
#: Highest accepted overall exposure of "systemd-analyze security" (0 is best, 10 worst).
MAX_EXPOSURE = 2.0

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze not installed (Debian package systemd)",
)
needs_sysusers = pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None,
    reason="systemd-sysusers not installed (Debian package systemd)",
)


def unit_settings() -> dict[str, list[str]]:
    """Parse the unit into {"Section.Key": [values in order]}; keys may repeat."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key}", []).append(value)
    return settings


def setting(name: str) -> str:
    """Return the last value of a setting, as systemd applies it, or "" when absent."""
    values = unit_settings().get(name, [])
    return values[-1] if values else ""


def unit_with_stub(tmp_path: Path) -> Path:
    """Copy the unit with the daemon's path replaced by a stub, so verify finds the binary."""
    stub = tmp_path / "edge"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    unit = tmp_path / "edge.service"
    unit.write_text(UNIT.read_text().replace(EDGE_BINARY, str(stub)))
    return unit


def test_unit_type_notify() -> None:
    """The service is Type=notify and accepts notifications from the main process only."""
    assert setting("Service.Type") == "notify"
    assert setting("Service.NotifyAccess") == "main"


def test_unit_watchdog_set() -> None:
    """WatchdogSec is set, so systemd passes WATCHDOG_USEC to the daemon."""
    assert re.fullmatch(r"\d+s?", setting("Service.WatchdogSec"))


def test_unit_restart_on_failure_limited() -> None:
    """Restart=on-failure with a start limit."""
    assert setting("Service.Restart") == "on-failure"
    assert int(setting("Unit.StartLimitBurst")) > 0
    assert setting("Unit.StartLimitIntervalSec")


def test_unit_checks_config_first() -> None:
    """ExecStartPre runs edge check-config on the file that ExecStart runs with."""
    assert setting("Service.ExecStartPre") == f"{EDGE_BINARY} check-config {CONFIG}"
    assert setting("Service.ExecStart") == f"{EDGE_BINARY} run --config {CONFIG}"


def test_unit_state_directory() -> None:
    """The outbox directory /var/lib/edge is the unit's StateDirectory."""
    assert setting("Service.StateDirectory") == "edge"


def test_unit_loads_mqtt_credential() -> None:
    """The MQTT password comes in through LoadCredential, not the environment."""
    assert "mqtt-password" in unit_settings()["Service.LoadCredential"]
    assert not any("PASSWORD" in v.upper() for v in unit_settings().get("Service.Environment", []))


def test_unit_allows_camera_devices() -> None:
    """Only the camera device classes are allowed, read-write, with a closed device policy."""
    allowed = unit_settings()["Service.DeviceAllow"]

    assert setting("Service.DevicePolicy") == "closed"
    for device in ("char-video4linux", "char-media", "char-dma_heap", "char-vchiq"):
        assert f"{device} rw" in allowed


def test_unit_runs_as_edge_in_video_group() -> None:
    """The daemon runs as the edge user with the video group for the camera nodes."""
    assert setting("Service.User") == "edge"
    assert "video" in setting("Service.SupplementaryGroups").split()


def test_unit_keeps_network_and_devices() -> None:
    """Hardening leaves the broker reachable and the camera and video group visible."""
    families = setting("Service.RestrictAddressFamilies").split()

    assert {"AF_INET", "AF_INET6", "AF_UNIX"} <= set(families)
    assert setting("Service.PrivateNetwork") in ("", "no")
    assert setting("Service.PrivateDevices") in ("", "no")
    assert setting("Service.PrivateUsers") in ("", "no")


@needs_analyze
def test_unit_verify_passes(tmp_path: Path) -> None:
    """systemd-analyze verify accepts the unit without warnings."""
    completed = subprocess.run(
        ["systemd-analyze", "verify", str(unit_with_stub(tmp_path))],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert completed.returncode == 0, completed.stderr
    assert completed.stderr.strip() == ""


@needs_analyze
def test_unit_security_exposure_low(tmp_path: Path) -> None:
    """systemd-analyze security --offline=yes rates the exposure 2.0 or lower."""
    completed = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(unit_with_stub(tmp_path))],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", completed.stdout)

    assert match, completed.stdout + completed.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE


@needs_sysusers
def test_sysusers_creates_edge_in_video(tmp_path: Path) -> None:
    """systemd-sysusers creates the edge system user and adds it to the video group."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "group").write_text("video:x:44:\n")
    sysusers_dir = tmp_path / "usr" / "lib" / "sysusers.d"
    sysusers_dir.mkdir(parents=True)
    shutil.copy(SYSUSERS, sysusers_dir / "edge.conf")
    completed = subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", "edge.conf"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    passwd = (tmp_path / "etc" / "passwd").read_text()
    groups = (tmp_path / "etc" / "group").read_text().splitlines()

    assert completed.returncode == 0, completed.stderr
    assert re.search(r"^edge:x:\d+:\d+:Edge vision daemon:/var/lib/edge:", passwd, re.M)
    assert "video:x:44:edge" in groups


# ExecStartPre runs "edge check-config", so its exit status and messages are tested here.


def write_config(tmp_path: Path, text: str) -> Path:
    """Write ``text`` plus a [detector] table naming a model file that exists."""
    model = tmp_path / "detector.onnx"
    model.write_bytes(b"onnx")
    path = tmp_path / "edge.toml"
    path.write_text(f'{text}\n[detector]\nmodel = "{model}"\n')
    return path


def test_check_config_valid_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A valid file exits 0 and prints OK."""
    path = write_config(tmp_path, "[mqtt]\nport = 1884\n")

    assert cli.main(["check-config", str(path)]) == 0
    assert capsys.readouterr().out == f"{path}: OK\n"


def test_check_config_reports_every_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every invalid and unknown key is printed with its key path, and the exit status is 1."""
    path = write_config(
        tmp_path,
        'colour = "red"\n'
        "[mqtt]\nport = 0\nbogus = 1\nkeepalive = 'x'\n"
        "[pipeline]\nconcurrency = 0\n"
        '[logging.levels]\n"edge.pipeline" = "LOUD"\n',
    )
    status = cli.main(["check-config", str(path)])
    stderr = capsys.readouterr().err

    assert status == 1
    for key in (
        "colour",
        "mqtt.port",
        "mqtt.bogus",
        "mqtt.keepalive",
        "pipeline.concurrency",
        "logging.levels.edge.pipeline",
    ):
        assert f"{path}: {key}: " in stderr
    assert "6 error(s)" in stderr


def test_check_config_cross_field_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A rule that still fails with the default is reported once, with the type errors."""
    path = write_config(
        tmp_path, "[pipeline]\nop_timeout = 20.0\nframe_deadline = 3.0\nconcurrency = 'two'\n"
    )
    status = cli.main(["check-config", str(path)])
    lines = capsys.readouterr().err.splitlines()

    assert status == 1
    assert len([line for line in lines if ": pipeline.op_timeout: " in line]) == 1
    assert len([line for line in lines if ": pipeline.concurrency: " in line]) == 1


def test_check_config_missing_file_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing file exits 1 saying it was not found."""
    path = tmp_path / "absent.toml"

    assert cli.main(["check-config", str(path)]) == 1
    assert f"configuration file not found: {path}" in capsys.readouterr().err


def test_check_config_invalid_toml_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file that is not TOML exits 1 saying so."""
    path = tmp_path / "edge.toml"
    path.write_text("[mqtt\n")

    assert cli.main(["check-config", str(path)]) == 1
    assert "invalid TOML" in capsys.readouterr().err
