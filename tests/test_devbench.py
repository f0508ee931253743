"""`edge bench` as a user runs it: real detector, OCR and zbar, in a subprocess."""

from __future__ import annotations

import copy
import json
import os
import platform
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import onnxruntime
import pytest
from conftest import REPO

import edge
from edge.cli import main
from edge.config import Config
from edge.devbench import SEED, BenchError, format_report, frame_size

STAGE_NAMES = ["detector", "ocr", "codes", "codes_full_frame", "ocr_document", "pipeline"]
# The first generated scene at this size contains text, a QR code and a barcode that the default
# detector finds, so every stage runs on one frame (ocr_document on one document frame).
SIZE = (960, 540)


def _edge(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=REPO,
    )


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    """The JSON object of one `edge bench --json` run on one frame."""
    completed = _edge("bench", "--frames", "1", "--size", f"{SIZE[0]}x{SIZE[1]}", "--json")
    assert completed.returncode == 0, completed.stderr
    parsed: dict[str, Any] = json.loads(completed.stdout)
    return parsed


def test_bench_json_lists_every_stage(report: dict[str, Any]) -> None:
    assert list(report["stages"]) == STAGE_NAMES


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_bench_json_stage_ran(report: dict[str, Any], name: str) -> None:
    stage = report["stages"][name]
    assert stage["calls"] > 0
    assert stage["mean_ms"] > 0
    assert stage["p50_ms"] > 0
    assert stage["p95_ms"] > 0
    assert stage["cpu_ms_per_call"] > 0


@pytest.mark.parametrize("name", ["detector", "codes_full_frame", "ocr_document", "pipeline"])
def test_bench_json_frame_stages_once(report: dict[str, Any], name: str) -> None:
    assert report["stages"][name]["calls"] == 1


def test_bench_json_pipeline_figures(report: dict[str, Any]) -> None:
    pipeline = report["pipeline"]
    assert pipeline["frames_per_second"] > 0
    assert pipeline["reuse_unchanged"] is False
    assert set(pipeline["regions"]) == {"ok", "empty", "timeout", "error"}
    # Every region the stage rows read is read again by the pipeline.
    regions_read = report["stages"]["ocr"]["calls"] + report["stages"]["codes"]["calls"]
    assert sum(pipeline["regions"].values()) >= regions_read


def test_bench_json_header(report: dict[str, Any]) -> None:
    assert report["edge_version"] == edge.__version__
    assert report["python_version"] == platform.python_version()
    assert report["machine"] == platform.machine()
    assert report["cpus_usable"] == len(os.sched_getaffinity(0))
    assert report["cpus_total"] == os.cpu_count()
    assert report["onnxruntime_version"] == onnxruntime.__version__
    assert report["onnxruntime_providers"] == onnxruntime.get_available_providers()
    assert Path(report["model"]) == REPO / "models" / "detector.onnx"
    assert report["frames"] == {"count": 1, "width": SIZE[0], "height": SIZE[1], "seed": SEED}


@pytest.mark.parametrize(
    ("p95_ms", "ratio", "raise_to"),
    [(500.0, "10.0", None), (2_600.0, "1.9", "5.2"), (2_480.0, "2.0", None)],
)
def test_bench_document_timeout_note(
    report: dict[str, Any], p95_ms: float, ratio: str, raise_to: str | None
) -> None:
    """The table compares pipeline.op_timeout with the p95 of a document read.

    The ratio is rounded before the comparison, so a printed 2.0 asks for nothing.
    """
    changed = copy.deepcopy(report)
    changed["stages"]["ocr_document"]["p95_ms"] = p95_ms
    table = format_report(changed)
    assert f"pipeline.op_timeout = 5.0 s is {ratio} times the p95 of ocr_document." in table
    if raise_to is None:
        assert "Raise pipeline.op_timeout" not in table
    else:
        assert f"frame_deadline with it, to at least {raise_to} s" in table


def test_bench_json_document_timeout(report: dict[str, Any]) -> None:
    """The JSON carries the op_timeout check of the table."""
    p95_seconds = report["stages"]["ocr_document"]["p95_ms"] / 1000
    check = report["document_timeout"]
    assert check["op_timeout_over_p95"] == round(5.0 / p95_seconds, 1)
    assert (check["raise_to_seconds"] is None) is (check["op_timeout_over_p95"] >= 2)


@pytest.mark.parametrize(
    ("share", "reason"),
    [(0.0, "pipeline.document_share = 0"), (0.5, "no class is routed to the text reader")],
)
def test_bench_document_row_says_why_skipped(
    report: dict[str, Any], share: float, reason: str
) -> None:
    changed = copy.deepcopy(report)
    changed["settings"]["pipeline.document_share"] = share
    changed["stages"]["ocr_document"].update(calls=0, p95_ms=None)
    assert f"ocr_document did not run: {reason}." in format_report(changed)


@pytest.mark.parametrize("p95_ms", [None, 0.0])
def test_bench_document_note_needs_p95(report: dict[str, Any], p95_ms: float | None) -> None:
    """With no document read, or none that took time, the table has no op_timeout line."""
    changed = copy.deepcopy(report)
    changed["stages"]["ocr_document"].update(calls=0 if p95_ms is None else 1, p95_ms=p95_ms)
    assert "times the p95 of ocr_document" not in format_report(changed)


def test_bench_json_ocr_models_rewritten(report: dict[str, Any]) -> None:
    assert report["ocr_models_rewritten"] is True


def test_bench_json_default_threads(report: dict[str, Any]) -> None:
    assert report["threads"] == {
        "detector.threads": 0,
        "detector_intra_op_threads": max(1, len(os.sched_getaffinity(0)) - 2),
        "readers.text.threads": 1,
        "pipeline.concurrency": 2,
        "opencv_threads": 1,
    }
    assert report["settings"] == {
        "detector.tile_scale": 4.0,
        "detector.merge_classes": ["text", "qr_code", "barcode"],
        "readers.text.max_detect_pixels": 300_000,
        "readers.text.rewrite_models": True,
        "pipeline.code_workers": 1,
        "pipeline.document_share": 0.5,
        "pipeline.op_timeout": 5.0,
        "pipeline.frame_deadline": 10.0,
    }


def test_bench_table_names_stages_and_settings(tmp_path: Path) -> None:
    """The table run honours --config: its thread settings appear in the header."""
    config = tmp_path / "edge.toml"
    config.write_text(
        "[detector]\nthreads = 1\ntile_scale = 0\n[pipeline]\nconcurrency = 1\ndocument_share = 0\n"
    )
    completed = _edge(
        "bench", "--config", str(config), "--frames", "1", "--size", f"{SIZE[0]}x{SIZE[1]}"
    )
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    first_words = {line.split()[0] for line in lines if line.strip()}
    for name in STAGE_NAMES:
        assert name in first_words, name
    assert f"onnxruntime {onnxruntime.__version__}" in completed.stdout
    assert "detector.threads = 1 (1 intra-op thread)" in completed.stdout
    assert "frames: 1 generated scene of 960x540" in completed.stdout
    assert "pipeline.concurrency = 1" in completed.stdout
    assert "detector.tile_scale = 0.0" in completed.stdout
    assert "readers.text.rewrite_models = true" in completed.stdout
    assert "OCR models: rewritten" in completed.stdout
    assert "timing the whole pipeline" in completed.stderr
    # With documents off, their stage is listed but does not run.
    document_row = next(line for line in lines if line.startswith("ocr_document"))
    assert document_row.split()[2:] == ["0", "-", "-", "-"]
    assert "ocr_document did not run: pipeline.document_share = 0." in completed.stdout
    assert "times the p95 of ocr_document" not in completed.stdout


@pytest.mark.parametrize("value", ["1280by720", "1280x", "x720", "32x720", "1280x20000", "-1x5"])
def test_bench_bad_size_named(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["bench", f"--size={value}"])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert f"invalid size '{value}'" in error
    assert "WIDTHxHEIGHT" in error


@pytest.mark.parametrize("value", ["0", "-3", "five"])
def test_bench_bad_frames_named(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["bench", f"--frames={value}"])
    assert exited.value.code == 2
    assert f"invalid value '{value}'" in capsys.readouterr().err


def test_frame_size_precedence() -> None:
    """--size wins over the camera size, which wins over 1280x720 when both sides are set."""
    camera = replace(Config().camera, width=640, height=480)
    configured = replace(Config(), camera=camera)
    assert frame_size(configured, (320, 240)) == (320, 240)
    assert frame_size(configured, None) == (640, 480)
    assert frame_size(Config(), None) == (1280, 720)
    half = replace(Config(), camera=replace(Config().camera, width=640))
    assert frame_size(half, None) == (1280, 720)


def test_frame_size_small_camera_rejected() -> None:
    camera = replace(Config().camera, width=32, height=32)
    with pytest.raises(BenchError, match="camera size 32x32"):
        frame_size(replace(Config(), camera=camera), None)
