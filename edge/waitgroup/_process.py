"""Worker processes for process ops: one long-lived process per slot, one job at a time.

Each worker has its own pipe, so killing one at a timeout leaves the others running.
A shared ``ProcessPoolExecutor`` would instead break as a whole when one worker dies.
The event loop watches each worker's pipe and its ``sentinel`` (readable once the
process has exited) with ``add_reader``, so no thread waits on a worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import signal
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, Literal

from edge.waitgroup._errors import WorkerDied
from edge.waitgroup._op import Op
from edge.waitgroup._worker import worker_main

logger = logging.getLogger(__name__)

StartMethod = Literal["spawn", "forkserver"]

# After the sentinel is readable the worker has exited, so reaping it takes
# microseconds. The bound only guards against a broken platform.
_REAP_TIMEOUT = 1.0
# SIGKILL cannot be caught, but a process stuck in the kernel (uninterruptible
# sleep) can take a while to exit. After this many seconds the worker is logged
# and left behind.
_KILL_TIMEOUT = 5.0


class _Worker:
    """One worker process and the parent's end of its pipe."""

    def __init__(
        self, context: Any, loop: asyncio.AbstractEventLoop, name: str, kill_grace: float
    ) -> None:
        self._loop = loop
        self._kill_grace = kill_grace
        parent_conn, child_conn = context.Pipe(duplex=True)
        self._process = context.Process(
            target=worker_main, args=(child_conn,), name=name, daemon=True
        )
        self._process.start()
        child_conn.close()
        self._conn: Connection = parent_conn
        self.pid: int = self._process.pid
        self._ready: asyncio.Future[None] = loop.create_future()
        self._reply: asyncio.Future[tuple[str, Any]] | None = None
        self._exited: asyncio.Future[None] = loop.create_future()
        self._killed = False
        self.exitcode: int | None = None
        loop.add_reader(self._conn.fileno(), self._on_readable)
        loop.add_reader(self._process.sentinel, self._on_exit)

    @property
    def alive(self) -> bool:
        """True until the process has exited."""
        return not self._exited.done()

    @property
    def usable(self) -> bool:
        """True while the worker can take another job: alive and never sent a kill signal."""
        return self.alive and not self._killed

    def _on_readable(self) -> None:
        try:
            message = self._conn.recv()
        except (EOFError, OSError):
            # The worker closed its end, and _on_exit reports the exit once the
            # sentinel fires.
            self._close_conn()
            return
        except Exception as exc:  # the reply arrived but cannot be unpickled here
            error = RuntimeError(f"reply from worker process {self.pid} cannot be unpickled")
            error.__cause__ = exc
            message = ("error", error)
        if message[0] == "ready":
            if not self._ready.done():
                self._ready.set_result(None)
        elif self._reply is not None and not self._reply.done():
            self._reply.set_result(message)
        else:
            logger.error("worker process %d sent an unexpected message %r", self.pid, message)

    def _close_conn(self) -> None:
        if not self._conn.closed:
            self._loop.remove_reader(self._conn.fileno())
            self._conn.close()

    def _on_exit(self) -> None:
        # A reply written just before the exit is still in the pipe: read it first.
        while not self._conn.closed and self._poll_conn():
            self._on_readable()
        self._close_conn()
        self._loop.remove_reader(self._process.sentinel)
        self._process.join(_REAP_TIMEOUT)
        self.exitcode = self._process.exitcode
        if self.exitcode is not None:
            self._process.close()
        self._exited.set_result(None)
        died = self._died_error()
        for future in (self._ready, self._reply):
            if future is not None and not future.done():
                future.set_exception(died)
                # Callers that stopped waiting must not trigger "exception never retrieved".
                future.exception()

    def _poll_conn(self) -> bool:
        try:
            return self._conn.poll()
        except OSError:
            return False

    def _died_error(self) -> WorkerDied:
        code = self.exitcode
        if code is None:
            how = "an unknown status"
        elif code < 0:
            name = _signal_name(-code)
            how = f"signal {-code} ({name})" if name else f"signal {-code}"
        else:
            how = f"exit status {code}"
        message = f"worker process {self.pid} died with {how}"
        return WorkerDied(message, pid=self.pid, exitcode=code)

    async def call(self, op: Op[Any], arm: Callable[[Op[Any], float], None]) -> Any:
        """Run ``op`` in this worker and return its value. Kill the worker if cancelled.

        The op's clock starts once the worker is ready, so a fresh worker's start-up
        (interpreter and imports) is not charged to the op's timeout.
        """
        try:
            # NOTE: start-up has no timeout of its own. A worker that hangs while
            # starting is ended only by the group deadline, cancel() or shutdown.
            await self._ready
        except asyncio.CancelledError:
            await self.kill()
            raise
        arm(op, self._loop.time())
        remaining = None if op.deadline is None else op.deadline - self._loop.time()
        reply: asyncio.Future[tuple[str, Any]] = self._loop.create_future()
        # Pickling fails before any byte is written, so the worker stays usable.
        # NOTE: send() blocks the loop while the pipe is full, which for arguments
        # beyond the pipe buffer (64 KiB on Linux) lasts until the worker reads them.
        try:
            self._conn.send((op.fn, op.args, op.name, remaining))
        except OSError as exc:
            # The worker died while idle and the loop has not seen its exit yet.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._exited), _REAP_TIMEOUT)
            raise self._died_error() from exc
        self._reply = reply
        try:
            status, payload = await reply
        except asyncio.CancelledError:
            if self.alive:
                op.killed = True
                await self.kill()
            raise
        finally:
            self._reply = None
        if status == "ok":
            return payload
        raise payload

    async def kill(self) -> None:
        """Terminate the worker, kill it after ``kill_grace`` seconds, and wait until reaped."""
        if not self.alive:
            return
        self._killed = True
        self._process.terminate()
        try:
            await asyncio.wait_for(asyncio.shield(self._exited), self._kill_grace)
        except TimeoutError:
            self._process.kill()
            try:
                await asyncio.wait_for(asyncio.shield(self._exited), _KILL_TIMEOUT)
            except TimeoutError:
                logger.error(
                    "worker process %d still running %.1f s after SIGKILL",
                    self.pid,
                    _KILL_TIMEOUT,
                )

    async def stop(self) -> None:
        """Ask an idle worker to exit, and kill it if it does not within ``kill_grace``."""
        if not self.alive:
            return
        with contextlib.suppress(OSError):
            self._conn.send(None)
        try:
            await asyncio.wait_for(asyncio.shield(self._exited), self._kill_grace)
        except TimeoutError:
            await self.kill()


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return ""


class WorkerPool:
    """Up to ``size`` worker processes, started on demand and replaced after they die.

    Args:
        size: Maximum number of worker processes.
        start_method: ``"spawn"`` or ``"forkserver"``; ``"fork"`` is not offered
            because forking a process that has threads is unsafe.
        kill_grace: Seconds between SIGTERM and SIGKILL when a worker is killed.
        name: Prefix of the worker process names.
    """

    def __init__(self, *, size: int, start_method: StartMethod, kill_grace: float, name: str):
        self._size = size
        self._context = multiprocessing.get_context(start_method)
        self._kill_grace = kill_grace
        self._name = name
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._spawned = 0
        self._closed = False

    @property
    def pids(self) -> list[int]:
        """Process ids of the live workers, idle first."""
        return [worker.pid for worker in (*self._idle, *self._busy) if worker.alive]

    async def run(self, op: Op[Any], arm: Callable[[Op[Any], float], None]) -> Any:
        """Run ``op`` on an idle worker (starting one if needed) and return its value."""
        worker = await self._checkout()
        try:
            return await worker.call(op, arm)
        finally:
            self._checkin(worker)

    async def _checkout(self) -> _Worker:
        loop = asyncio.get_running_loop()
        while True:
            if self._closed:
                message = f"worker processes of {self._name} are shut down"
                raise RuntimeError(message)
            while self._idle:
                worker = self._idle.pop()
                if worker.usable:
                    self._busy.add(worker)
                    return worker
                self._spawned -= 1
            if self._spawned < self._size:
                self._spawned += 1
                try:
                    worker = _Worker(self._context, loop, f"{self._name}.worker", self._kill_grace)
                except BaseException:
                    self._spawned -= 1
                    raise
                self._busy.add(worker)
                return worker
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def _checkin(self, worker: _Worker) -> None:
        self._busy.discard(worker)
        if worker.usable and not self._closed:
            self._idle.append(worker)
        else:
            self._spawned -= 1
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break

    async def aclose(self) -> None:
        """Stop idle workers and kill busy ones, waiting until all are reaped."""
        self._closed = True
        idle, self._idle = self._idle, []
        self._spawned -= len(idle)
        for worker in idle:
            await worker.stop()
        for worker in list(self._busy):
            await worker.kill()
