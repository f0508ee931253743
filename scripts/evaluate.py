"""Measure recognition on the real images of ../shared/corpus against standalone baselines.

For every QR and barcode image: is the expected payload among the codes decoded (a) by pyzbar
alone on the full image and (b) by the daemon's pipeline (`edge scan`'s path)? For every text
image: word recall of (a) rapidocr with default settings on the full image and (b) the
pipeline. Words are compared case-insensitively after stripping punctuation at their ends,
because SROIE transcripts are upper-cased and ICDAR 2015 ones are per word. PP-OCR's recogniser
often drops the spaces of small print ("BestBefore"), so an expected word counts as found as
many times as it occurs in the recognised text with its spaces removed (at most as many times
as it is expected).

Usage: .venv/bin/python scripts/evaluate.py [--corpus DIR] [--limit N] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edge.config import load_config  # noqa: E402
from edge.factory import build_pipeline  # noqa: E402
from edge.results import Frame, FrameResult  # noqa: E402

PUNCTUATION = ".,:;!?\"'()[]{}<>*"


def words(texts: list[str]) -> Counter[str]:
    """Lower-cased words with surrounding punctuation removed, as a multiset."""
    found: Counter[str] = Counter()
    for text in texts:
        for raw in text.split():
            word = raw.strip(PUNCTUATION).lower()
            if word:
                found[word] += 1
    return found


def recall(expected: Counter[str], texts: list[str]) -> tuple[int, int]:
    """Matched and total expected words, looked up in the texts with spaces removed."""
    joined = "\n".join("".join(text.split()) for text in texts).lower()
    hits = sum(min(n, joined.count(word)) for word, n in expected.items())
    return hits, sum(expected.values())


def baseline_codes(image: np.ndarray) -> list[str]:
    from pyzbar import pyzbar

    return [s.data.decode("utf-8", errors="replace") for s in pyzbar.decode(image)]


def baseline_text(engine: Any, image: np.ndarray) -> list[str]:
    result, _ = engine(image)
    return [item[1] for item in result or []]


def pipeline_codes(result: FrameResult) -> list[str]:
    return [c.text or "" for r in result.regions for c in r.reading.codes]


def pipeline_text(result: FrameResult) -> list[str]:
    return [line.text for r in result.regions for line in r.reading.lines]


async def run(corpus: Path, limit: int | None) -> dict[str, Any]:
    from rapidocr_onnxruntime import RapidOCR

    entries = [json.loads(line) for line in (corpus / "MANIFEST.jsonl").read_text().splitlines()]
    if limit:
        entries = entries[:limit]
    pipeline = await asyncio.to_thread(build_pipeline, load_config(None))
    engine = RapidOCR()
    per_folder: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    seconds = defaultdict(float)
    for seq, entry in enumerate(entries):
        image = cv2.imread(str(corpus / entry["file"]), cv2.IMREAD_COLOR)
        folder = str(Path(entry["file"]).parent)
        stats = per_folder[folder]
        stats["images"] += 1
        started = time.perf_counter()
        result = await pipeline.process(Frame(seq, time.time(), image, entry["file"]))
        seconds["pipeline"] += time.perf_counter() - started
        if entry["kind"] in ("qr", "barcode"):
            started = time.perf_counter()
            base = baseline_codes(image)
            seconds["pyzbar"] += time.perf_counter() - started
            stats["baseline_ok"] += entry["expected"] in base
            stats["pipeline_ok"] += entry["expected"] in pipeline_codes(result)
        else:
            started = time.perf_counter()
            base_lines = baseline_text(engine, image)
            seconds["rapidocr"] += time.perf_counter() - started
            expected = words(entry["expected"])
            hit, total = recall(expected, base_lines)
            stats["baseline_words"] += hit
            stats["words"] += total
            hit, _ = recall(expected, pipeline_text(result))
            stats["pipeline_words"] += hit
        print(f"\r{seq + 1}/{len(entries)} {entry['file']:<60}", end="", file=sys.stderr)
    print(file=sys.stderr)
    await pipeline.aclose()
    return {"folders": {k: dict(v) for k, v in per_folder.items()}, "seconds": dict(seconds)}


def report(data: dict[str, Any]) -> None:
    folders = data["folders"]
    print(f"{'folder':<24}{'images':>7}{'pyzbar':>9}{'pipeline':>10}   (codes read)")
    codes = {"images": 0.0, "baseline_ok": 0.0, "pipeline_ok": 0.0}
    for name, stats in sorted(folders.items()):
        if "words" in stats:
            continue
        for key in codes:
            codes[key] += stats.get(key, 0)
        print(
            f"{name:<24}{stats['images']:>7.0f}{stats.get('baseline_ok', 0):>9.0f}"
            f"{stats.get('pipeline_ok', 0):>10.0f}"
        )
    n = codes["images"] or 1
    print(
        f"{'all codes':<24}{codes['images']:>7.0f}{100 * codes['baseline_ok'] / n:>8.1f}%"
        f"{100 * codes['pipeline_ok'] / n:>9.1f}%"
    )
    print()
    print(
        f"{'folder':<24}{'images':>7}{'words':>7}{'rapidocr':>10}{'pipeline':>10}   (word recall)"
    )
    text = {"words": 0.0, "baseline_words": 0.0, "pipeline_words": 0.0}
    for name, stats in sorted(folders.items()):
        if "words" not in stats:
            continue
        for key in text:
            text[key] += stats[key]
        w = stats["words"] or 1
        print(
            f"{name:<24}{stats['images']:>7.0f}{stats['words']:>7.0f}"
            f"{100 * stats['baseline_words'] / w:>9.1f}%{100 * stats['pipeline_words'] / w:>9.1f}%"
        )
    w = text["words"] or 1
    print(
        f"{'all text':<24}{'':>7}{text['words']:>7.0f}{100 * text['baseline_words'] / w:>9.1f}%"
        f"{100 * text['pipeline_words'] / w:>9.1f}%"
    )
    print()
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(data["seconds"].items())))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=REPO.parent / "shared" / "corpus")
    parser.add_argument("--limit", type=int, help="only the first N manifest entries")
    parser.add_argument("--json", type=Path, help="also write the raw figures to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    data = asyncio.run(run(args.corpus, args.limit))
    report(data)
    if args.json:
        args.json.write_text(json.dumps(data, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
