"""Smoke test for scripts/train_detector.py: a few steps, then an ONNX export that loads."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SMOKE_SIZE = 256


@pytest.fixture(scope="module")
def smoke_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run the training script in --smoke mode and return the exported ONNX path."""
    pytest.importorskip("torch")
    out = tmp_path_factory.mktemp("smoke") / "detector.onnx"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [
        sys.executable,
        str(REPO / "scripts" / "train_detector.py"),
        "--smoke",
        "--out",
        str(out),
    ]
    completed = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return out


@pytest.mark.slow
def test_train_smoke_writes_model(smoke_model: Path) -> None:
    """The smoke run writes an ONNX file and labels.txt next to it."""
    assert smoke_model.is_file()
    labels = (smoke_model.parent / "labels.txt").read_text(encoding="utf-8").splitlines()
    assert labels == ["text", "qr_code", "barcode"]


@pytest.mark.slow
def test_train_smoke_io_shapes(smoke_model: Path) -> None:
    """The export has input images [1, 3, S, S] and output output0 [1, 7, N] in 0..1 scores."""
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(smoke_model), providers=["CPUExecutionProvider"])
    (model_input,) = session.get_inputs()
    (model_output,) = session.get_outputs()
    assert model_input.name == "images"
    assert model_input.shape == [1, 3, SMOKE_SIZE, SMOKE_SIZE]
    assert model_output.name == "output0"
    cells = sum((SMOKE_SIZE // stride) ** 2 for stride in (8, 16, 32))
    result = session.run(None, {"images": np.zeros((1, 3, SMOKE_SIZE, SMOKE_SIZE), np.float32)})[0]
    assert result.shape == (1, 7, cells)
    assert result.dtype == np.float32
    assert float(result[0, 4:].min()) >= 0.0
    assert float(result[0, 4:].max()) <= 1.0


@pytest.mark.slow
def test_train_smoke_metadata(smoke_model: Path) -> None:
    """The export carries Ultralytics-style names, imgsz and stride metadata."""
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(smoke_model), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert ast.literal_eval(meta["names"]) == {0: "text", 1: "qr_code", 2: "barcode"}
    assert ast.literal_eval(meta["imgsz"]) == [SMOKE_SIZE, SMOKE_SIZE]
    assert meta["stride"] == "32"
    assert meta["version"]
    assert meta["description"]
