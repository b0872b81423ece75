"""Rate-limited lines on stderr: one per cause per interval, then a count of those suppressed.

Whatever a client can trigger (a malformed message, an internal error on a
hostile input) must not let any logged-in user flood the operator's log: each
cause gets at most one line per ``INTERVAL``; the next line printed for that
cause says how many were suppressed in between. Never a traceback.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

INTERVAL = 10.0  # seconds
MAX_CAUSES = 1024  # distinct causes remembered (beyond: the oldest is forgotten)


class RateLimited:
    """``say(cause, line)``: print ``line`` unless ``cause`` was printed less than ``interval`` ago."""

    def __init__(self, interval: float = INTERVAL, out: TextIO | None = None) -> None:
        self.interval = interval
        self._out = out
        self._lock = threading.Lock()
        self._last: dict[str, tuple[float, int]] = {}  # cause -> (printed at, suppressed since)

    def say(self, cause: str, line: str) -> bool:
        """True if the line was printed."""
        now = time.monotonic()
        with self._lock:
            at, suppressed = self._last.get(cause, (-1e18, 0))
            if now - at < self.interval:
                self._last[cause] = (at, suppressed + 1)
                return False
            if len(self._last) >= MAX_CAUSES and cause not in self._last:
                self._last.pop(next(iter(self._last)))
            self._last[cause] = (now, 0)
        if suppressed:
            line += f" ({suppressed} more like this in the last {self.interval:g}s were not printed)"
        out = self._out or sys.stderr
        try:
            out.write(line.replace("\n", " ") + "\n")
            out.flush()
        except (OSError, ValueError):
            pass
        return True


_default = RateLimited()


def say(cause: str, line: str) -> bool:
    """The process-wide limiter (protocol errors, internal errors)."""
    return _default.say(cause, line)
