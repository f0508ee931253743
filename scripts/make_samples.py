"""Render the bundled sample frames into edge/samples/ with their expected objects.

Usage: PYTHONPATH=. .venv/bin/python scripts/make_samples.py [--out edge/samples]

Each frame comes from `edge.synth.render_scene` with a fixed seed and fixed counts, so running
the script again on a machine with the same fonts rewrites the same files.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import cv2
import numpy as np

from edge.synth import render_scene

LOGGER = logging.getLogger("make_samples")
JPEG_QUALITY = 85
SEED = 20_261_204

# (labels, codes, distortions) for each frame: clean frames first, so that the codes in them
# decode, then frames with the distortions the detector was trained on.
FRAME_PLAN: tuple[tuple[tuple[int, int], tuple[int, int], bool], ...] = (
    ((2, 2), (2, 2), False),
    ((1, 1), (3, 3), False),
    ((3, 3), (1, 1), False),
    ((2, 2), (2, 2), True),
    ((3, 3), (2, 2), True),
    ((1, 1), (3, 3), True),
)


def sample_objects(index: int) -> tuple[np.ndarray, list[dict[str, object]]]:
    """Render frame `index` of FRAME_PLAN and return its image and expected objects."""
    labels, codes, distortions = FRAME_PLAN[index]
    rng = np.random.default_rng([SEED, index])
    scene = render_scene(rng, 1280, 720, labels=labels, codes=codes, distortions=distortions)
    objects: list[dict[str, object]] = [
        {"class": o.class_name, "box": [round(v, 2) for v in o.box], "value": o.value}
        for o in scene.objects
    ]
    return scene.image, objects


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--out", type=Path, default=Path("edge/samples"), help="output folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    args.out.mkdir(parents=True, exist_ok=True)
    expected: dict[str, object] = {
        "generator": "edge.synth.render_scene",
        "seed": SEED,
        "box_format": "x, y, width, height in frame pixels",
        "frames": [],
    }
    frames: list[dict[str, object]] = []
    for index, (_, _, distortions) in enumerate(FRAME_PLAN):
        image, objects = sample_objects(index)
        name = f"frame-{index:03d}.jpg"
        cv2.imwrite(str(args.out / name), image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        frames.append({"file": name, "distortions": distortions, "objects": objects})
        LOGGER.info("wrote %s with %d objects", args.out / name, len(objects))
    expected["frames"] = frames
    path = args.out / "expected.json"
    path.write_text(json.dumps(expected, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    LOGGER.info("wrote %s", path)


if __name__ == "__main__":
    main()
