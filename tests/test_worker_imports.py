"""Code-reading worker processes load only what a decode needs.

Each worker is a separate interpreter, so every module it imports costs resident memory
once per worker. OpenCV took about 17 MB of each, asyncio and the rest of the WaitGroup
about 10 MB.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# Modules of the daemon process that a code-reading worker must not load.
HEAVY = ("asyncio", "cv2", "onnxruntime", "rapidocr_onnxruntime", "edge.cli", "edge.pipeline")

# Driver that runs one code read and then a probe in the same worker process of a WaitGroup.
# It runs with `python -c`, whose main module a "spawn" worker does not import again.
DRIVER = f"""
import asyncio
import numpy as np
from edge.readers.codes import CodeReader
from edge.waitgroup import WaitGroup

PROBE = "[name for name in {HEAVY!r} if name in __import__('sys').modules]"

async def main():
    async with WaitGroup(1) as wg:
        image = np.full((64, 64, 3), 255, dtype=np.uint8)
        await (await wg.go(CodeReader(try_harder=True).read, image, kind="process"))
        print(await (await wg.go(eval, PROBE, kind="process")))

asyncio.run(main())
"""


def run_python(code: str) -> str:
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout.strip()


def test_code_worker_loads_no_daemon_modules() -> None:
    """A worker that has decoded codes has loaded none of the daemon's heavy modules."""
    assert run_python(DRIVER) == "[]"


def test_edge_script_imports_nothing_heavy() -> None:
    """The `edge` script's imports, which a "spawn" worker runs again, load no heavy module.

    multiprocessing runs the main script of the parent in each new worker under the name
    ``__mp_main__``, which is what the probe does.
    """
    script = Path(sys.executable).with_name("edge")
    if not script.exists():
        pytest.skip(f"the edge script is not installed at {script}")
    probe = (
        "import runpy, sys\n"
        f"runpy.run_path({str(script)!r}, run_name='__mp_main__')\n"
        f"print([name for name in {HEAVY!r} if name in sys.modules])\n"
    )
    assert run_python(probe) == "[]"
