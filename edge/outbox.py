"""Durable outbox: MQTT messages kept in SQLite from before they are sent until the PUBACK.

The database runs in WAL mode with ``synchronous=FULL``. In WAL mode, ``NORMAL`` stays
consistent after a power cut but may lose the last committed transactions. ``FULL`` syncs the
WAL on every commit, so a message whose ``put`` returned survives a power cut or ``kill -9``.
The price is one ``fsync`` per commit, which a few frames per second easily afford.

:class:`Outbox` is synchronous and must be used from one thread at a time;
:class:`AsyncOutbox` runs it on one dedicated thread so that the event loop never waits on
the disk.
"""

from __future__ import annotations

import asyncio
import enum
import fcntl
import logging
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from edge.errors import PublishError

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    stored_at REAL NOT NULL
)
"""


class DropPolicy(enum.StrEnum):
    """Policy for a new message that would exceed the outbox size cap."""

    #: Delete the oldest stored messages to make room for the new one.
    DROP_OLDEST = "drop_oldest"
    #: Keep the stored messages and reject the new one.
    DROP_NEWEST = "drop_newest"


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """One row of the outbox.

    Attributes:
        id: Row id; ids grow in storing order and are never reused.
        topic: MQTT topic.
        payload: Message body as stored.
        qos: MQTT QoS level.
        retain: MQTT retain flag.
        stored_at: Unix time in seconds when the message was stored.
    """

    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    stored_at: float


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """Counters of an outbox since it was opened.

    Attributes:
        depth: Messages stored and not yet acknowledged.
        size_bytes: Sum of the stored payload sizes in bytes.
        stored: Messages stored.
        acknowledged: Messages deleted after their PUBACK.
        dropped_full: Messages dropped by the drop policy because the cap was reached.
        dropped_expired: Messages deleted because they were older than the time-to-live.
    """

    depth: int
    size_bytes: int
    stored: int
    acknowledged: int
    dropped_full: int
    dropped_expired: int


class Outbox:
    """A bounded, persistent FIFO of MQTT messages in one SQLite file.

    A second process opening the same file fails with :class:`~edge.errors.PublishError`, because
    two daemons sending from one outbox would deliver every message twice.

    Args:
        path: Database file; its folder is created when missing.
        max_messages: Cap on stored messages.
        max_bytes: Cap on the sum of stored payload sizes in bytes.
        ttl: Seconds a message may wait; older ones are deleted by :meth:`expire`. ``None``
            keeps messages until they are acknowledged or dropped by the cap.
        drop_policy: What to drop when a new message would exceed a cap.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_messages: int = 100_000,
        max_bytes: int = 256 * 1024 * 1024,
        ttl: float | None = None,
        drop_policy: DropPolicy = DropPolicy.DROP_OLDEST,
    ) -> None:
        self.path = path
        self._max_messages = max_messages
        self._max_bytes = max_bytes
        self._ttl = ttl
        self._drop_policy = drop_policy
        self._stored = 0
        self._acknowledged = 0
        self._dropped_full = 0
        self._dropped_expired = 0
        self._lock_file = _lock(path)
        try:
            self._db = _open_database(path)
            count, size = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM messages"
            ).fetchone()
        except BaseException:
            self._lock_file.close()
            raise
        self._depth: int = count
        self._size: int = size

    def close(self) -> None:
        """Checkpoint the WAL, close the database and release the file lock."""
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()
        finally:
            self._lock_file.close()

    def put(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int | None:
        """Store a message and commit; return its id, or ``None`` when the cap rejected it."""
        size = len(payload)
        if size > self._max_bytes:
            self._dropped_full += 1
            logger.warning(
                "message for %s is %d bytes, more than outbox.max_bytes %d; dropped",
                topic,
                size,
                self._max_bytes,
            )
            return None
        with self._db:
            if not self._make_room(size):
                self._dropped_full += 1
                return None
            cursor = self._db.execute(
                "INSERT INTO messages (topic, payload, qos, retain, stored_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (topic, payload, qos, int(retain), time.time()),
            )
        self._depth += 1
        self._size += size
        self._stored += 1
        row_id = cursor.lastrowid
        assert row_id is not None  # an INSERT into a rowid table always sets it
        return row_id

    def _make_room(self, size: int) -> bool:
        """Apply the drop policy so that one more message of ``size`` bytes fits."""
        excess_count = self._depth + 1 - self._max_messages
        excess_bytes = self._size + size - self._max_bytes
        if excess_count <= 0 and excess_bytes <= 0:
            return True
        if self._drop_policy is DropPolicy.DROP_NEWEST:
            return False
        dropped = 0
        while excess_count > 0 or excess_bytes > 0:
            batch = max(excess_count, 1)
            rows = self._db.execute(
                "DELETE FROM messages WHERE id IN "
                "(SELECT id FROM messages ORDER BY id LIMIT ?) RETURNING LENGTH(payload)",
                (batch,),
            ).fetchall()
            if not rows:
                break
            freed = sum(length for (length,) in rows)
            self._depth -= len(rows)
            self._size -= freed
            excess_count -= len(rows)
            excess_bytes -= freed
            dropped += len(rows)
        self._dropped_full += dropped
        return True

    def fetch(self, after_id: int, limit: int) -> list[StoredMessage]:
        """Return up to ``limit`` messages with an id above ``after_id``, oldest first."""
        rows = self._db.execute(
            "SELECT id, topic, payload, qos, retain, stored_at FROM messages "
            "WHERE id > ? ORDER BY id LIMIT ?",
            (after_id, limit),
        ).fetchall()
        return [
            StoredMessage(
                id=row[0],
                topic=row[1],
                payload=bytes(row[2]),
                qos=row[3],
                retain=bool(row[4]),
                stored_at=row[5],
            )
            for row in rows
        ]

    def delete(self, ids: list[int]) -> int:
        """Delete acknowledged messages; ids no longer stored are ignored. Return how many went."""
        lengths: list[int] = []
        with self._db:
            # SQLite limits the number of bound parameters, so delete in chunks.
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(
                    f"DELETE FROM messages WHERE id IN ({marks}) RETURNING LENGTH(payload)",
                    chunk,
                ).fetchall()
                lengths.extend(length for (length,) in rows)
        self._depth -= len(lengths)
        self._size -= sum(lengths)
        self._acknowledged += len(lengths)
        return len(lengths)

    def expire(self, now: float | None = None) -> int:
        """Delete messages older than the time-to-live; return how many were deleted."""
        if self._ttl is None:
            return 0
        cutoff = (time.time() if now is None else now) - self._ttl
        with self._db:
            rows = self._db.execute(
                "DELETE FROM messages WHERE stored_at < ? RETURNING LENGTH(payload)", (cutoff,)
            ).fetchall()
        if rows:
            self._depth -= len(rows)
            self._size -= sum(length for (length,) in rows)
            self._dropped_expired += len(rows)
            logger.warning(
                "outbox: deleted %d messages older than the time-to-live of %.0f s",
                len(rows),
                self._ttl,
            )
        return len(rows)

    def next_id(self) -> int:
        """Return the id the next stored message will get."""
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()
        return (int(row[0]) if row else 0) + 1

    def stats(self) -> OutboxStats:
        """Return a snapshot of the counters."""
        return OutboxStats(
            depth=self._depth,
            size_bytes=self._size,
            stored=self._stored,
            acknowledged=self._acknowledged,
            dropped_full=self._dropped_full,
            dropped_expired=self._dropped_expired,
        )


def _lock(path: Path) -> IO[bytes]:
    """Create the folder and take an exclusive lock on ``{path}.lock``."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_file = open(path.with_name(path.name + ".lock"), "wb")  # noqa: SIM115
    except OSError as exc:
        msg = f"cannot create the outbox {path}: {exc}; set outbox.path to a writable file"
        raise PublishError(msg) from exc
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.close()
        msg = f"outbox {path} is in use by another process; give each daemon its own outbox.path"
        raise PublishError(msg) from None
    return lock_file


def _open_database(path: Path) -> sqlite3.Connection:
    """Open the database, moving a corrupt file aside so that new results can still be kept."""
    try:
        return _connect(path)
    except sqlite3.DatabaseError as exc:
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        logger.error("outbox %s is unreadable (%s); moved it to %s", path, exc, aside)
        for suffix in ("", "-wal", "-shm"):
            source = path.with_name(path.name + suffix)
            if source.exists():
                os.replace(source, aside.with_name(aside.name + suffix))
        try:
            return _connect(path)
        except sqlite3.Error as again:
            msg = f"cannot open the outbox {path}: {again}"
            raise PublishError(msg) from again


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level="DEFERRED", check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        # Checkpoint every 256 pages (1 MiB with 4 KiB pages) and truncate the WAL to 1 MiB
        # afterwards, so the WAL adds at most about 2 MiB to the capped database on disk.
        db.execute("PRAGMA wal_autocheckpoint=256")
        db.execute("PRAGMA journal_size_limit=1048576")
        result = db.execute("PRAGMA quick_check").fetchone()
        if result is None or result[0] != "ok":
            detail = result[0] if result else "no result"
            msg = f"quick_check failed: {detail}"
            raise sqlite3.DatabaseError(msg)
        with db:
            db.execute(_SCHEMA)
    except BaseException:
        db.close()
        raise
    return db


class AsyncOutbox:
    """Async front of an :class:`Outbox` that runs every call on one dedicated thread.

    Args:
        outbox: The outbox; only this object's thread touches it from now on.
    """

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-outbox")
        self._stats = outbox.stats()

    @classmethod
    async def open(cls, path: Path, **options: Any) -> AsyncOutbox:
        """Open an :class:`Outbox` off the event loop; ``options`` go to its constructor."""
        outbox = await asyncio.to_thread(Outbox, path, **options)
        return cls(outbox)

    async def _run(self, func: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        result, self._stats = await loop.run_in_executor(self._executor, self._call, func, args)
        return result

    def _call(self, func: Any, args: tuple[Any, ...]) -> tuple[Any, OutboxStats]:
        return func(*args), self.outbox.stats()

    async def put(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> int | None:
        """Store a message; see :meth:`Outbox.put`."""
        row_id: int | None = await self._run(
            lambda: self.outbox.put(topic, payload, qos=qos, retain=retain)
        )
        return row_id

    async def fetch(self, after_id: int, limit: int) -> list[StoredMessage]:
        """Read messages; see :meth:`Outbox.fetch`."""
        rows: list[StoredMessage] = await self._run(self.outbox.fetch, after_id, limit)
        return rows

    async def delete(self, ids: list[int]) -> int:
        """Delete acknowledged messages; see :meth:`Outbox.delete`."""
        removed: int = await self._run(self.outbox.delete, ids)
        return removed

    async def expire(self) -> int:
        """Delete expired messages; see :meth:`Outbox.expire`."""
        removed: int = await self._run(self.outbox.expire)
        return removed

    async def next_id(self) -> int:
        """Return the id of the next stored message; see :meth:`Outbox.next_id`."""
        row_id: int = await self._run(self.outbox.next_id)
        return row_id

    def stats(self) -> OutboxStats:
        """Return the counters as of the last completed call, without waiting."""
        return self._stats

    async def close(self) -> None:
        """Close the outbox and stop its thread."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.outbox.close)
        self._executor.shutdown(wait=False)
