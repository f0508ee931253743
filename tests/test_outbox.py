"""The durable outbox: order, caps, time-to-live, locking, crash safety."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edge.errors import PublishError
from edge.outbox import AsyncOutbox, DropPolicy, Outbox


def _payloads(box: Outbox) -> list[bytes]:
    return [row.payload for row in box.fetch(0, 1000)]


def test_outbox_fetch_returns_storing_order(tmp_path: Path) -> None:
    """Messages come back oldest first, with their topic and flags."""
    box = Outbox(tmp_path / "o.db")
    box.put("a/frames", b"1")
    box.put("a/state", b"2", retain=True)
    rows = box.fetch(0, 10)
    box.close()
    assert [row.payload for row in rows] == [b"1", b"2"]
    assert rows[1].retain is True
    assert rows[1].topic == "a/state"


def test_outbox_fetch_after_id_skips_sent(tmp_path: Path) -> None:
    """fetch(after_id) returns only rows with a higher id, up to the limit."""
    box = Outbox(tmp_path / "o.db")
    ids = [box.put("t", str(i).encode()) for i in range(5)]
    assert ids[1] is not None
    rows = box.fetch(ids[1], 2)
    box.close()
    assert [row.payload for row in rows] == [b"2", b"3"]


def test_outbox_delete_updates_depth(tmp_path: Path) -> None:
    """Deleting acknowledged ids lowers the depth; unknown ids are ignored."""
    box = Outbox(tmp_path / "o.db")
    first = box.put("t", b"x")
    box.put("t", b"y")
    assert first is not None
    removed = box.delete([first, 999])
    stats = box.stats()
    box.close()
    assert removed == 1
    assert stats.depth == 1
    assert stats.acknowledged == 1


def test_outbox_survives_reopen(tmp_path: Path) -> None:
    """Messages stored before close are still there, in order, after opening again."""
    path = tmp_path / "o.db"
    box = Outbox(path)
    for i in range(3):
        box.put("t", str(i).encode())
    box.close()
    again = Outbox(path)
    payloads = _payloads(again)
    depth = again.stats().depth
    again.close()
    assert payloads == [b"0", b"1", b"2"]
    assert depth == 3


def test_outbox_ids_not_reused_after_delete(tmp_path: Path) -> None:
    """A new message after deleting the newest still gets a higher id than any before."""
    box = Outbox(tmp_path / "o.db")
    first = box.put("t", b"a")
    assert first is not None
    box.delete([first])
    second = box.put("t", b"b")
    next_id = box.next_id()
    box.close()
    assert second == first + 1
    assert next_id == first + 2


def test_outbox_drop_oldest_at_message_cap(tmp_path: Path) -> None:
    """With drop_oldest, the cap keeps the newest messages and counts the dropped ones."""
    box = Outbox(tmp_path / "o.db", max_messages=3, drop_policy=DropPolicy.DROP_OLDEST)
    for i in range(5):
        box.put("t", str(i).encode())
    payloads = _payloads(box)
    stats = box.stats()
    box.close()
    assert payloads == [b"2", b"3", b"4"]
    assert stats.dropped_full == 2


def test_outbox_drop_newest_at_message_cap(tmp_path: Path) -> None:
    """With drop_newest, the cap keeps the oldest messages and rejects new ones."""
    box = Outbox(tmp_path / "o.db", max_messages=3, drop_policy=DropPolicy.DROP_NEWEST)
    results = [box.put("t", str(i).encode()) for i in range(5)]
    payloads = _payloads(box)
    stats = box.stats()
    box.close()
    assert payloads == [b"0", b"1", b"2"]
    assert results[3:] == [None, None]
    assert stats.dropped_full == 2


def test_outbox_byte_cap_bounds_size(tmp_path: Path) -> None:
    """The sum of payload sizes never exceeds max_bytes; the oldest go first."""
    box = Outbox(tmp_path / "o.db", max_bytes=2500)
    for i in range(10):
        box.put("t", bytes([i]) * 1000)
    stats = box.stats()
    payloads = _payloads(box)
    box.close()
    assert stats.size_bytes <= 2500
    assert [p[0] for p in payloads] == [8, 9]


def test_outbox_oversized_message_rejected(tmp_path: Path) -> None:
    """A single message larger than max_bytes is dropped and counted, the rest kept."""
    box = Outbox(tmp_path / "o.db", max_bytes=1024)
    box.put("t", b"small")
    assert box.put("t", b"x" * 2000) is None
    stats = box.stats()
    box.close()
    assert stats.depth == 1
    assert stats.dropped_full == 1


def test_outbox_expire_deletes_old_messages(tmp_path: Path) -> None:
    """Messages older than the time-to-live are deleted and counted as expired."""
    box = Outbox(tmp_path / "o.db", ttl=60)
    box.put("t", b"old")
    removed = box.expire(now=10**10)
    stats = box.stats()
    box.close()
    assert removed == 1
    assert stats.dropped_expired == 1


def test_outbox_expire_keeps_fresh_messages(tmp_path: Path) -> None:
    """Messages younger than the time-to-live stay."""
    box = Outbox(tmp_path / "o.db", ttl=3600)
    box.put("t", b"new")
    removed = box.expire()
    box.close()
    assert removed == 0


def test_outbox_second_opener_rejected(tmp_path: Path) -> None:
    """A second Outbox on the same file raises PublishError naming the path."""
    path = tmp_path / "o.db"
    box = Outbox(path)
    try:
        with pytest.raises(PublishError, match=r"o\.db"):
            Outbox(path)
    finally:
        box.close()


def test_outbox_corrupt_file_moved_aside(tmp_path: Path) -> None:
    """A file that is not a database is moved aside and a new empty outbox opens."""
    path = tmp_path / "o.db"
    path.write_bytes(b"this is not sqlite" * 100)
    box = Outbox(path)
    depth = box.stats().depth
    box.close()
    assert depth == 0
    assert list(tmp_path.glob("o.db.corrupt-*"))


def test_outbox_uses_wal_journal(tmp_path: Path) -> None:
    """The database file is in WAL mode, which the power-cut guarantee relies on."""
    path = tmp_path / "o.db"
    box = Outbox(path)
    box.close()
    with sqlite3.connect(path) as db:
        mode = db.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_outbox_kill_during_writes_keeps_committed(tmp_path: Path) -> None:
    """After SIGKILL in the middle of writes, every put that returned is still stored."""
    path = tmp_path / "o.db"
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from edge.outbox import Outbox
        box = Outbox(Path({str(path)!r}))
        i = 0
        while True:
            box.put("t", str(i).encode())
            print(i, flush=True)
            i += 1
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    last = -1
    for line in child.stdout:
        last = int(line)
        if last >= 200:
            break
    child.kill()
    child.wait(30)
    child.stdout.close()
    box = Outbox(path)
    payloads = [int(p) for p in _payloads_all(box)]
    box.close()
    assert payloads[: last + 1] == list(range(last + 1))


def _payloads_all(box: Outbox) -> list[bytes]:
    return [row.payload for row in box.fetch(0, 10**6)]


async def test_async_outbox_runs_off_loop(tmp_path: Path) -> None:
    """AsyncOutbox stores and fetches through its own thread and keeps stats current."""
    box = await AsyncOutbox.open(tmp_path / "o.db", max_messages=10)
    await box.put("t", b"a")
    rows = await box.fetch(0, 10)
    depth = box.stats().depth
    await box.close()
    assert [row.payload for row in rows] == [b"a"]
    assert depth == 1
