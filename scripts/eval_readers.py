"""Measure CodeReader against plain pyzbar on the QR and barcode images of the test corpus.

Usage: .venv/bin/python scripts/eval_readers.py [CORPUS_DIR]

For each image, a decode counts as a hit when one decoded payload equals the MANIFEST
``expected`` value. A CodeReader code matches when its ``text`` equals that value or its
``data`` equals the value's UTF-8 bytes, because Shift_JIS payloads keep their raw bytes in
``data``. A pyzbar result matches when its data equals the UTF-8 bytes, since pyzbar already
converts payloads to UTF-8. CodeReader is given the whole image, as
the pipeline's full-frame fallback would; plain ``pyzbar.pyzbar.decode`` gets the same
image. Prints one row per corpus folder and the images only one decoder got right.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
from pyzbar import pyzbar

from edge.readers.codes import CodeReader

DEFAULT_CORPUS = Path("/work/shared/corpus")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus", nargs="?", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument(
        "--try-harder",
        action="store_true",
        help="run every CodeReader retry and merge the results (slower)",
    )
    args = parser.parse_args()

    reader = CodeReader(try_harder=args.try_harder)
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    seconds: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    differences: list[str] = []
    lines = (args.corpus / "MANIFEST.jsonl").read_text("utf-8").splitlines()
    for entry in map(json.loads, lines):
        if entry["kind"] not in {"qr", "barcode"}:
            continue
        image = cv2.imread(str(args.corpus / entry["file"]), cv2.IMREAD_COLOR)  # BGR uint8
        if image is None:
            print(f"cannot read {entry['file']}: skipped", file=sys.stderr)
            continue
        expected = entry["expected"].encode("utf-8")
        folder = str(Path(entry["file"]).parent)

        start = time.perf_counter()
        codes = reader.read(np.asarray(image, dtype=np.uint8)).codes
        middle = time.perf_counter()
        plain = {symbol.data for symbol in pyzbar.decode(image)}
        end = time.perf_counter()

        ours_hit = any(c.data == expected or c.text == entry["expected"] for c in codes)
        plain_hit = expected in plain
        totals[folder][0] += 1
        totals[folder][1] += ours_hit
        totals[folder][2] += plain_hit
        seconds[folder][0] += middle - start
        seconds[folder][1] += end - middle
        if ours_hit != plain_hit:
            winner = "CodeReader" if ours_hit else "pyzbar"
            differences.append(f"{entry['file']}: only {winner}")

    columns = ("images", "CodeReader", "pyzbar", "ms/img ours", "ms/img pyzbar")
    header = f"{'folder':<22} " + " ".join(f"{name:>13}" for name in columns)
    print(header)
    print("-" * len(header))
    for folder, (count, ours_hits, plain_hits) in sorted(totals.items()):
        ours_ms = 1000 * seconds[folder][0] / count
        plain_ms = 1000 * seconds[folder][1] / count
        cells = (f"{count}", f"{ours_hits}", f"{plain_hits}", f"{ours_ms:.1f}", f"{plain_ms:.1f}")
        print(f"{folder:<22} " + " ".join(f"{cell:>13}" for cell in cells))
    sums = [sum(row[i] for row in totals.values()) for i in range(3)]
    print(f"{'total':<22} " + " ".join(f"{cell:>13}" for cell in sums))
    for line in differences:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
