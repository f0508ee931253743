"""``edge scan``: read image files once and print one JSON frame result per image."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from edge.camera.simulated import IMAGE_EXTENSIONS, read_image
from edge.config import Config
from edge.errors import EdgeError, ImageError
from edge.factory import build_pipeline
from edge.results import Frame

logger = logging.getLogger(__name__)


class ScanInputError(EdgeError):
    """Raised when a path given to ``edge scan`` does not exist or contains no images."""


def collect_images(paths: Iterable[Path]) -> list[Path]:
    """Expand folders to their image files in name order, keeping files as given.

    Raises:
        ScanInputError: A path does not exist, or a folder contains no image file.
    """
    images: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                msg = f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in folder {path}"
                raise ScanInputError(msg)
            images.extend(found)
        elif path.is_file():
            images.append(path)
        else:
            msg = f"file not found: {path}"
            raise ScanInputError(msg)
    return images


async def scan(config: Config, paths: Sequence[Path], output: TextIO = sys.stdout) -> int:
    """Read every image once and write one JSON line per readable image to ``output``.

    Returns:
        The number of images that could not be decoded (each is logged as an error).
    """
    images = collect_images(paths)
    # Files given to scan are unrelated images, so no reading is carried from one to the next.
    no_reuse = replace(config, pipeline=replace(config.pipeline, reuse_unchanged=False))
    pipeline = await asyncio.to_thread(build_pipeline, no_reuse)
    failures = 0
    try:
        for seq, path in enumerate(images):
            try:
                image = await asyncio.to_thread(read_image, path)
            except (OSError, ImageError) as exc:
                logger.error("skipped %s: %s", path, exc)
                failures += 1
                continue
            frame = Frame(seq=seq, captured_at=time.time(), image=image, source=str(path))
            result = await pipeline.process(frame)
            output.write(result.to_json(config.device.id) + "\n")
            output.flush()
    finally:
        await pipeline.aclose()
    return failures
