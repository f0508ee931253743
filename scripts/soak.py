"""Run the pipeline over many frames and report resident memory over time.

Frames cycle through generated scenes of several sizes (640x480 to 1920x1080) with 0 to 8
labels and 0 to 4 codes, so region sizes and counts vary from frame to frame. Every
``--report`` frames it prints the frame count, the elapsed minutes and the resident memory
of this process plus its reader worker processes. At the end it prints memory at start, peak
and end, and the growth between the second and the last quarter of the run: memory that
levels off shows little growth there.

Usage: .venv/bin/python scripts/soak.py [--frames 5000] [--scenes 40] [--report 250]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edge.config import load_config  # noqa: E402
from edge.factory import build_pipeline  # noqa: E402
from edge.results import Frame  # noqa: E402
from edge.synth import render_scene  # noqa: E402

SIZES = ((640, 480), (1280, 720), (1920, 1080), (1024, 768))


def resident_bytes() -> int:
    """Resident memory of this process and its children, in bytes."""
    me = psutil.Process()
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            continue
    return total


async def soak(frames: int, scene_count: int, report: int) -> list[tuple[int, float, int]]:
    rng = np.random.default_rng(7)
    scenes = [
        render_scene(rng, *SIZES[i % len(SIZES)], labels=(0, 8), codes=(0, 4)).image
        for i in range(scene_count)
    ]
    config = load_config(None)
    pipeline = await asyncio.to_thread(build_pipeline, config)
    samples: list[tuple[int, float, int]] = []
    started = time.monotonic()
    try:
        for seq in range(frames):
            # Consecutive frames differ, so every region is read rather than reused.
            image = scenes[seq % scene_count]
            await pipeline.process(Frame(seq, time.time(), image, f"scene-{seq % scene_count}"))
            if seq % report == 0 or seq == frames - 1:
                minutes = (time.monotonic() - started) / 60
                rss = resident_bytes()
                samples.append((seq + 1, minutes, rss))
                print(f"{seq + 1:>7} frames {minutes:7.1f} min {rss / 2**20:8.1f} MB", flush=True)
    finally:
        await pipeline.aclose()
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=5000)
    parser.add_argument("--scenes", type=int, default=40, help="distinct generated scenes")
    parser.add_argument("--report", type=int, default=250, help="frames between memory samples")
    args = parser.parse_args()
    samples = asyncio.run(soak(args.frames, args.scenes, args.report))
    rss = [s[2] / 2**20 for s in samples]
    quarter = max(1, len(rss) // 4)
    second_quarter = float(np.mean(rss[quarter : 2 * quarter] or rss))
    last_quarter = float(np.mean(rss[-quarter:]))
    print(
        f"frames {samples[-1][0]}, minutes {samples[-1][1]:.1f}, memory MB: start {rss[0]:.1f}, "
        f"peak {max(rss):.1f}, end {rss[-1]:.1f}; growth from the second to the last quarter "
        f"{last_quarter - second_quarter:+.1f} MB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
