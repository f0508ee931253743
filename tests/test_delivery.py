"""Delivery through outages: a real mosquitto that the tests stop, start and restart.

Every test prints its figures (sent, delivered, duplicated, lost); run with ``-s`` to see them.
Deadlines are generous because the machine may be loaded; no assert depends on timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import jsonschema
import pytest
from conftest import REPO, BrokerProcess
from mqtt_helpers import Received, Recorder, synthetic_result, tally

from edge.config import MqttConfig, OutboxConfig
from edge.mqtt_stats import StatsCollector
from edge.publisher import MqttPublisher
from edge.results import load_schema

pytestmark = pytest.mark.broker

#: Seconds to wait for a backlog to be delivered; far above what a loaded machine needs.
DRAIN = 180.0


def _config(broker: BrokerProcess, prefix: str, **overrides: object) -> MqttConfig:
    options: dict[str, object] = {
        "host": broker.host,
        "port": broker.port,
        "topic_prefix": prefix,
        "reconnect_min_delay": 0.2,
        "reconnect_max_delay": 2.0,
        "drain_grace": 60.0,
        **overrides,
    }
    return MqttConfig(**options)  # type: ignore[arg-type]


def _invalid(messages: list[Received], schema: str) -> list[str]:
    validator = jsonschema.Draft202012Validator(
        load_schema(schema), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    errors = []
    for message in messages:
        for error in validator.iter_errors(json.loads(message.payload)):
            errors.append(f"{message.topic}: {error.message}")
    return errors


@pytest.fixture
async def recorder_factory() -> AsyncIterator[list[Recorder]]:
    """Closes every recorder a test appends to the list."""
    recorders: list[Recorder] = []
    yield recorders
    for recorder in recorders:
        await asyncio.to_thread(recorder.close)


async def _record(broker: BrokerProcess, prefix: str, recorders: list[Recorder]) -> Recorder:
    recorder = await asyncio.to_thread(Recorder, broker.host, broker.port, f"{prefix}/#")
    recorders.append(recorder)
    return recorder


async def _wait_frames(recorder: Recorder, count: int) -> None:
    def enough() -> bool:
        return len({json.loads(m.payload)["frame"]["seq"] for m in recorder.on("/frames")}) >= count

    await asyncio.to_thread(recorder.wait_for, enough, DRAIN)


async def test_delivery_broker_down_at_start(
    tmp_path: Path,
    broker_process: BrokerProcess,
    topic_prefix: str,
    recorder_factory: list[Recorder],
) -> None:
    """The broker comes up 10 s after the publisher: every result is delivered, in order."""
    # The subscriber's persistent session must exist before the outage to receive anything.
    await asyncio.to_thread(broker_process.start)
    recorder = await _record(broker_process, topic_prefix, recorder_factory)
    await asyncio.to_thread(broker_process.stop)

    publisher = MqttPublisher(_config(broker_process, topic_prefix), "pi", tmp_path / "o.db")
    await publisher.start()
    loop = asyncio.get_running_loop()
    broker_up_at = loop.time() + 10.0
    sent = 0
    while loop.time() < broker_up_at:
        await publisher.publish_frame(synthetic_result(sent))
        sent += 1
        await asyncio.sleep(0.05)
    connected_before = publisher.connected
    await asyncio.to_thread(broker_process.start)
    for _ in range(50):
        await publisher.publish_frame(synthetic_result(sent))
        sent += 1
    drained = await publisher.wait_drained(DRAIN)
    await publisher.stop()
    await _wait_frames(recorder, sent)

    figures = tally(recorder.on("/frames"), sent)
    print(figures.line("broker down at start"))
    assert not connected_before
    assert drained
    assert figures.lost == 0, figures.lost_seqs[:20]
    assert figures.out_of_order == 0
    assert figures.unmarked_duplicates == 0
    assert _invalid(recorder.on("/frames"), "frame") == []


async def test_delivery_broker_restart_mid_stream(
    tmp_path: Path,
    broker_process: BrokerProcess,
    topic_prefix: str,
    recorder_factory: list[Recorder],
) -> None:
    """The broker stops after 300 of 1,000 results and returns: all arrive, in order, once."""
    await asyncio.to_thread(broker_process.start)
    recorder = await _record(broker_process, topic_prefix, recorder_factory)
    publisher = MqttPublisher(_config(broker_process, topic_prefix), "pi", tmp_path / "o.db")
    await publisher.start()
    assert await publisher.wait_connected(30)

    sent = 1000
    started = time.monotonic()
    for seq in range(sent):
        await publisher.publish_frame(synthetic_result(seq))
        if seq == 300:
            await asyncio.to_thread(broker_process.stop)
        if seq == 700:
            await asyncio.to_thread(broker_process.start)
        await asyncio.sleep(0.002)
    drained = await publisher.wait_drained(DRAIN)
    elapsed = time.monotonic() - started
    stats = publisher.stats()
    await publisher.stop()
    await _wait_frames(recorder, sent)

    figures = tally(recorder.on("/frames"), sent)
    print(figures.line("broker restart mid-stream"), f"in {elapsed:.1f} s, {stats}")
    assert drained
    assert stats.reconnects >= 1
    assert figures.lost == 0, figures.lost_seqs[:20]
    assert figures.out_of_order == 0
    assert figures.unmarked_duplicates == 0
    assert _invalid(recorder.on("/frames"), "frame") == []


async def test_delivery_replayed_keeps_captured_at(
    tmp_path: Path,
    broker_process: BrokerProcess,
    topic_prefix: str,
    recorder_factory: list[Recorder],
) -> None:
    """Results stored during an outage arrive with replayed true and their capture time."""
    await asyncio.to_thread(broker_process.start)
    recorder = await _record(broker_process, topic_prefix, recorder_factory)
    await asyncio.to_thread(broker_process.stop)
    publisher = MqttPublisher(_config(broker_process, topic_prefix), "pi", tmp_path / "o.db")
    await publisher.start()
    await publisher.publish_frame(synthetic_result(0, captured_at=1_700_000_000.25))
    await asyncio.to_thread(broker_process.start)
    assert await publisher.wait_drained(DRAIN)
    await publisher.stop()
    await _wait_frames(recorder, 1)

    payload = json.loads(recorder.on("/frames")[0].payload)
    assert payload["replayed"] is True
    assert payload["frame"]["captured_at"] == "2023-11-14T22:13:20.250Z"


def _start_child(port: int, outbox: Path, prefix: str, count: int) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "tests" / "publisher_child.py"),
            *(str(port), str(outbox), prefix, str(count)),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert child.stdout is not None
    line = child.stdout.readline()
    assert line.strip() == "ready", line
    return child


def _store_in_child(child: subprocess.Popen[str], count: int) -> None:
    assert child.stdin is not None
    assert child.stdout is not None
    child.stdin.write("go\n")
    child.stdin.flush()
    line = child.stdout.readline()
    assert line.strip() == f"stored {count}", line


def _kill(child: subprocess.Popen[str]) -> None:
    child.kill()
    child.wait(30)
    assert child.stdout is not None
    assert child.stdin is not None
    child.stdout.close()
    child.stdin.close()


async def test_delivery_after_sigkill_with_broker_down(
    tmp_path: Path,
    broker_process: BrokerProcess,
    topic_prefix: str,
    recorder_factory: list[Recorder],
) -> None:
    """Results queued by a daemon killed with SIGKILL are delivered by the next one."""
    outbox = tmp_path / "o.db"
    sent = 300
    child = await asyncio.to_thread(_start_child, broker_process.port, outbox, topic_prefix, sent)
    await asyncio.to_thread(_store_in_child, child, sent)
    await asyncio.to_thread(_kill, child)

    await asyncio.to_thread(broker_process.start)
    recorder = await _record(broker_process, topic_prefix, recorder_factory)
    publisher = MqttPublisher(_config(broker_process, topic_prefix), "kill-pi", outbox)
    await publisher.start()
    drained = await publisher.wait_drained(DRAIN)
    await publisher.stop()
    await _wait_frames(recorder, sent)

    figures = tally(recorder.on("/frames"), sent)
    print(figures.line("SIGKILL, broker down"))
    assert drained
    assert figures.lost == 0, figures.lost_seqs[:20]
    assert figures.out_of_order == 0
    assert figures.replayed == len(recorder.on("/frames"))


async def test_delivery_after_sigkill_while_sending(
    tmp_path: Path,
    broker_process: BrokerProcess,
    topic_prefix: str,
    recorder_factory: list[Recorder],
) -> None:
    """SIGKILL with results in flight and queued: the next daemon sends them, copies marked."""
    await asyncio.to_thread(broker_process.start)
    recorder = await _record(broker_process, topic_prefix, recorder_factory)
    outbox = tmp_path / "o.db"
    sent = 1000
    child = await asyncio.to_thread(_start_child, broker_process.port, outbox, topic_prefix, sent)
    # A frozen broker keeps the connection open but acknowledges nothing, so the child dies
    # with a full in-flight window whose messages the broker may or may not have read.
    broker_process.pause()
    try:
        await asyncio.to_thread(_store_in_child, child, sent)
        await asyncio.to_thread(_kill, child)
    finally:
        broker_process.resume()
    before_restart = len(recorder.on("/frames"))

    def will_sent() -> bool:
        status = recorder.on("/status")
        return bool(status) and status[-1].payload == b"offline"

    will_seen = await asyncio.to_thread(recorder.wait_for, will_sent, 60)
    publisher = MqttPublisher(_config(broker_process, topic_prefix), "kill-pi", outbox)
    await publisher.start()
    drained = await publisher.wait_drained(DRAIN)
    await publisher.stop()
    await _wait_frames(recorder, sent)

    figures = tally(recorder.on("/frames"), sent)
    print(figures.line("SIGKILL while sending"), f"({before_restart} arrived before the kill)")
    assert will_seen
    assert drained
    assert figures.lost == 0, figures.lost_seqs[:20]
    assert figures.out_of_order == 0
    assert figures.unmarked_duplicates == 0


async def test_delivery_cap_drops_oldest_and_reports(
    tmp_path: Path,
    broker_process: BrokerProcess,
    topic_prefix: str,
    recorder_factory: list[Recorder],
) -> None:
    """At the cap the oldest results go, the stats count them, and the file stays small."""
    await asyncio.to_thread(broker_process.start)
    recorder = await _record(broker_process, topic_prefix, recorder_factory)
    await asyncio.to_thread(broker_process.stop)
    outbox = tmp_path / "o.db"
    cap = 200
    publisher = MqttPublisher(
        _config(broker_process, topic_prefix),
        "pi",
        outbox,
        OutboxConfig(max_messages=cap),
    )
    await publisher.start()
    sent = 5000
    collector = StatsCollector("pi")
    for seq in range(sent):
        result = synthetic_result(seq)
        collector.add(result)
        await publisher.publish_frame(result)
    depth_at_cap = publisher.stats().depth
    disk_bytes = await asyncio.to_thread(_disk_bytes, tmp_path, "o.db*")
    await asyncio.to_thread(broker_process.start)
    drained = await publisher.wait_drained(DRAIN)
    # Stats go at QoS 0, which the broker does not keep for a subscriber still reconnecting.
    await _wait_frames(recorder, cap)
    assert publisher.publish_stats_nowait(collector.payload(0, publisher.stats()))
    await asyncio.to_thread(recorder.wait_for, lambda: bool(recorder.on("/stats")), 60)
    await publisher.stop()

    seqs = [json.loads(m.payload)["frame"]["seq"] for m in recorder.on("/frames")]
    stats = json.loads(recorder.on("/stats")[-1].payload)
    print(
        f"cap {cap}: sent {sent}, delivered {len(set(seqs))}, dropped "
        f"{stats['outbox']['dropped_full']}, outbox files {disk_bytes} bytes at the cap"
    )
    assert drained
    assert depth_at_cap == cap
    assert sorted(set(seqs)) == list(range(sent - cap, sent))
    assert stats["outbox"]["dropped_full"] == sent - cap
    assert _invalid(recorder.on("/stats"), "stats") == []
    assert disk_bytes < 4 * 1024 * 1024


def _disk_bytes(folder: Path, pattern: str) -> int:
    return sum(path.stat().st_size for path in folder.glob(pattern))


async def test_delivery_availability_messages(
    tmp_path: Path,
    broker_process: BrokerProcess,
    topic_prefix: str,
    recorder_factory: list[Recorder],
) -> None:
    """The status topic gets a retained online after connecting and stopped on a clean exit."""
    await asyncio.to_thread(broker_process.start)
    recorder = await _record(broker_process, topic_prefix, recorder_factory)
    publisher = MqttPublisher(_config(broker_process, topic_prefix), "pi", tmp_path / "o.db")
    await publisher.start()
    assert await publisher.wait_connected(30)
    await publisher.stop()
    await asyncio.to_thread(recorder.wait_for, lambda: len(recorder.on("/status")) >= 2, 30)
    late = await _record(broker_process, topic_prefix + "/pi/status", recorder_factory)
    await asyncio.to_thread(late.wait_for, lambda: bool(late.messages), 30)

    assert [m.payload for m in recorder.on("/status")] == [b"online", b"stopped"]
    assert late.messages[0].retain is True
    assert late.messages[0].payload == b"stopped"


async def test_delivery_stop_without_broker_is_prompt(
    tmp_path: Path, broker_process: BrokerProcess, topic_prefix: str
) -> None:
    """With no broker ever reached, stop() returns without the drain grace; results stay."""
    publisher = MqttPublisher(
        _config(broker_process, topic_prefix, drain_grace=600.0), "pi", tmp_path / "o.db"
    )
    await publisher.start()
    await publisher.publish_frame(synthetic_result(0))
    started = time.monotonic()
    await publisher.stop()
    elapsed = time.monotonic() - started
    print(f"stop without broker took {elapsed:.2f} s")
    again = MqttPublisher(_config(broker_process, topic_prefix), "pi", tmp_path / "o.db")
    await again.start()
    depth = again.stats().depth
    await again.stop(grace=0)
    assert elapsed < 600
    assert depth == 1


def _stored_rows(outbox: Path, suffix: str) -> int:
    if not outbox.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(outbox, timeout=10)) as db:
            row = db.execute(
                "SELECT COUNT(*) FROM messages WHERE topic LIKE ?", (f"%{suffix}",)
            ).fetchone()
    except sqlite3.OperationalError:
        return 0  # the daemon has not created the table yet
    return int(row[0])


def _edge_run_config(tmp_path: Path, port: int, prefix: str) -> Path:
    path = tmp_path / "edge.toml"
    path.write_text(
        f'[device]\nid = "run-pi"\n'
        f'[camera]\nkind = "simulated"\nfps = 0\nloop = true\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\ntopic_prefix = "{prefix}"\n'
        f"reconnect_min_delay = 0.2\nreconnect_max_delay = 2.0\n"
        f'[outbox]\npath = "{tmp_path / "outbox.sqlite3"}"\n'
    )
    return path


def _kill_edge_run_after(config: Path, outbox: Path, frames: int) -> None:
    daemon = subprocess.Popen(
        [sys.executable, "-m", "edge", "run", "--config", str(config)],
        cwd=REPO,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while _stored_rows(outbox, "/frames") < frames and time.monotonic() < deadline:
            assert daemon.poll() is None, "edge run exited before it was killed"
            time.sleep(0.2)
    finally:
        daemon.kill()
        daemon.wait(30)


@pytest.mark.slow
async def test_delivery_edge_run_sigkill(
    tmp_path: Path,
    broker_process: BrokerProcess,
    topic_prefix: str,
    recorder_factory: list[Recorder],
) -> None:
    """`edge run` killed with SIGKILL and no broker: the next `edge run` delivers its results."""
    outbox = tmp_path / "outbox.sqlite3"
    config = _edge_run_config(tmp_path, broker_process.port, topic_prefix)
    await asyncio.to_thread(_kill_edge_run_after, config, outbox, 5)
    queued = await asyncio.to_thread(_stored_rows, outbox, "/frames")

    await asyncio.to_thread(broker_process.start)
    recorder = await _record(broker_process, topic_prefix, recorder_factory)
    completed = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "edge", "run", "--config", str(config), "--max-frames", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    arrived = await asyncio.to_thread(
        recorder.wait_for, lambda: len(recorder.on("/frames")) >= queued + 1, 60
    )

    frames = [json.loads(m.payload) for m in recorder.on("/frames")]
    replayed = sum(1 for frame in frames if frame["replayed"])
    print(
        f"edge run SIGKILL: queued {queued}, delivered {len(frames)} frame messages "
        f"({replayed} replayed), left {_stored_rows(outbox, '/frames')}"
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert arrived
    assert replayed == queued
    assert _stored_rows(outbox, "/frames") == 0
    assert _invalid(recorder.on("/frames"), "frame") == []
