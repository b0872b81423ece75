"""What the server will answer next, so that every statement gets exactly one audit event.

Theory of operation. The relay keeps a queue of what it expects the server to answer, one entry
per request message, in order (Parse -> ParseComplete, Execute -> rows + CommandComplete,
Sync -> ReadyForQuery, a Query -> one CommandComplete per statement then ReadyForQuery). After
an error the server skips to the next Sync, and so does the queue. A statement pgwarden refused
was replaced by one that fails to parse, so the server itself aborts and skips exactly as for a
real error; its error is swapped here for pgwarden's own. Pure: messages in, replacements and
finished statements out (through the owner's callbacks).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Protocol

from proxy.session.sqltext import type_from_tag
from proxy.wire import codec
from proxy.wire.codes import B
from rules.decision import Decision, refuse
from rules.rewrite import ROW_CAP_MARKER, ROW_CHECK_MARKER, row_cap_weight

__all__ = ["Run", "Expect", "Tracker", "TrackerOwner", "Q", "P", "BIND", "D", "E", "C", "S", "FN"]

# Expectation kinds (what the server will answer next).
Q, P, BIND, D, E, C, S, FN = range(8)

_M_COMPLETE, _M_EMPTY, _M_SUSPENDED = B.COMMAND_COMPLETE, B.EMPTY_QUERY_RESPONSE, B.PORTAL_SUSPENDED
_M_READY, _M_ERROR, _M_ROWDESC, _M_NODATA = B.READY_FOR_QUERY, B.ERROR_RESPONSE, B.ROW_DESCRIPTION, B.NO_DATA
_M_DONE = frozenset((B.PARSE_COMPLETE, B.BIND_COMPLETE, B.CLOSE_COMPLETE))
_M_PARAM, _M_COPY_IN = B.PARAMETER_STATUS, B.COPY_IN_RESPONSE

_TAGS: dict[bytes, tuple[str, int | None]] = {}  # CommandComplete payload -> (statement type, rows)


def tag_facts(payload: bytes) -> tuple[str, int | None]:
    """(statement type, rows) of a CommandComplete, cached: the same few tags recur."""
    facts = _TAGS.get(payload)
    if facts is None:
        tag = codec.decode_command_tag(payload)
        facts = (type_from_tag(tag), codec.rows_from_tag(tag))
        if len(_TAGS) < 4096:
            _TAGS[payload] = facts
    return facts


class Run:
    """One statement on its way through the server, for its audit event."""

    __slots__ = ("text", "start", "decision", "done", "guard", "reserved", "intent", "verdict")

    def __init__(self, text: str = "", decision: Decision | None = None) -> None:
        self.text = text  # decoded with the session's client_encoding
        self.start = 0.0
        self.intent = 0  # seq of its durable statement_start (write-ahead), 0: none; the outcome names it
        #: for the refusal streak, in statement order: None (not yet known), "refused", "ran", "skipped";
        #: "" while it is not in the session's outcome queue
        self.verdict: str | None = ""
        self.decision = decision
        self.done = False
        self.guard: dict[str, Any] | None = None  # guard counters for the audit event
        self.reserved: Any = None  # (minute, rows) taken from the row budget, settled when it ends


class Expect:
    """What one request message will be answered with."""

    __slots__ = ("kind", "runs", "index", "refusal", "rows0", "sql")

    def __init__(self, kind: int, runs: list[Run] | None = None, refusal: bytes | None = None,
                 sql: str | None = None) -> None:
        self.kind = kind
        self.runs = runs
        self.index = 0
        self.refusal = refusal  # our ErrorResponse, replacing the server's answer to the poison statement
        self.rows0 = 0
        self.sql = sql


# Answers that carry no state of their own are shared (rows0 is written but never read on them).
EXPECT_BIND, EXPECT_SYNC, EXPECT_DESCRIBE, EXPECT_CLOSE = Expect(BIND), Expect(S), Expect(D), Expect(C)


class TrackerOwner(Protocol):
    """What the tracker needs of the session it tracks for."""

    def finish(self, run: Run, outcome: str, tag: tuple[str, int | None] | None, rows: int,
               err: Any = None) -> bytes | None: ...

    def row_cap_error(self, weight: int = 1) -> bytes: ...

    def row_check_error(self) -> bytes: ...

    def restricted(self) -> bool: ...

    def parameter(self, name: str, value: str) -> None: ...

    def ready(self, status: str) -> None: ...

    def unexpected_error(self, err: Any) -> None: ...

    def copy_in(self) -> None: ...

    def server_error(self) -> None: ...


class Tracker:
    """The expectation queue and the server-to-client half of the relay."""

    def __init__(self, owner: TrackerOwner) -> None:
        self.owner = owner
        self.expect: deque[Expect] = deque()
        self.scanner = codec.BackendScanner()
        self.upstream_fatal = False

    def add(self, e: Expect) -> None:
        if not self.expect:  # rows counted from here; otherwise from when it becomes the head
            e.rows0 = self.scanner.rows
        self.expect.append(e)

    def feed(self, data: bytes) -> bytes:
        """The server's bytes -> what the client gets (uncopied unless something is replaced)."""
        out, events = self.scanner.feed(data)
        pieces: list[bytes] | None = None
        last = 0
        for t, payload, rows, start, end in events:
            replace = self.on_message(t, payload, rows)
            if replace is not None:
                if pieces is None:
                    pieces = []
                pieces.append(out[last:start])
                pieces.append(replace)
                last = end
        if pieces is None:
            return out
        pieces.append(out[last:])
        return b"".join(pieces)

    def on_message(self, t: int, payload: bytes, rows: int) -> bytes | None:
        """Advance the queue; return bytes to send instead of this message, if any."""
        expect = self.expect
        if t == _M_COMPLETE or t == _M_EMPTY or t == _M_SUSPENDED:
            if not expect:
                return None
            head = expect[0]
            if head.kind == Q:
                runs = head.runs
                assert runs is not None
                if head.index >= len(runs):
                    runs.append(Run())
                    runs[-1].start = runs[0].start
                run = runs[head.index]
                head.index += 1
                slip = self.owner.finish(run, "ok", tag_facts(payload) if t == _M_COMPLETE else None,
                                         rows - head.rows0)
                head.rows0 = rows
                if head.index < len(runs):
                    runs[head.index].start = time.perf_counter()
            elif head.kind == E:
                expect.popleft()
                slip = self.owner.finish(head.runs[0], "suspended" if t == _M_SUSPENDED else "ok",  # type: ignore[index]
                                         tag_facts(payload) if t == _M_COMPLETE else None, rows - head.rows0)
            else:
                return None
            return None if slip is None else slip + codec.message(t, payload)  # the receipt, then this message
        if t == _M_READY:
            if expect and expect[0].kind in (S, Q, FN):
                expect.popleft()
            if expect:
                expect[0].rows0 = rows
            self.owner.ready(chr(payload[0]) if payload else "I")
            return None
        if t in _M_DONE:
            if expect:
                expect.popleft()
                if expect:
                    expect[0].rows0 = rows
            return None
        if t == _M_ROWDESC or t == _M_NODATA:
            if expect and expect[0].kind == D:
                expect.popleft()
                if expect:
                    expect[0].rows0 = rows
            return None
        if t == _M_ERROR:
            return self.on_error(payload)
        if t == _M_PARAM:
            ps = codec.decode_parameter_status(payload)
            self.owner.parameter(ps.name, ps.value)
        elif t == _M_COPY_IN:
            self.owner.copy_in()  # the client sends COPY data now, until CopyDone or CopyFail
        return None

    def on_error(self, payload: bytes) -> bytes | None:
        err = codec.decode_error(payload)
        if err.severity in ("FATAL", "PANIC"):
            self.upstream_fatal = True
        self.owner.server_error()
        expect = self.expect
        if not expect:
            self.owner.unexpected_error(err)
            return None
        head = expect[0]
        refusal = head.refusal  # our own error, replacing the server's answer to the poison statement
        late: Decision | None = None  # a refusal PostgreSQL raised for us (row cap, row check)
        if refusal is None and ROW_CAP_MARKER in err.message:
            refusal = self.owner.row_cap_error(row_cap_weight(err.message))
            late = refuse("row cap", reason="result larger than the role's row cap (R3.2)")
        elif refusal is None and ROW_CHECK_MARKER in err.message:
            refusal = self.owner.row_check_error()
            late = refuse("row check", reason="new row outside the role's row filter")
        replacement = refusal
        if refusal is None and "D" in err.fields and self.owner.restricted():
            # DETAIL can echo row values ("Key (id)=(...)", "Failing row contains (...)").
            replacement = codec.encode_error_fields({k: v for k, v in err.fields.items() if k != "D"})
        if head.kind in (Q, FN):
            runs = head.runs or [Run()]
            if head.index < len(runs):
                run = runs[head.index]
                rest = runs[head.index + 1:]
                head.index = len(runs)  # the rest of the Query is not run
                if late is not None:
                    run.decision = late
                sent = max(self.scanner.rows - head.rows0, 0) if refusal is None else 0  # rows before the error
                self.owner.finish(run, "refused" if refusal else "error", None, sent, None if refusal else err)
                for r in rest:  # one event per statement: PostgreSQL skipped these after the error
                    self.owner.finish(r, "refused" if head.refusal is not None else "skipped", None, 0, None)
            return replacement
        # Extended protocol: the server now skips everything up to Sync.
        failed: Run | None = None
        skipped: list[Run] = []
        while expect and expect[0].kind != S:
            e = expect.popleft()
            if e.kind == E and e.runs:
                if failed is None:
                    failed = e.runs[0]
                else:
                    skipped.append(e.runs[0])  # PostgreSQL skips them to the Sync: they never run
        if failed is None:
            # Parse, Bind or Describe failed before any Execute of this batch (or an Execute pgwarden
            # refused, answered like a Parse): its own run if it has one, so it is counted once.
            failed = head.runs[0] if head.runs else Run(head.sql or "")
            if not failed.start:
                failed.start = time.perf_counter()
        if late is not None:
            failed.decision = late
            self.owner.finish(failed, "refused", None, 0, None)
        elif refusal is not None:
            failed.text = head.sql or ""
            if head.runs:
                failed.decision = head.runs[0].decision
            self.owner.finish(failed, "refused", None, 0, None)
        else:
            self.owner.finish(failed, "error", None, max(self.scanner.rows - head.rows0, 0), err)
        for r in skipped:
            self.owner.finish(r, "skipped", None, 0, None)
        return replacement

    def pending(self) -> list[Run]:
        """Statements sent and not yet answered (the session is ending): taken off the queue."""
        out: list[Run] = []
        queue = list(self.expect)
        self.expect.clear()
        for i, e in enumerate(queue):
            if e.kind == P and e.refusal is not None and any(
                    later.kind == E for later in _until_sync(queue[i + 1:])):
                continue  # a refused Parse stands for its statement only until an Execute of it does
            out.extend(r for r in (e.runs or [])[e.index if e.kind == Q else 0:] if not r.done)
        return out


def _until_sync(queue: list[Expect]) -> list[Expect]:
    out = []
    for e in queue:
        if e.kind == S:
            break
        out.append(e)
    return out
