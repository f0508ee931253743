"""Tests of the settings that edge.factory derives from a configuration."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest

from edge.config import Config
from edge.factory import (
    build_detector,
    build_readers,
    detector_threads,
    full_frame_code_reader,
    pipeline_options,
)
from edge.readers.codes import CodeReader

TEXT_AND_CODES = {"text": "text", "qr_code": "codes", "barcode": "codes"}


def _config(
    threads: int,
    concurrency: int,
    *,
    text_threads: int = 1,
    code_workers: int = 1,
    routes: dict[str, str] | None = None,
) -> Config:
    config = Config()
    readers = config.readers
    return replace(
        config,
        detector=replace(config.detector, threads=threads),
        pipeline=replace(config.pipeline, concurrency=concurrency, code_workers=code_workers),
        readers=replace(
            readers,
            routes=TEXT_AND_CODES if routes is None else routes,
            text=replace(readers.text, threads=text_threads),
        ),
    )


@pytest.mark.parametrize(
    ("cpus", "config", "expected"),
    [
        pytest.param(2, _config(0, 2), 1, id="two-cpus"),
        pytest.param(4, _config(0, 2), 2, id="four-cpus"),
        pytest.param(8, _config(0, 1), 7, id="one-read"),
        pytest.param(2, _config(0, 8), 1, id="more-reads-than-cpus"),
        pytest.param(1, _config(0, 1), 1, id="one-cpu"),
        pytest.param(8, _config(0, 2, text_threads=2), 4, id="two-ocr-threads"),
        pytest.param(8, _config(0, 4, routes={"qr_code": "codes"}), 7, id="codes-one-worker"),
        pytest.param(
            8, _config(0, 4, code_workers=0, routes={"qr_code": "codes"}), 4, id="codes-per-read"
        ),
        pytest.param(4, _config(0, 2, routes={}), 4, id="no-routes"),
        pytest.param(2, _config(3, 2), 3, id="set-explicitly"),
    ],
)
def test_detector_threads_resolves(
    monkeypatch: pytest.MonkeyPatch, cpus: int, config: Config, expected: int
) -> None:
    """Threads 0 leaves the detector the CPUs that region reads cannot use, at least one."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(cpus)))
    assert detector_threads(config) == expected


def test_build_detector_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The detector's onnxruntime session gets the derived thread count."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(4)))
    detector = build_detector(_config(0, 1))
    try:
        session = detector._session
        assert session is not None
        assert session.get_session_options().intra_op_num_threads == 3
    finally:
        detector.close()


def test_pipeline_options_document_classes() -> None:
    """Documents are made of the classes routed to the text reader, whatever their names."""
    routes = {"label": "text", "receipt": "text", "qr_code": "codes"}
    config = replace(
        _config(0, 2, routes=routes), pipeline=replace(Config().pipeline, document_share=0.7)
    )

    options = pipeline_options(config)

    assert options.document_classes == frozenset({"label", "receipt"})
    assert options.document_share == 0.7
    assert pipeline_options(_config(0, 2)).document_classes == frozenset({"text"})


def test_region_code_reader_covers_full_frame() -> None:
    """The pipeline skips the full-frame decode after a whole-frame code crop read nothing.

    That holds only if the code regions' reader does every scan the full-frame reader does.
    """
    regions = build_readers(Config())["codes"]
    full_frame = full_frame_code_reader()
    assert isinstance(regions, CodeReader)
    assert regions.retry_max_pixels is None or (
        full_frame.retry_max_pixels is not None
        and regions.retry_max_pixels >= full_frame.retry_max_pixels
    )
    assert regions.try_harder or not full_frame.try_harder
    # No symbology named means every one that zbar knows.
    assert not regions.symbologies or (
        full_frame.symbologies and set(full_frame.symbologies) <= set(regions.symbologies)
    )
