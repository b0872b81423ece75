"""One structured audit event per statement (R5.1), as JSON lines through structlog.

Each event is flushed as it is written: an audit line that sits in a buffer
when the process dies is a lost audit line. The logger is built per server,
not configured globally, so several servers (tests, replicas) never share one.
"""

from __future__ import annotations

import sys
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import orjson
import structlog

from .identity import Principal

STATEMENT_FIELDS = (
    "time", "event", "event_id", "session", "user", "role", "department", "client_addr", "application",
    "statement_type", "statement", "outcome", "sqlstate", "error", "rows", "duration_ms",
)


def _render(_logger: Any, _name: str, event_dict: dict[str, Any]) -> bytes:
    return orjson.dumps(event_dict, default=str)


class AuditLog:
    """Writes audit events to a file (or stdout) and keeps the last few for tests and the demo."""

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
        self._log = structlog.wrap_logger(
            structlog.BytesLogger(self._file),
            processors=[_render],
            wrapper_class=structlog.BoundLogger,
            cache_logger_on_first_use=True,
        )
        self._listeners: list[Any] = []
        self._lock = threading.Lock()

    def subscribe(self, fn: Any) -> None:
        """Call fn(event_dict) for every event (tests, demo tour)."""
        with self._lock:
            self._listeners.append(fn)

    def unsubscribe(self, fn: Any) -> None:
        with self._lock:
            if fn in self._listeners:
                self._listeners.remove(fn)

    def emit(self, event: str, principal: Principal | None, **fields: Any) -> None:
        ev: dict[str, Any] = {
            "time": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
            "event_id": uuid.uuid4().hex,
        }
        if principal is not None:
            ev["session"] = principal.session_id
            ev["user"] = principal.user
            ev["role"] = principal.role
            ev["department"] = principal.department
            ev["client_addr"] = principal.client_addr
            ev["application"] = principal.application
        ev.update(fields)
        try:
            self._log.info(event, **ev)
        except (OSError, ValueError) as exc:
            # The audit file is gone or full: say so loudly on stderr rather than lose the event silently.
            print(f"pgwarden: AUDIT WRITE FAILED ({exc}): {orjson.dumps({'event': event, **ev}, default=str)!r}",
                  file=sys.stderr, flush=True)
        if self._listeners:
            ev["event"] = event
            for fn in list(self._listeners):
                fn(ev)

    def close(self) -> None:
        if self._owned:
            self._file.close()
