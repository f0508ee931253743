"""Main loop of a WaitGroup worker process: run one job at a time and send back the reply.

Messages on the pipe, parent to worker: ``(fn, args, name, remaining)`` for a job,
``None`` to stop. Worker to parent: ``("ready", pid)`` once after start, then one
``("ok", value)`` or ``("error", exception)`` per job. A job that raises SystemExit or
KeyboardInterrupt ends the worker, and the parent reports ``WorkerDied`` for it.
"""

from __future__ import annotations

import os
import pickle
import signal
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

from edge.waitgroup._context import _current_source, _FixedSource


def worker_main(conn: Connection) -> None:
    """Serve jobs from ``conn`` until the parent sends ``None`` or closes the pipe."""
    # Ctrl-C in a terminal sends SIGINT to the whole process group. The parent
    # decides when workers stop, so a worker ignores SIGINT and is stopped through
    # the pipe or by SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            data = conn.recv_bytes()
        except EOFError:
            return
        try:
            job = pickle.loads(data)
        except Exception as exc:  # any unpickling failure is the job's error
            _send_reply(conn, ("error", _portable_error(exc)), "<unreadable job>")
            continue
        if job is None:
            return
        fn, args, name, remaining = job
        _send_reply(conn, _run_job(fn, args, name, remaining), name)


def _run_job(fn: Any, args: tuple[Any, ...], name: str, remaining: float | None) -> tuple[str, Any]:
    deadline = None if remaining is None else time.monotonic() + remaining
    token = _current_source.set(_FixedSource(name, deadline))
    try:
        return ("ok", fn(*args))
    except Exception as exc:  # the op's error goes back to the parent
        return ("error", _portable_error(exc))
    finally:
        _current_source.reset(token)


def _portable_error(exc: Exception) -> Exception:
    """Return ``exc`` with its traceback as a note, or a RuntimeError if it cannot be pickled."""
    text = "".join(traceback.format_exception(exc))
    exc.add_note(f"Traceback in worker process {os.getpid()}:\n{text}")
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # any pickling failure: send a stand-in instead
        stand_in = RuntimeError(f"{type(exc).__qualname__}: {exc}")
        stand_in.add_note(f"Traceback in worker process {os.getpid()}:\n{text}")
        return stand_in
    return exc


def _send_reply(conn: Connection, reply: tuple[str, Any], name: str) -> None:
    try:
        conn.send(reply)
    except Exception as exc:  # pickling fails before anything is written
        error = RuntimeError(f"result of op {name!r} cannot be pickled: {exc}")
        conn.send(("error", error))
