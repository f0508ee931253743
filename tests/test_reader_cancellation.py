"""Tests for the token that cancels one running read."""

from __future__ import annotations

import threading

import pytest

from edge.readers.base import Cancellation, ReadCancelled


def test_cancellation_calls_callbacks_once() -> None:
    cancellation = Cancellation()
    calls: list[str] = []
    with cancellation.registered(lambda: calls.append("a")):
        cancellation.cancel()
        cancellation.cancel()
    assert calls == ["a"]
    assert cancellation.cancelled


def test_cancellation_registered_late_calls_at_once() -> None:
    cancellation = Cancellation()
    cancellation.cancel()
    calls: list[str] = []
    with cancellation.registered(lambda: calls.append("late")):
        assert calls == ["late"]


def test_cancellation_unregisters_after_block() -> None:
    cancellation = Cancellation()
    calls: list[str] = []
    with cancellation.registered(lambda: calls.append("done")):
        pass
    cancellation.cancel()
    assert calls == []


def test_cancellation_raise_if_cancelled() -> None:
    cancellation = Cancellation()
    cancellation.raise_if_cancelled()
    cancellation.cancel()
    with pytest.raises(ReadCancelled, match="read cancelled"):
        cancellation.raise_if_cancelled()


def test_cancellation_from_another_thread() -> None:
    cancellation = Cancellation()
    called = threading.Event()
    with cancellation.registered(called.set):
        thread = threading.Thread(target=cancellation.cancel)
        thread.start()
        thread.join()
    assert called.is_set()
