"""Tests for scripts/install-pi.sh in dry-run mode, which prints commands and changes nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "install-pi.sh"


def install(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the install script with arguments and return the finished process."""
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def planned(completed: subprocess.CompletedProcess[str]) -> list[str]:
    """Return the commands a dry run printed, without their leading "+ "."""
    return [line[2:] for line in completed.stdout.splitlines() if line.startswith("+ ")]


def files_under(root: Path) -> list[Path]:
    """Return every file and folder below root."""
    return sorted(root.rglob("*"))


def fake_venv(root: Path, *, system_site_packages: bool) -> None:
    """Create a stand-in for the /opt/edge virtual environment below root."""
    venv = root / "opt" / "edge"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    flag = "true" if system_site_packages else "false"
    (venv / "pyvenv.cfg").write_text(f"include-system-site-packages = {flag}\n")


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_install_script_shellcheck_clean() -> None:
    """shellcheck reports nothing for the install script."""
    completed = subprocess.run(
        ["shellcheck", str(SCRIPT)], capture_output=True, text=True, timeout=120, check=False
    )

    assert completed.returncode == 0, completed.stdout


def test_install_script_strict_mode() -> None:
    """The script runs with set -euo pipefail."""
    assert "set -euo pipefail" in SCRIPT.read_text()


def test_install_script_executable() -> None:
    """The script file is executable."""
    assert os.access(SCRIPT, os.X_OK)


def test_install_dry_run_succeeds() -> None:
    """A dry run exits 0 and reports that nothing was changed."""
    completed = install("--dry-run")

    assert completed.returncode == 0, completed.stderr
    assert "dry run: nothing was changed" in completed.stderr


def test_install_dry_run_system_packages() -> None:
    """The plan installs python3-picamera2, python3-venv and libzbar0 with apt-get."""
    commands = planned(install("--dry-run"))
    apt = [c for c in commands if "apt-get install" in c]

    assert len(apt) == 1
    for package in ("python3-picamera2", "python3-venv", "libzbar0"):
        assert package in apt[0].split()


def test_install_dry_run_venv_system_site() -> None:
    """The plan creates /opt/edge with --system-site-packages when it does not exist."""
    commands = planned(install("--dry-run", "--root", "/nonexistent-edge-root"))

    assert any(
        c.endswith("-m venv --system-site-packages /nonexistent-edge-root/opt/edge")
        for c in commands
    )


def test_install_dry_run_pinned_no_deps() -> None:
    """Dependencies come from requirements.lock, then the project, both with --no-deps."""
    commands = planned(install("--dry-run"))
    pip = [c for c in commands if " -m pip install " in c]

    assert len(pip) == 2
    assert all("--no-deps" in c.split() for c in pip)
    assert pip[0].endswith(f"-r {REPO / 'requirements.lock'}")
    assert pip[1].endswith(str(REPO))


def test_install_dry_run_unit_and_user() -> None:
    """The plan installs the unit and the sysusers file, creates the user and enables it."""
    commands = planned(install("--dry-run"))

    assert any(
        c.endswith("systemd/edge.service /etc/systemd/system/edge.service") for c in commands
    )
    assert "systemd-sysusers edge.conf" in commands
    assert "systemctl enable edge.service" in commands
    assert "systemctl restart edge.service" in commands


def test_install_dry_run_no_start() -> None:
    """--no-start leaves the restart out of the plan."""
    commands = planned(install("--dry-run", "--no-start"))

    assert "systemctl restart edge.service" not in commands


def test_install_dry_run_config_created(tmp_path: Path) -> None:
    """Without a config the plan copies the example and sets the camera kind and model."""
    commands = planned(install("--dry-run", "--root", str(tmp_path), "--camera", "opencv"))
    config = f"{tmp_path}/etc/edge/edge.toml"

    assert any(c.endswith(f"systemd/edge.example.toml {config}") for c in commands)
    assert any(c.startswith("sed -i") and "opencv" in c and c.endswith(config) for c in commands)


def test_install_dry_run_config_kept(tmp_path: Path) -> None:
    """An existing config is kept: the plan never writes it."""
    config = tmp_path / "etc" / "edge" / "edge.toml"
    config.parent.mkdir(parents=True)
    config.write_text("[camera]\nkind = 'opencv'\n")
    completed = install("--dry-run", "--root", str(tmp_path))

    assert not [c for c in planned(completed) if str(config) in c]
    assert f"keeping the existing {config}" in completed.stderr


def test_install_dry_run_changes_nothing(tmp_path: Path) -> None:
    """A dry run below a root prefix creates no file there."""
    install("--dry-run", "--root", str(tmp_path))

    assert files_under(tmp_path) == []


def test_install_dry_run_reuses_venv(tmp_path: Path) -> None:
    """An existing venv with system site packages is reused, not created again."""
    fake_venv(tmp_path, system_site_packages=True)
    commands = planned(install("--dry-run", "--root", str(tmp_path)))

    assert not [c for c in commands if " -m venv " in c]


def test_install_venv_without_system_site_rejected(tmp_path: Path) -> None:
    """A venv without system site packages stops the install with the fix."""
    fake_venv(tmp_path, system_site_packages=False)
    completed = install("--dry-run", "--root", str(tmp_path))

    assert completed.returncode == 1
    assert "without --system-site-packages" in completed.stderr


def test_install_root_skips_apt_and_running_systemd(tmp_path: Path) -> None:
    """With --root the plan has no apt-get, no daemon-reload and an offline enable."""
    commands = planned(install("--dry-run", "--root", str(tmp_path)))

    assert not [c for c in commands if c.startswith(("apt-get", "env DEBIAN_FRONTEND"))]
    assert "systemctl daemon-reload" not in commands
    assert f"systemctl --root={tmp_path} enable edge.service" in commands


def test_install_unknown_option_exits_2() -> None:
    """An unknown option exits 2 with the usage."""
    completed = install("--frobnicate")

    assert completed.returncode == 2
    assert "unknown option --frobnicate" in completed.stderr


def test_install_invalid_camera_exits_2() -> None:
    """An invalid --camera kind exits 2 naming the valid kinds."""
    completed = install("--dry-run", "--camera", "webcam")

    assert completed.returncode == 2
    assert "expected picamera2, opencv or simulated" in completed.stderr
