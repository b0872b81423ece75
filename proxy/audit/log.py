"""One structured audit event per statement (R5.1), as hash-chained JSON lines (R5.2).

Events pass through a structlog processor chain (plain functions: time stamp,
event id, listeners) and reach the file through a writer that chains and
writes them. Chaining happens under the writer's lock, in the order the lines
reach the file, so the file order is the chain order even when several
threads write (see ``audit_chain`` for the canonical form).

Writes are batched: under load many statements finish close together, and
one ``write`` for all of them is what keeps auditing every statement
affordable on the relay's hot path. Events wait at most FLUSH_DELAY on the
loop thread; other threads write at once; ``close()`` (SIGTERM) writes all.

When the file cannot be written (disk full, file system gone) the events
stay in memory and are retried every RETRY_DELAY (reopening the path), so
the chain in the file stays whole once the problem is fixed; ``healthy`` is
False meanwhile, and with ``on_failure: refuse`` (the default) the session
refuses restricted roles' statements rather than run them unlogged. Past
MAX_UNWRITTEN bytes the oldest events go to stderr instead, and ``pgwarden
audit verify`` will report them as missing from the file.

A path containing ``%Y`` and ``%m`` rotates monthly (UTC); each finished
month is gzipped in a background thread. The chain continues across months
and across restarts: on start the last event of this replica is read back
from the newest file. A chain that does not end in ``audit_closed`` (a clean
stop) continues after an explicit ``chain_restart`` event with reason
``unclean stop``; a torn last line (a crash mid-write) is first closed off
with a newline.

Write-ahead (evidence before effect). ``intent`` chains a ``statement_start``
event and returns a future that resolves once that line is written *and
fsync'd*; the session holds a restricted role's statement until then. One
thread does the fsyncs, in groups: every intent that arrives while an fsync
runs is made durable by the next one, so N sessions pay one fsync between
them, and the event loop never waits on the disk. A failed write resolves
the future with False (the statement is refused) and turns refusal on for
every later statement at once.

Keyed chains. With ``key`` set, events carry ``key_id`` and their ``hash`` is
an HMAC-SHA256 (``proxy.audit.chain``); ``durable_head`` gives the
anchorer (``proxy.audit.anchors``) the last fsync'd (seq, hash) to record in
the state store, outside the file.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import structlog

from proxy.audit import files as audit_files
from proxy.audit.chain import GENESIS, hash_of, key_id, parse_line, seal
from rules.principal import Principal

Listener = Callable[[dict[str, Any]], None]
Clock = Callable[[], float]
#: Called from the sync thread once a group is durable: (ok, seq, hash) of the durable head.
SyncWaiter = Callable[[bool, int, str], None]

FLUSH_DELAY = 0.002  # seconds an event may wait to be written together with others
RETRY_DELAY = 0.5  # seconds between attempts while the file cannot be written
MAX_UNWRITTEN = 64 << 20  # bytes kept in memory while the file cannot be written
ON_FAILURE = ("refuse", "continue")
UNCLEAN_STOP = "unclean stop"  # reason of the chain_restart after a stop that did not write audit_closed


def principal_fields(p: Principal | None) -> dict[str, Any]:
    """The identity part of every event a session writes (computed once per session)."""
    if p is None:
        return {}
    return {"session": p.session_id, "user": p.user, "role": p.role, "department": p.department,
            "client_addr": p.client_addr, "application": p.application}


def default_replica(port: int | None = None) -> str:
    """Host name and listen port: stable across restarts, distinct for replicas on one host."""
    host = socket.gethostname()
    return f"{host}:{port}" if port is not None else host


class _Stamp:
    """Adds the time and a unique, ordered event id (process prefix + counter: cheaper than uuid4)."""

    def __init__(self, clock: Clock) -> None:
        self._prefix = os.urandom(4).hex()
        self._seq = itertools.count(1)
        self._clock = clock

    def __call__(self, _logger: Any, _name: str, ev: dict[str, Any]) -> dict[str, Any]:
        ev["time"] = datetime.fromtimestamp(self._clock(), timezone.utc).isoformat(timespec="microseconds")
        ev["event_id"] = f"{self._prefix}-{next(self._seq)}"
        return ev


def _settle(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _hand_over(_logger: Any, _name: str, ev: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Last structlog processor: the writer gets the dict itself (it chains under its lock)."""
    return (ev,), {}


class _ChainedWriter:
    """Chains events, batches their lines and writes them to the current file.

    Only the thread running the bound event loop batches; any other thread writes at once.
    (``asyncio.get_running_loop()`` is not used to find out: it costs a getpid() system call.)
    """

    def __init__(self, path: str, replica: str, clock: Clock, key: bytes | None = None) -> None:
        self.path = path  # "-" (stdout), a file, or a monthly template
        self.replica = replica
        self._clock = clock
        self._key = key
        self.key_id = key_id(key) if key is not None else None
        self._keys = {self.key_id: key} if key is not None and self.key_id is not None else {}
        self._lock = threading.Lock()
        # Group commit: waiters of the next fsync, and the thread that does them (started on first use).
        self._sync_cv = threading.Condition(self._lock)
        self._sync_waiters: list[SyncWaiter] = []
        self._sync_thread: threading.Thread | None = None
        self._sync_stop = False
        self.fsyncs = 0  # group commits done (how many fsyncs the intents cost: the benchmark and tests read it)
        self._pending: list[bytes] = []
        self._unwritten = b""  # bytes a failed write left over, written first next time
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._fd = -1
        self._current = ""
        self._rotate_at = 0.0
        self._compressors: list[threading.Thread] = []
        self.seq = 0
        self.prev_hash = GENESIS
        self.healthy = True
        self.failure = ""  # why the last write failed
        self.on_state: Callable[[bool], None] | None = None
        self.closed = False

    # --- opening ----------------------------------------------------------------------------

    def open(self) -> dict[str, Any] | None:
        """Open the file for now and find where this replica's chain continues.

        Returns the fields of a ``chain_restart`` event to write first, if the chain cannot continue.
        """
        if self.path == "-":
            self._fd = sys.stdout.fileno()
            return None
        now = self._clock()
        self._current = audit_files.expand(self.path, now)
        if audit_files.is_template(self.path):
            self._rotate_at = audit_files.next_month_start(now)
        Path(self._current).parent.mkdir(parents=True, exist_ok=True)
        restart = self._resume()
        self._fd = os.open(self._current, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        if audit_files.is_template(self.path):
            self._compress_finished()
        return restart

    def _candidates(self) -> list[str]:
        """Files that may hold this replica's last event, newest first."""
        if not audit_files.is_template(self.path):
            return [self._current] if os.path.isfile(self._current) else []
        files = [f for f in audit_files.template_files(self.path)
                 if f.removesuffix(".gz") <= self._current]
        return list(reversed(files))

    def _resume(self) -> dict[str, Any] | None:
        for f in self._candidates():
            torn: str | None = None
            torn_len = 0
            if not f.endswith(".gz") and not audit_files.ends_with_newline(f):
                with open(f, "ab") as fix:  # close the torn line off: the next event starts a line of its own
                    fix.write(b"\n")
                torn = "is torn (no newline at its end)"
            first = True
            for line in audit_files.lines_backwards(f):
                if not line.strip():
                    continue
                ev = parse_line(line)
                if first and torn is not None and ev is not None and self._matches(ev):
                    torn = None  # the crash came right after a whole line: only its newline is missing
                if first and torn is not None:
                    torn_len = len(line)
                    first = False
                    continue  # a torn line: the chain continues from the last good event before it
                if first and (ev is None or not self._matches(ev)):
                    # The last line is torn or altered: say so and link to the last good event, if any.
                    why = torn or ("is not a complete event" if ev is None else "does not match its hash")
                    found = self._last_good(f)
                    restart: dict[str, Any] = {
                        "reason": f"the last line of {f} ({len(line)} bytes) {why}",
                        "file": f,
                    }
                    if found is not None:
                        self.seq, self.prev_hash = found
                    else:
                        restart["reason"] += "; no earlier event of this replica was found: a new chain starts"
                    return restart
                first = False
                if ev is not None and ev["replica"] == self.replica:
                    if not self._matches(ev):
                        return {"reason": f"the last event of replica {self.replica} in {f} does not match "
                                          "its hash: a new chain starts", "file": f}
                    self.seq, self.prev_hash = ev["seq"], ev["hash"]
                    if torn is not None:
                        return {"reason": UNCLEAN_STOP, "file": f, "last_seq": ev["seq"],
                                "detail": f"the last line of {f} ({torn_len} bytes) {torn}"}
                    if ev.get("event") != "audit_closed":
                        # Killed, crashed or powered off: whatever it had not written is lost. Say so in the chain.
                        return {"reason": UNCLEAN_STOP, "file": f, "last_seq": ev["seq"],
                                "detail": f"the chain of replica {self.replica} ends at seq {ev['seq']} "
                                          f"({ev.get('event')}) without audit_closed: pgwarden was killed, crashed "
                                          "or lost power; events it had not yet written are not in the log"}
                    return None
            if torn is not None:  # nothing of this replica before the torn line: a chain starts after it
                return {"reason": UNCLEAN_STOP, "file": f,
                        "detail": f"the last line of {f} ({torn_len} bytes) {torn}; no earlier event of this "
                                  "replica was found: a new chain starts"}
        return None

    def _matches(self, ev: dict[str, Any]) -> bool:
        """Does the event carry its own hash? A key this writer does not hold (rotated) cannot be checked here."""
        want = hash_of(ev, self._keys)
        return want is None or want == ev["hash"]

    def _last_good(self, path: str) -> tuple[int, str] | None:
        for line in audit_files.lines_backwards(path):
            ev = parse_line(line)
            if ev is not None and ev["replica"] == self.replica and self._matches(ev):
                return ev["seq"], ev["hash"]
        return None

    def _compress_finished(self) -> None:
        """gzip earlier months of this template left uncompressed (by a stop during a rotation)."""
        for f in audit_files.template_files(self.path):
            if not f.endswith(".gz") and f < self._current:
                self._compress_later(f)

    def _compress_later(self, path: str) -> None:
        def run() -> None:
            try:
                audit_files.compress(path)
            except OSError as exc:
                sys.stderr.write(f"pgwarden: cannot compress finished audit file {path}: {exc}\n")

        t = threading.Thread(target=run, name="pgwarden-audit-gzip", daemon=True)
        self._compressors.append(t)
        t.start()

    # --- writing ----------------------------------------------------------------------------

    def bind(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self.flush()
        self._loop = loop
        self._loop_thread = threading.get_ident() if loop is not None else 0

    def msg(self, ev: dict[str, Any]) -> int:
        """Chain and queue one event; returns its seq."""
        with self._lock:
            if self._rotate_at and self._clock() >= self._rotate_at:
                self._flush_locked()
                self._rotate()
            ev["replica"] = self.replica
            ev["seq"] = self.seq + 1
            ev["prev_hash"] = self.prev_hash
            if self.key_id is not None:
                ev["key_id"] = self.key_id
            try:
                line, digest = seal(ev, self._key)
            except (TypeError, ValueError, OverflowError) as exc:  # orjson.JSONEncodeError is a TypeError
                # A value that cannot be serialised must not leave a gap in the chain: log that it happened.
                ev = {k: ev[k] for k in ("replica", "seq", "prev_hash", "event", "key_id") if k in ev}
                ev["unserialisable"] = f"{type(exc).__name__}: {exc}"[:300]
                line, digest = seal(ev, self._key)
            self.seq += 1
            self.prev_hash = digest
            self._pending.append(line)
            if self._loop is None or threading.get_ident() != self._loop_thread or self._loop.is_closed():
                self._flush_locked()
            elif not self._scheduled:
                self._scheduled = True
                self._loop.call_later(FLUSH_DELAY, self.flush)
            return self.seq

    info = msg

    # --- durability: group commit ---------------------------------------------------------

    def sync(self, waiter: SyncWaiter) -> None:
        """Write everything chained so far and fsync it; ``waiter(ok, seq, hash)`` is called from the
        sync thread once done (ok False: the write or the fsync failed, the events are held back)."""
        with self._lock:
            if self.closed or self._sync_stop:
                self._flush_locked()
                # After close() the file was fsync'd and closed: what was written is durable.
                ok = not self._unwritten and (self.closed or self._fsync_locked())
                head = (self.seq, self.prev_hash)
                waiter(ok, *head)
                return
            self._sync_waiters.append(waiter)
            if self._sync_thread is None:
                self._sync_thread = threading.Thread(target=self._sync_loop, name="pgwarden-audit-sync", daemon=True)
                self._sync_thread.start()
            self._sync_cv.notify()

    def _fsync_locked(self) -> bool:
        if self._fd < 0:
            return False
        if self.path == "-":
            return True  # a pipe: written is as durable as it gets; the log pipeline takes it from there
        try:
            os.fsync(self._fd)
            return True
        except OSError as exc:
            self._failed(exc)
            return False

    def _sync_loop(self) -> None:
        """One fsync per group: intents that arrive during an fsync wait for the next one, together."""
        while True:
            with self._lock:
                while not self._sync_waiters and not self._sync_stop:
                    self._sync_cv.wait()
                if not self._sync_waiters:
                    return
                waiters, self._sync_waiters = self._sync_waiters, []
                self._flush_locked()
                ok = not self._unwritten and self._fd >= 0
                head = (self.seq, self.prev_hash)
                fd = -1
                if ok and self.path != "-":
                    try:
                        fd = os.dup(self._fd)  # fsync outside the lock: chaining goes on meanwhile
                    except OSError as exc:
                        self._failed(exc)
                        ok = False
            if fd >= 0:
                self.fsyncs += 1
                try:
                    os.fsync(fd)
                except OSError as exc:
                    ok = False
                    with self._lock:
                        self._failed(exc)
                finally:
                    os.close(fd)
            for w in waiters:
                try:
                    w(ok, *head)
                except Exception as exc:  # noqa: BLE001 - one broken waiter must not stop the others' commits
                    sys.stderr.write(f"pgwarden: audit sync waiter failed: {type(exc).__name__}\n")

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _rotate(self) -> None:
        """A new month: finish the old file (fsync, close, gzip in the background), open the new one."""
        old = self._current
        now = self._clock()
        self._current = audit_files.expand(self.path, now)
        self._rotate_at = audit_files.next_month_start(now)
        if self._current == old:
            return
        try:
            os.fsync(self._fd)
        except OSError:
            pass
        self._close_fd()
        try:
            self._fd = os.open(self._current, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            self._failed(exc)
        self._compress_later(old)

    def _flush_locked(self) -> None:
        self._scheduled = False
        if not self._pending and not self._unwritten:
            return
        data = self._unwritten
        if self._pending:
            data += b"\n".join(self._pending) + b"\n"
            self._pending.clear()
        self._unwritten = b""
        if self._fd < 0 and not self._reopen():
            self._keep(data)
            return
        view = memoryview(data)
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as exc:
            self._failed(exc)
            self._keep(bytes(view))
            self._close_fd()  # reopened on the next attempt: the path may point somewhere healthy by then
            return
        if self.closed:
            self._close_fd()  # a late event after close(): written, and the file closed again
        if not self.healthy:
            self.healthy = True
            self.failure = ""
            sys.stderr.write("pgwarden: audit log writable again; the events held back are written\n")
            if self.on_state is not None:
                self.on_state(True)

    def _reopen(self) -> bool:
        if self.path == "-":
            self._fd = sys.stdout.fileno()
            return True
        try:
            self._fd = os.open(self._current, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            return True
        except OSError as exc:
            self._failed(exc)
            return False

    def _failed(self, exc: OSError) -> None:
        why = f"{os.strerror(exc.errno) if exc.errno else exc} ({errno.errorcode.get(exc.errno or 0, '?')})"
        if self.healthy:
            sys.stderr.write(f"pgwarden: AUDIT LOG {self._current or 'stdout'} CANNOT BE WRITTEN: {why}; "
                             "events are held back and retried\n")
            self.healthy = False
            self.failure = why
            if self.on_state is not None:
                self.on_state(False)

    def _keep(self, data: bytes) -> None:
        """Hold unwritten bytes for the next attempt; beyond MAX_UNWRITTEN, the oldest go to stderr."""
        if len(data) > MAX_UNWRITTEN:
            cut = data.rfind(b"\n", 0, len(data) - MAX_UNWRITTEN) + 1
            sys.stderr.write("pgwarden: AUDIT EVENTS NOT IN THE FILE (held back too long); they follow\n")
            sys.stderr.write(data[:cut].decode("utf-8", "replace"))
            sys.stderr.flush()
            data = data[cut:]
        self._unwritten = data
        loop = self._loop
        if loop is not None and not loop.is_closed() and not self._scheduled:
            self._scheduled = True
            if threading.get_ident() == self._loop_thread:
                loop.call_later(RETRY_DELAY, self.flush)
            else:
                loop.call_soon_threadsafe(loop.call_later, RETRY_DELAY, self.flush)

    def _close_fd(self) -> None:
        if self._fd >= 0 and self.path != "-":
            try:
                os.close(self._fd)
            except OSError:
                pass
        self._fd = -1

    def close(self) -> None:
        with self._lock:
            self._sync_stop = True
            self._sync_cv.notify_all()
        if self._sync_thread is not None:
            self._sync_thread.join(30)  # its last group is written and fsync'd before it ends
        with self._lock:
            self._flush_locked()
            if self._fd >= 0 and self.path != "-":
                try:
                    os.fsync(self._fd)
                except OSError:
                    pass
            self._close_fd()
            self.closed = True
            if self._unwritten:
                sys.stderr.write("pgwarden: AUDIT EVENTS NOT IN THE FILE at close; they follow\n")
                sys.stderr.write(self._unwritten.decode("utf-8", "replace"))
                sys.stderr.flush()
                self._unwritten = b""
        for t in self._compressors:
            t.join(60)


class AuditLog:
    """Writes chained audit events to a file (or stdout); listeners see each event as a dict (tests, demo)."""

    def __init__(self, path: str = "-", *, replica: str | None = None, on_failure: str = "refuse",
                 clock: Clock = time.time, key: bytes | None = None, write_ahead: bool = True) -> None:
        if on_failure not in ON_FAILURE:
            raise ValueError(f"on_failure must be one of {', '.join(ON_FAILURE)}")
        self.path = path
        self.on_failure = on_failure
        #: Hold restricted roles' statements until their statement_start is durable (the session reads it).
        self.write_ahead = write_ahead
        self._writer = _ChainedWriter(path, replica or default_replica(), clock, key)
        self._writer.on_state = self._state_changed
        # Read by the session for every statement: a plain attribute, not a property.
        self.refusing = False
        self._listeners: list[Listener] = []
        self._processors = [_Stamp(clock), self._notify]
        self._log = structlog.wrap_logger(
            self._writer, processors=[*self._processors, _hand_over],
            wrapper_class=structlog.BoundLogger, cache_logger_on_first_use=True,
        )
        self._closed = False
        restart = self._writer.open()
        if restart is not None:
            self.emit("chain_restart", None, **restart)

    @property
    def replica(self) -> str:
        return self._writer.replica

    @property
    def key_id(self) -> str | None:
        """Fingerprint of the chain's HMAC key; None: an unkeyed chain (not insider-proof)."""
        return self._writer.key_id

    @property
    def head(self) -> tuple[int, str]:
        """(seq, hash) of the last event chained (not necessarily written yet)."""
        return self._writer.seq, self._writer.prev_hash

    @property
    def fsyncs(self) -> int:
        """Group commits so far (one fsync each, however many intents waited for it)."""
        return self._writer.fsyncs

    @property
    def healthy(self) -> bool:
        """False while events cannot be written to the file (they are held back and retried)."""
        return self._writer.healthy

    @property
    def failure(self) -> str:
        return self._writer.failure

    def _state_changed(self, healthy: bool) -> None:
        self.refusing = not healthy and self.on_failure == "refuse"

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

        Runs the same structlog processors as ``emit`` but calls them directly:
        the bound-logger machinery costs more than the whole relay of a short query.
        """
        ev: Any = {**base, **fields, "event": event}
        for proc in self._processors:
            ev = proc(None, "info", ev)
        self._writer.msg(ev)

    def intent(self, base: dict[str, Any], statements: list[dict[str, Any]]) -> tuple[list[int], asyncio.Future[bool]]:
        """Write-ahead: chain one ``statement_start`` event per statement; (their seqs, a future that is True
        once all are durable: one fsync covers them and everything chained before).

        Called on a running loop. False: they could not be written, the statements must not run.
        """
        seqs = []
        for fields in statements:
            ev: Any = {**base, **fields, "event": "statement_start"}
            for proc in self._processors:
                ev = proc(None, "info", ev)
            seqs.append(self._writer.msg(ev))
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()

        def done(ok: bool, _seq: int, _hash: str) -> None:
            try:
                loop.call_soon_threadsafe(_settle, fut, ok)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

        self._writer.sync(done)
        return seqs, fut

    async def durable_head(self) -> tuple[bool, int, str]:
        """Write and fsync everything so far; (ok, seq, hash) of the head that is now on disk."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[bool, int, str]] = loop.create_future()

        def done(ok: bool, seq: int, digest: str) -> None:
            try:
                loop.call_soon_threadsafe(_settle, fut, (ok, seq, digest))
            except RuntimeError:
                pass

        self._writer.sync(done)
        return await fut

    def bind_loop(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Batch writes on this loop (called by the server on its own loop thread)."""
        self._writer.bind(loop)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        """Write everything, end the chain segment with ``audit_closed`` (a clean stop), fsync, close."""
        if self._closed:
            return
        self._writer.bind(None)
        if self.path != "-":
            self.emit("audit_closed", None)
        self._closed = True
        self._writer.close()
