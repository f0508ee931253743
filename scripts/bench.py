"""Benchmark the daemon's pipeline against the naive way, on the same frames, in one process.

Modes:
  naive       full-frame OCR (rapidocr, default settings) plus full-frame pyzbar on every frame
  sequential  the daemon's pipeline with one region read at a time, one frame at a time
  pipeline    the daemon's pipeline as configured by default, driven as `edge run` drives it:
              each frame is detected while the previous frame's regions are read

Frame sets: generated scenes at 1280x720 and 1920x1080 with 1 to 8 labels and 0 to 4 codes, a
static scene (one generated frame repeated, as a fixed camera sees most of the time), and the
real images of ../shared/corpus. More sets are not run by default. ``static-text`` is a static
scene with labels and no code. ``corpus-codes`` and ``corpus-text`` split the corpus into its QR
code and barcode images and its text images, so that their ratios can be compared. For each mode
and set it prints frames per second, latency p50 and p95, CPU seconds per frame (this process
and its worker processes), peak resident memory while the mode ran, codes decoded and OCR word
recall (spaces ignored, see scripts/evaluate.py). Before each pass, the pipeline modes read a
warm-up frame. For the static scenes it is the scene itself, which a fixed camera has seen
before, so its figures are those of the steady state.

The modes take turns on each set, and ``--rounds N`` repeats that N times, adding up the
passes. So a drift of the machine's speed during the run affects the modes alike.
The modes share one process, so their memory figures include the models of all modes. The
daemon's own memory is measured apart: for each set, ``edge run`` processes the set's frames
from files in a child process while its process tree is sampled every 20 ms (peak RSS summed
over the processes, and peak PSS, which counts shared library pages once).

Usage: .venv/bin/python scripts/bench.py [--frames N] [--static N] [--corpus-limit N]
       [--sets NAME,...] [--modes NAME,...] [--rounds N] [--plot FILE] [--json FILE]
       [--no-daemon-memory]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edge.config import load_config  # noqa: E402
from edge.factory import build_pipeline  # noqa: E402
from edge.images import use_one_opencv_thread  # noqa: E402
from edge.pipeline import FailedFrame, Pipeline  # noqa: E402
from edge.results import Frame, FrameResult  # noqa: E402
from edge.synth import render_scene  # noqa: E402

CORPUS = REPO.parent / "shared" / "corpus"
DEFAULT_SETS = ("720p", "1080p", "static", "corpus")
SET_NAMES = (*DEFAULT_SETS, "static-text", "corpus-codes", "corpus-text")
MODE_NAMES = ("naive", "sequential", "pipeline")


@dataclass
class Sample:
    """One benchmark frame with what it is known to contain."""

    image: np.ndarray
    codes: list[str]
    words: list[str]
    source: str


@dataclass
class Figures:
    """Measurements of one mode on one frame set."""

    latencies: list[float] = field(default_factory=list)
    wall: float = 0.0
    cpu: float = 0.0
    peak_rss: int = 0
    codes_expected: int = 0
    codes_read: int = 0
    words_expected: int = 0
    words_read: int = 0

    def add(self, other: Figures) -> None:
        """Add the figures of another pass over the same frames to these."""
        self.latencies += other.latencies
        self.wall += other.wall
        self.cpu += other.cpu
        self.peak_rss = max(self.peak_rss, other.peak_rss)
        self.codes_expected += other.codes_expected
        self.codes_read += other.codes_read
        self.words_expected += other.words_expected
        self.words_read += other.words_read

    def row(self) -> dict[str, float]:
        n = len(self.latencies) or 1
        return {
            "fps": len(self.latencies) / self.wall if self.wall else 0.0,
            "p50_ms": 1000 * float(np.percentile(self.latencies, 50)),
            "p95_ms": 1000 * float(np.percentile(self.latencies, 95)),
            "cpu_s_per_frame": self.cpu / n,
            "peak_rss_mb": self.peak_rss / 2**20,
            "codes": self.codes_read / self.codes_expected if self.codes_expected else float("nan"),
            "word_recall": self.words_read / self.words_expected
            if self.words_expected
            else float("nan"),
        }


class RssSampler:
    """Samples this process's resident memory (with its children) every 20 ms."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(0.02):
            try:
                rss = me.memory_info().rss + sum(
                    c.memory_info().rss for c in me.children(recursive=True)
                )
            except psutil.Error:
                continue
            self.peak = max(self.peak, rss)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def cpu_seconds() -> float:
    """CPU time of this process and of its live child processes (the reader workers)."""
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += sum(child.cpu_times()[:2])
    return total


def generated(
    count: int, width: int, height: int, seed: int, codes: tuple[int, int] = (0, 4)
) -> list[Sample]:
    rng = np.random.default_rng(seed)
    samples = []
    for index in range(count):
        scene = render_scene(rng, width, height, labels=(1, 8), codes=codes)
        samples.append(
            Sample(
                scene.image,
                [o.value for o in scene.objects if o.class_name != "text"],
                [w for o in scene.objects if o.class_name == "text" for w in o.value.split()],
                f"synth-{width}x{height}-{index}",
            )
        )
    return samples


def corpus(limit: int | None, kind: str | None = None) -> list[Sample]:
    """Load the first ``limit`` corpus images; with ``kind``, those of "text" or "codes" only."""
    import cv2

    path = CORPUS / "MANIFEST.jsonl"
    if not path.exists():
        return []
    entries = [json.loads(line) for line in path.read_text("utf-8").splitlines()]
    samples = []
    for entry in entries[:limit] if limit else entries:
        if kind is not None and (entry["kind"] == "text") != (kind == "text"):
            continue
        image = cv2.imread(str(CORPUS / entry["file"]), cv2.IMREAD_COLOR)
        if entry["kind"] == "text":
            words = [w for text in entry["expected"] for w in text.split()]
            samples.append(Sample(image, [], words, entry["file"]))
        else:
            samples.append(Sample(image, [entry["expected"]], [], entry["file"]))
    return samples


def score(figures: Figures, sample: Sample, codes: list[str], texts: list[str]) -> None:
    figures.codes_expected += len(sample.codes)
    remaining = list(codes)
    for code in sample.codes:
        if code in remaining:
            remaining.remove(code)
            figures.codes_read += 1
    joined = "\n".join("".join(t.split()) for t in texts).lower()
    figures.words_expected += len(sample.words)
    counts: dict[str, int] = {}
    for word in sample.words:
        counts[word.lower()] = counts.get(word.lower(), 0) + 1
    figures.words_read += sum(min(n, joined.count(w)) for w, n in counts.items())


def naive_reader() -> Callable[[np.ndarray], tuple[list[str], list[str]]]:
    from pyzbar import pyzbar
    from rapidocr_onnxruntime import RapidOCR

    engine = RapidOCR()

    def read(image: np.ndarray) -> tuple[list[str], list[str]]:
        result, _ = engine(image)
        texts = [item[1] for item in result or []]
        codes = [s.data.decode("utf-8", "replace") for s in pyzbar.decode(image)]
        return codes, texts

    return read


def run_naive(
    read: Callable[[np.ndarray], tuple[list[str], list[str]]], samples: list[Sample], bar: tqdm
) -> Figures:
    read(samples[0].image)  # warm-up
    figures = Figures()
    with RssSampler() as rss:
        cpu0, wall0 = cpu_seconds(), time.perf_counter()
        for sample in samples:
            started = time.perf_counter()
            codes, texts = read(sample.image)
            figures.latencies.append(time.perf_counter() - started)
            score(figures, sample, codes, texts)
            bar.update()
        figures.wall, figures.cpu = time.perf_counter() - wall0, cpu_seconds() - cpu0
    figures.peak_rss = rss.peak
    return figures


async def run_pipeline(
    pipeline: Pipeline, samples: list[Sample], bar: tqdm, *, overlap: bool, seen: bool
) -> Figures:
    """Run the frames through the pipeline, as ``edge run`` drives it when ``overlap`` is set.

    With ``overlap``, each frame is detected while the previous frame's reads run. Without,
    one frame is detected and read before the next one starts. With ``seen``, the warm-up
    reads the first frame, as a fixed camera has seen its scene before.
    """
    # The warm-up frame of changing scenes is upside down: the first frame itself would leave
    # readings that pipeline.reuse_unchanged hands to the first measured frame unread.
    warm_up = samples[0].image if seen else np.ascontiguousarray(samples[0].image[::-1])
    await pipeline.process(Frame(0, time.time(), warm_up, "warm-up"))
    figures = Figures()

    def record(result: FrameResult) -> None:
        figures.latencies.append(result.timings_ms["total"] / 1000)
        sample = samples[result.seq - 1]
        codes = [c.text or "" for r in result.regions for c in r.reading.codes]
        texts = [line.text for r in result.regions for line in r.reading.lines]
        score(figures, sample, codes, texts)
        bar.update()

    with RssSampler() as rss:
        cpu0, wall0 = cpu_seconds(), time.perf_counter()
        frames = [Frame(seq, time.time(), s.image, s.source) for seq, s in enumerate(samples, 1)]
        if overlap:
            async with contextlib.aclosing(pipeline.stream(frames)) as results:
                async for result in results:
                    if isinstance(result, FailedFrame):
                        raise result.error
                    record(result)
        else:
            for frame in frames:
                record(await pipeline.process(frame))
        figures.wall, figures.cpu = time.perf_counter() - wall0, cpu_seconds() - cpu0
    figures.peak_rss = rss.peak
    return figures


def daemon_memory(
    samples: list[Sample], config_path: Path | None, timeout: float = 1800.0
) -> tuple[float, float]:
    """Run ``edge run`` over the frames in a child process; return its peak RSS and PSS in MB.

    The daemon gets the benchmark's configuration file, if any, with the camera pointed at
    the frames and MQTT at a loopback port where nothing listens, so results stay in the
    outbox. A daemon still running after ``timeout`` seconds is killed.
    """
    import cv2

    with tempfile.TemporaryDirectory(prefix="edge-bench-") as temp:
        folder = Path(temp)
        frames = folder / "frames"
        frames.mkdir()
        for index, sample in enumerate(samples):
            cv2.imwrite(str(frames / f"{index:04d}.png"), sample.image)
        settings = tomllib.loads(config_path.read_text("utf-8")) if config_path else {}
        settings["camera"] = {"kind": "simulated", "path": str(frames), "fps": 0}
        mqtt = settings.setdefault("mqtt", {})
        mqtt.update({"host": "127.0.0.1", "port": unused_port(), "tls": False})
        mqtt.pop("ca_file", None)
        settings["outbox"] = {"path": str(folder / "outbox.sqlite3")}
        config = folder / "edge.toml"
        config.write_text(to_toml(settings), "utf-8")
        command = [sys.executable, "-m", "edge", "run", "--config", str(config)]
        log = folder / "edge.log"
        with log.open("w") as stderr:
            daemon = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr)
        peak_rss = peak_pss = 0
        try:
            process = psutil.Process(daemon.pid)
            deadline = time.monotonic() + timeout
            while daemon.poll() is None and time.monotonic() < deadline:
                rss = pss = 0
                for member in [process, *process.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        info = member.memory_full_info()
                        rss, pss = rss + info.rss, pss + info.pss
                peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
                time.sleep(0.02)
        finally:
            stop(daemon)
        if daemon.returncode != 0:
            tail = log.read_text("utf-8", "replace").splitlines()[-5:]
            print(f"edge run exited with status {daemon.returncode}:", *tail, sep="\n  ")
    return peak_rss / 2**20, peak_pss / 2**20


def stop(process: subprocess.Popen[bytes]) -> None:
    """Terminate a child process that still runs, killing it if it ignores that for 30 s."""
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def to_toml(table: dict[str, Any], prefix: str = "") -> str:
    """Write a parsed configuration back as TOML: strings, numbers, booleans, lists, tables."""
    lines = []
    for key, value in table.items():
        if not isinstance(value, dict):
            lines.append(f"{key} = {json.dumps(value)}")
    for key, value in table.items():
        if isinstance(value, dict):
            name = f"{prefix}{key}"
            lines.append(f"\n[{name}]")
            lines.append(to_toml(value, f"{name}."))
    return "\n".join(lines) + "\n"


def unused_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def frame_sets(args: argparse.Namespace) -> dict[str, list[Sample]]:
    wanted = set(args.sets.split(","))
    sets: dict[str, list[Sample]] = {}
    if "720p" in wanted:
        sets["720p"] = generated(args.frames, 1280, 720, seed=1)
    if "1080p" in wanted:
        sets["1080p"] = generated(args.frames, 1920, 1080, seed=2)
    if "static" in wanted:
        base = generated(1, 1280, 720, seed=3)[0]
        sets["static"] = [base] * args.static
    if "static-text" in wanted:
        base = generated(1, 1280, 720, seed=3, codes=(0, 0))[0]
        sets["static-text"] = [base] * args.static
    for name, kind in (("corpus", None), ("corpus-codes", "codes"), ("corpus-text", "text")):
        if name not in wanted:
            continue
        found = corpus(args.corpus_limit, kind)
        if found:
            sets[name] = found
        else:
            manifest = CORPUS / "MANIFEST.jsonl"
            print(
                f"{name} set skipped: {manifest} is missing or lists no such image", file=sys.stderr
            )
    return sets


async def main_async(args: argparse.Namespace) -> dict[str, dict[str, dict[str, float]]]:
    from dataclasses import replace

    import cv2

    sets = frame_sets(args)
    if not sets:
        return {}
    modes = args.modes.split(",")
    total = sum(len(s) for s in sets.values()) * len(modes) * args.rounds
    config = load_config(args.config)
    naive = naive_reader() if "naive" in modes else None
    pipelines: dict[str, Pipeline] = {}
    if "sequential" in modes:
        sequential = replace(config, pipeline=replace(config.pipeline, concurrency=1))
        pipelines["sequential"] = await asyncio.to_thread(build_pipeline, sequential)
    if "pipeline" in modes:
        pipelines["pipeline"] = await asyncio.to_thread(build_pipeline, config)
    figures = {name: {mode: Figures() for mode in modes} for name in sets}
    table: dict[str, dict[str, dict[str, float]]] = {}
    with tqdm(total=total, unit="frame", file=sys.stderr) as bar:
        # The modes take turns on each set, so that a change of the machine's speed during
        # the run affects all of them alike.
        for round_number in range(1, args.rounds + 1):
            for name, samples in sets.items():
                for mode in modes:
                    bar.set_description(f"round {round_number}: {mode} {name}")
                    if naive is not None and mode == "naive":
                        # -1 restores OpenCV's default, which a user of rapidocr would have.
                        cv2.setNumThreads(-1)
                        passed = await asyncio.to_thread(run_naive, naive, samples, bar)
                    else:
                        # One OpenCV thread, as `edge run` sets at start.
                        use_one_opencv_thread()
                        passed = await run_pipeline(
                            pipelines[mode],
                            samples,
                            bar,
                            overlap=mode == "pipeline",
                            seen=name.startswith("static"),
                        )
                    figures[name][mode].add(passed)
        for pipeline in pipelines.values():
            await pipeline.aclose()
        for name, by_mode in figures.items():
            table[name] = {mode: f.row() for mode, f in by_mode.items()}
        if args.daemon_memory:
            for name, samples in sets.items():
                bar.set_description(f"daemon memory {name}")
                rss, pss = await asyncio.to_thread(daemon_memory, samples, args.config)
                table[name]["daemon"] = {"peak_rss_mb": rss, "peak_pss_mb": pss}
    return table


def _share(value: float) -> str:
    """Format a share as a percentage, or a dash for a set with nothing of that kind."""
    return "-" if np.isnan(value) else f"{100 * value:.0f}%"


def _ratio(value: float) -> str:
    return "-" if np.isnan(value) else f"{value:.2f}"


def print_table(table: dict[str, dict[str, dict[str, float]]]) -> None:
    width = max([len("set"), *map(len, table)]) + 2
    header = f"{'set':<{width}}{'mode':<12}{'fps':>7}{'p50 ms':>9}{'p95 ms':>9}{'cpu s/f':>9}"
    print(header + f"{'peak MB':>9}{'codes':>8}{'words':>8}{'x naive':>9}{'x seq':>7}")
    for name, modes in table.items():
        naive_fps = modes.get("naive", {}).get("fps")
        sequential_fps = modes.get("sequential", {}).get("fps")
        for mode, row in modes.items():
            if mode == "daemon":
                continue
            ratio = row["fps"] / naive_fps if naive_fps else float("nan")
            versus_sequential = row["fps"] / sequential_fps if sequential_fps else float("nan")
            print(
                f"{name:<{width}}{mode:<12}{row['fps']:>7.2f}{row['p50_ms']:>9.0f}"
                f"{row['p95_ms']:>9.0f}{row['cpu_s_per_frame']:>9.2f}{row['peak_rss_mb']:>9.0f}"
                f"{_share(row['codes']):>8}{_share(row['word_recall']):>8}{_ratio(ratio):>9}"
                f"{_ratio(versus_sequential):>7}"
            )
    daemon_rows = [(name, modes["daemon"]) for name, modes in table.items() if "daemon" in modes]
    if daemon_rows:
        print("\ndaemon alone (edge run in a child process), peak memory of its process tree:")
        for name, row in daemon_rows:
            rss, pss = row["peak_rss_mb"], row["peak_pss_mb"]
            print(f"{name:<{width}}RSS {rss:>6.0f} MB   PSS {pss:>6.0f} MB")


def plot(table: dict[str, dict[str, dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    modes = sorted({m for modes in table.values() for m in modes if m != "daemon"})
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        values = [table[n].get(mode, {}).get("fps", 0.0) for n in names]
        ax.bar([x + i * width for x in range(len(names))], values, width, label=mode)
    ax.set_xticks([x + width * (len(modes) - 1) / 2 for x in range(len(names))], names)
    ax.set_ylabel("frames per second")
    ax.set_yscale("log")
    ax.set_title(f"edge pipeline vs naive, {os.cpu_count()} CPUs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=20, help="generated frames per size")
    parser.add_argument("--static", type=int, default=60, help="frames of each static scene")
    parser.add_argument("--corpus-limit", type=int, help="only the first N corpus images")
    parser.add_argument("--sets", default=",".join(DEFAULT_SETS), help="comma-separated frame sets")
    parser.add_argument("--modes", default=",".join(MODE_NAMES), help="comma-separated modes")
    parser.add_argument(
        "--rounds", type=int, default=1, help="passes over each set, the modes taking turns"
    )
    parser.add_argument("--config", type=Path, help="daemon configuration for the pipeline")
    parser.add_argument("--plot", type=Path, default=Path("bench.png"))
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument(
        "--no-daemon-memory",
        dest="daemon_memory",
        action="store_false",
        help="skip the memory measurement of edge run in a child process",
    )
    args = parser.parse_args()
    for option, given, known in (
        ("--sets", args.sets, SET_NAMES),
        ("--modes", args.modes, MODE_NAMES),
    ):
        unknown = sorted(set(given.split(",")) - set(known))
        if unknown:
            parser.error(f"{option}: unknown {unknown}, choose from {','.join(known)}")
    table = asyncio.run(main_async(args))
    if not table:
        print("no frame set to measure: see the lines above", file=sys.stderr)
        return 2
    print_table(table)
    plot(table, args.plot)
    print(f"plot written to {args.plot}")
    if args.json:
        # A set with no code or no word has NaN shares, which strict JSON has no value for.
        finite = {
            name: {
                mode: {key: None if np.isnan(value) else value for key, value in row.items()}
                for mode, row in modes.items()
            }
            for name, modes in table.items()
        }
        args.json.write_text(json.dumps(finite, indent=2, allow_nan=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
