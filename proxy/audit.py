"""One structured audit event per statement (R5.1), as JSON lines through structlog.

Events pass through a structlog processor chain (plain functions: time stamp,
event id, render) and reach the file through a logger that writes once per
few milliseconds: under load many statements finish close together, and one
write system call for all of them is what keeps auditing
every statement affordable on the relay's hot path (events wait at most
FLUSH_DELAY; a clean shutdown writes them all). Outside the server's loop
thread every event is written at once. The logger is built per
server, not configured globally, so several servers never share one.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import orjson
import structlog

from .identity import Principal

Listener = Callable[[dict[str, Any]], None]


def principal_fields(p: Principal | None) -> dict[str, Any]:
    """The identity part of every event a session writes (computed once per session)."""
    if p is None:
        return {}
    return {"session": p.session_id, "user": p.user, "role": p.role, "department": p.department,
            "client_addr": p.client_addr, "application": p.application}


class _Stamp:
    """Adds the time and a unique, ordered event id (process prefix + counter: cheaper than uuid4)."""

    def __init__(self) -> None:
        self._prefix = os.urandom(4).hex()
        self._seq = itertools.count(1)

    def __call__(self, _logger: Any, _name: str, ev: dict[str, Any]) -> dict[str, Any]:
        ev["time"] = datetime.now(timezone.utc).isoformat(timespec="microseconds")
        ev["event_id"] = f"{self._prefix}-{next(self._seq)}"
        return ev


def _render(_logger: Any, _name: str, ev: dict[str, Any]) -> bytes:
    return orjson.dumps(ev, default=str)


FLUSH_DELAY = 0.002  # seconds an event may wait to be written together with others


class _LoopBatchedWriter:
    """A structlog logger whose lines are written together, at most FLUSH_DELAY after the first.

    Only the thread running the bound event loop batches; any other thread writes at once.
    (``asyncio.get_running_loop()`` is not used to find out: it costs a getpid() system call.)
    """

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self._pending: list[bytes] = []
        self._scheduled = False
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0

    def bind(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self.flush()
        self._loop = loop
        self._loop_thread = threading.get_ident() if loop is not None else 0

    def msg(self, line: bytes) -> None:
        with self._lock:
            self._pending.append(line)
            if self._loop is None or threading.get_ident() != self._loop_thread or self._loop.is_closed():
                self._flush_locked()
            elif not self._scheduled:
                self._scheduled = True
                self._loop.call_later(FLUSH_DELAY, self.flush)

    info = msg

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        self._scheduled = False
        if not self._pending:
            return
        data = b"\n".join(self._pending) + b"\n"
        self._pending.clear()
        try:
            self._file.write(data)
            self._file.flush()
        except (OSError, ValueError) as exc:
            # The audit file is gone or full: say so loudly rather than lose the events silently.
            sys.stderr.write(f"pgwarden: AUDIT WRITE FAILED ({exc}); events follow\n")
            sys.stderr.write(data.decode("utf-8", "replace"))
            sys.stderr.flush()


class AuditLog:
    """Writes audit events to a file (or stdout); listeners see each event as a dict (tests, demo)."""

    def __init__(self, path: str = "-") -> None:
        self.path = path
        self._file: IO[bytes]
        if path == "-":
            self._file = sys.stdout.buffer
            self._owned = False
        else:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "ab")  # noqa: SIM115 - closed in close()
            self._owned = True
        self._writer = _LoopBatchedWriter(self._file)
        self._listeners: list[Listener] = []
        self._processors = [_Stamp(), self._notify, _render]
        self._log = structlog.wrap_logger(
            self._writer, processors=self._processors,
            wrapper_class=structlog.BoundLogger, cache_logger_on_first_use=True,
        )

    def subscribe(self, fn: Listener) -> None:
        """Call fn(event_dict) for every event (tests, demo tour)."""
        self._listeners = [*self._listeners, fn]

    def unsubscribe(self, fn: Listener) -> None:
        self._listeners = [f for f in self._listeners if f is not fn]

    def _notify(self, _logger: Any, name: str, ev: dict[str, Any]) -> dict[str, Any]:
        for fn in self._listeners:
            fn(dict(ev))
        return ev

    def emit(self, event: str, principal: Principal | None, **fields: Any) -> None:
        self._log.info(event, **principal_fields(principal), **fields)

    def emit_with(self, event: str, base: dict[str, Any], fields: dict[str, Any]) -> None:
        """The hot path: ``base`` is a session's precomputed identity fields.

        Runs the same structlog processor chain as ``emit`` but calls it directly:
        the bound-logger machinery costs more than the whole relay of a short query.
        """
        ev: Any = {**base, **fields, "event": event}
        for proc in self._processors:
            ev = proc(None, "info", ev)
        self._writer.msg(ev)

    def bind_loop(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Batch writes on this loop (called by the server on its own loop thread)."""
        self._writer.bind(loop)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.bind(None)
        if self._owned:
            self._file.close()
