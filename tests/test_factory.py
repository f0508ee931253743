"""Tests of the settings that edge.factory derives from a configuration."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest

from edge.config import Config
from edge.factory import build_detector, detector_threads


def _config(threads: int, concurrency: int) -> Config:
    config = Config()
    return replace(
        config,
        detector=replace(config.detector, threads=threads),
        pipeline=replace(config.pipeline, concurrency=concurrency),
    )


@pytest.mark.parametrize(
    ("cpus", "threads", "concurrency", "expected"),
    [
        pytest.param(2, 0, 2, 1, id="two-cpus"),
        pytest.param(4, 0, 2, 2, id="four-cpus"),
        pytest.param(8, 0, 1, 7, id="one-read"),
        pytest.param(2, 0, 8, 1, id="more-reads-than-cpus"),
        pytest.param(1, 0, 1, 1, id="one-cpu"),
        pytest.param(2, 3, 2, 3, id="set-explicitly"),
    ],
)
def test_detector_threads_auto(
    monkeypatch: pytest.MonkeyPatch, cpus: int, threads: int, concurrency: int, expected: int
) -> None:
    """Threads 0 leaves the detector the CPUs that region reads do not use, at least one."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(cpus)))
    assert detector_threads(_config(threads, concurrency)) == expected


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
