"""Chain heads anchored outside the log: in the state store's ``audit_anchors`` table.

Theory of operation. The chain in the file proves that what is there was not
edited (and, keyed, that nobody without the key re-chained it), but not that
nothing was cut from its end: a file that stops at seq 900 looks the same as
one whose events 901..950 were deleted. So every ``every_events`` events or
``every_seconds`` seconds, whichever comes first, and once more after
``audit_closed``, the anchorer asks the writer for its *durable* head (written
and fsync'd, so a crash never leaves an anchor pointing past the file) and
inserts (replica, seq, hash, key_id) into the state store. ``pgwarden audit
verify --config`` reads them back (``load_anchors``) and checks each against
the files: a missing seq past the end is a cut tail, another hash at that seq
a re-chained file.

Anchoring is off the statement path: a store that cannot be reached delays
anchors (and says so on stderr once per outage), it never delays a statement.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable
from typing import Any

from proxy.audit.log import AuditLog
from proxy.audit.verify import Anchor

POLL = 0.25  # seconds between looks at the head (a comparison, no I/O)

INSERT = ("INSERT INTO {s}.audit_anchors (replica, seq, hash, key_id) VALUES ($1, $2, $3, $4) "
          "ON CONFLICT DO NOTHING")


class Anchorer:
    """Records the audit chain's durable head in the state store every N events and S seconds."""

    def __init__(self, audit: AuditLog, pool: Callable[[], Any], schema: str, *, every_events: int = 1000,
                 every_seconds: float = 5.0) -> None:
        self.audit = audit
        self._pool = pool  # returns an asyncpg pool, or raises while the store is unreachable
        self.schema = schema
        self.every_events = max(1, every_events)
        self.every_seconds = every_seconds
        self.anchored = 0  # seq of the last anchor written
        self._last_time = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self.count = 0  # anchors written by this process (tests, metrics)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def due(self) -> bool:
        seq, _ = self.audit.head
        if seq <= self.anchored:
            return False
        if seq - self.anchored >= self.every_events:
            return True
        return self.every_seconds > 0 and time.monotonic() - self._last_time >= self.every_seconds

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(POLL)
            if self.due():
                await self.anchor()

    async def anchor(self) -> bool:
        """Anchor the durable head now; False if the log or the store could not be reached."""
        ok, seq, digest = await self.audit.durable_head()
        if not ok or seq <= self.anchored:
            return ok
        try:
            pool = self._pool()
            await asyncio.wait_for(pool.execute(INSERT.format(s=self.schema), self.audit.replica, seq, digest,
                                                self.audit.key_id), 5)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the store is down: anchors wait, statements do not
            if not self._failing:
                self._failing = True
                print(f"pgwarden: audit anchors cannot be written to the state store ({type(exc).__name__}); "
                      "retrying", file=sys.stderr, flush=True)
            return False
        if self._failing:
            self._failing = False
            print("pgwarden: audit anchors are written to the state store again", file=sys.stderr, flush=True)
        self.anchored = seq
        self._last_time = time.monotonic()
        self.count += 1
        return True

    async def close(self) -> None:
        """After the log was closed (audit_closed is durable): anchor that last head, then stop."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.anchor(), 10)


async def load_anchors(conn: Any, schema: str, replicas: list[str] | None = None) -> dict[str, list[Anchor]]:
    """Every anchor in the store (of ``replicas`` only, if given), per replica, oldest first."""
    sql = f"SELECT replica, seq, hash, anchored_at FROM {schema}.audit_anchors"
    args: list[Any] = []
    if replicas is not None:
        sql += " WHERE replica = ANY ($1)"
        args.append(replicas)
    out: dict[str, list[Anchor]] = {}
    for r in await conn.fetch(sql + " ORDER BY replica, seq", *args):
        out.setdefault(r["replica"], []).append(
            Anchor(r["replica"], int(r["seq"]), r["hash"], r["anchored_at"].isoformat(timespec="seconds")))
    return out
