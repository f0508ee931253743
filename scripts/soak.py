"""Run the daemon over many frames and report its resident memory over time.

The script renders generated scenes of several sizes (640x480 to 1920x1080) with 0 to 8 labels
and 0 to 4 codes into a temporary folder, so region sizes and counts vary from frame to frame.
It then runs ``edge run`` on that folder as a child process, with the simulated camera looping
over it as fast as the pipeline takes frames, and publishing to a mosquitto that it starts on a
free loopback port (or with no broker when mosquitto is not installed, so results queue in the
outbox). Every 0.5 s it samples the memory of the daemon's process tree: the sum of resident
set sizes (RSS, which counts shared library pages once per process) and of proportional set
sizes (PSS, which splits shared pages between the processes that map them).

Every ``--report`` frames it prints the frame count, the elapsed minutes and the memory. At the
end it prints memory after warm-up, peak and end, and the growth between the second and the
last quarter of the run: memory that levels off shows little growth there.

Usage: .venv/bin/python scripts/soak.py [--frames 5000] [--scenes 40] [--report 250]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edge.synth import render_scene  # noqa: E402

SIZES = ((640, 480), (1280, 720), (1920, 1080), (1024, 768))
MB = 2**20


@dataclass
class Sample:
    """Memory of the daemon's process tree at one moment."""

    frames: int
    minutes: float
    rss: int
    pss: int


def render_frames(folder: Path, count: int) -> None:
    rng = np.random.default_rng(7)
    for index in range(count):
        width, height = SIZES[index % len(SIZES)]
        scene = render_scene(rng, width, height, labels=(0, 8), codes=(0, 4))
        cv2.imwrite(str(folder / f"scene-{index:03d}.png"), scene.image)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.contextmanager
def broker(folder: Path) -> Iterator[int | None]:
    """Start mosquitto on a free loopback port; yield the port, or ``None`` without mosquitto."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).exists():
        print("mosquitto not found: running without a broker", file=sys.stderr)
        yield None
        return
    port = free_port()
    config = folder / "mosquitto.conf"
    config.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    process = subprocess.Popen(
        [binary, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for_port(port, process)
        yield port
    finally:
        stop(process)


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Wait until something accepts connections on the loopback port.

    Raises:
        RuntimeError: The process ended or the port stayed closed for ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            msg = f"mosquitto exited with status {process.returncode} before listening"
            raise RuntimeError(msg)
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    msg = f"mosquitto is not listening on port {port} after {timeout:.0f} s"
    raise RuntimeError(msg)


def stop(process: subprocess.Popen[Any], grace: float = 30.0) -> None:
    """Terminate a child process that still runs, killing it if it ignores that for ``grace`` s."""
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def tree_memory(process: psutil.Process) -> tuple[int, int]:
    """Sum RSS and PSS over a process and its descendants, skipping ones that just ended."""
    rss = pss = 0
    for member in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            info = member.memory_full_info()
            rss += info.rss
            pss += info.pss
    return rss, pss


def count_frames(stream: object, counter: list[int]) -> None:
    """Count the JSON lines, one per frame, that ``edge run --stdout`` prints."""
    for _ in stream:  # type: ignore[attr-defined]
        counter[0] += 1


def soak(frames: int, scene_count: int, report: int) -> list[Sample]:
    with tempfile.TemporaryDirectory(prefix="edge-soak-") as temp:
        folder = Path(temp)
        scenes = folder / "scenes"
        scenes.mkdir()
        render_frames(scenes, scene_count)
        with broker(folder) as port:
            config = folder / "edge.toml"
            config.write_text(
                f'[camera]\npath = "{scenes}"\nfps = 0\nloop = true\n'
                f'[mqtt]\nhost = "127.0.0.1"\nport = {port or free_port()}\n'
                f'[outbox]\npath = "{folder / "outbox.sqlite3"}"\n'
                '[logging]\nlevel = "WARNING"\n'
            )
            command = [sys.executable, "-m", "edge", "run", "--config", str(config)]
            command += ["--max-frames", str(frames), "--stdout"]
            return _watch(command, frames, report)


def _watch(command: list[str], frames: int, report: int) -> list[Sample]:
    daemon = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True)
    counter = [0]
    threading.Thread(target=count_frames, args=(daemon.stdout, counter), daemon=True).start()
    process = psutil.Process(daemon.pid)
    samples: list[Sample] = []
    started = time.monotonic()
    next_report = 1
    try:
        while daemon.poll() is None:
            time.sleep(0.5)
            rss, pss = tree_memory(process)
            # After its last frame the daemon shuts down and frees memory, which is not a
            # steady state, so those samples are left out.
            if rss == 0 or counter[0] >= frames:
                continue
            minutes = (time.monotonic() - started) / 60
            samples.append(Sample(counter[0], minutes, rss, pss))
            if counter[0] >= next_report:
                print(
                    f"{counter[0]:>7} frames {minutes:7.1f} min  RSS {rss / MB:7.1f} MB"
                    f"  PSS {pss / MB:7.1f} MB",
                    flush=True,
                )
                next_report = (counter[0] // report + 1) * report
    finally:
        stop(daemon, grace=60)
    if daemon.returncode != 0:
        print(f"edge run exited with status {daemon.returncode}", file=sys.stderr)
    if counter[0] < frames:
        print(f"only {counter[0]} of {frames} frames were processed", file=sys.stderr)
    return samples


def summarise(samples: list[Sample], name: str, values: list[float]) -> str:
    quarter = max(1, len(values) // 4)
    second_quarter = float(np.mean(values[quarter : 2 * quarter] or values))
    last_quarter = float(np.mean(values[-quarter:]))
    # The first sample after the first frame, so that start excludes model loading.
    start = next((v for s, v in zip(samples, values, strict=True) if s.frames >= 1), values[0])
    return (
        f"{name} MB: start {start:.1f}, peak {max(values):.1f}, end {values[-1]:.1f}; "
        f"growth from the second to the last quarter {last_quarter - second_quarter:+.1f} MB"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=5000)
    parser.add_argument("--scenes", type=int, default=40, help="distinct generated scenes")
    parser.add_argument("--report", type=int, default=250, help="frames between printed lines")
    args = parser.parse_args()
    # SIGTERM raises SystemExit, so the daemon and mosquitto are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    samples = soak(args.frames, args.scenes, args.report)
    if not samples:
        print("no memory samples: the daemon ended at once", file=sys.stderr)
        return 1
    print(f"frames {samples[-1].frames}, minutes {samples[-1].minutes:.1f}")
    print(summarise(samples, "RSS", [s.rss / MB for s in samples]))
    print(summarise(samples, "PSS", [s.pss / MB for s in samples]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
