"""The relay of one logged-in session, sans-IO: client messages in, bytes for the server out.

Theory of operation. The I/O layer (proxy/net/client.py) feeds the client's bytes to
:meth:`Relay.client_data` and the server's to :meth:`Relay.server_data`; the relay frames
them (proxy/wire), polices every statement (rules/: the engine decides, the guards count),
tracks what the server will answer (proxy/session/tracking.py) so each statement gets one
audit event, and hands back bytes to write: to the server through ``services.to_server``,
to the client as the return value of :meth:`server_data`. A message that needs an outside
answer (the guard state store, a ticket, a large analysis) raises
:class:`proxy.session.waits.Suspend`; the relay holds it and everything after it, asks the I/O
layer to run the awaitable (``services.wait``), and handles the message again when
:meth:`resume` brings the answer. Nothing here touches a socket, a task or a clock it cannot be
given; tests drive it with byte strings (tests/unit/test_session_core.py).

States (``phase``): READY, COPY_IN (the server asked for COPY data: only CopyData, CopyDone,
CopyFail, Flush, Sync and Terminate are valid until the client ends it), CLOSED. A message not
valid in the current state is a protocol violation (FATAL 08P01), as in PostgreSQL.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proxy.audit.log import principal_fields
from proxy.audit.receipts import protected_by
from proxy.guards.checks import Verdict
from proxy.session import policy
from proxy.session.events import statement_fields
from proxy.session.guarding import GuardGate
from proxy.session.scope import ScopeState
from proxy.session.text import TextReader
from proxy.session.tracking import (EXPECT_BIND, EXPECT_CLOSE, EXPECT_DESCRIBE, EXPECT_SYNC, FN, Expect, Run,
                                    Tracker, E)
from proxy.session.waits import Suspend
from proxy.wire import codec
from proxy.wire.codes import F, SqlState
from rules.decision import Decision, refuse
from rules.principal import Principal
from rules.redact import mask_shapes

__all__ = ["Relay", "Services", "Phase"]

POISON_SQL = b"pgwarden refused this statement\x00"
_F_BIND, _F_EXECUTE, _F_SYNC, _F_QUERY, _F_PARSE = F.BIND, F.EXECUTE, F.SYNC, F.QUERY, F.PARSE
_COPY_IN_VALID = frozenset((F.COPY_DATA, F.COPY_DONE, F.COPY_FAIL, F.FLUSH, F.SYNC, F.TERMINATE))
_READY_VALID = frozenset((F.QUERY, F.PARSE, F.BIND, F.EXECUTE, F.DESCRIBE, F.CLOSE, F.SYNC, F.FLUSH, F.TERMINATE,
                          F.FUNCTION_CALL, F.COPY_DATA, F.COPY_DONE, F.COPY_FAIL))


#: Frontend message names, for errors a person reads.
NAMES = {F.BIND: "Bind", F.CLOSE: "Close", F.DESCRIBE: "Describe", F.EXECUTE: "Execute", F.PARSE: "Parse",
         F.QUERY: "Query", F.SYNC: "Sync", F.FLUSH: "Flush", F.FUNCTION_CALL: "FunctionCall",
         F.TERMINATE: "Terminate", F.COPY_DATA: "CopyData", F.COPY_DONE: "CopyDone", F.COPY_FAIL: "CopyFail"}


class Phase(enum.Enum):
    READY = "ready"
    COPY_IN = "copy in"
    CLOSED = "closed"


@dataclass
class Services:
    """What a relay uses of the world: pure or in-memory parts called directly, I/O as callbacks."""

    engine_of: Callable[[], Any]  # the current rules.engine.Engine (pure; a reload replaces it)
    guards: Any  # proxy.guards.checks.Guards: in-memory checks; store calls come back as awaitables
    audit: Any  # proxy.audit.log.AuditLog: emit/emit_with buffer events; `refusing` when it cannot write
    config: Any  # proxy.config.Config
    stats: Any  # proxy.ops.metrics.Stats or None
    analysis: Any  # proxy.net.analysis_pool.AnalysisPool: run(job) is an awaitable
    to_server: Callable[[bytes], None]
    wait: Callable[[Any], None]  # run this awaitable, then call Relay.resume with its result
    close_client: Callable[[], None]  # the client sent Terminate, or the session must end
    open_scope: Callable[[Principal, str, str], Any]  # an awaitable: the scope of a ticket / break-glass
    when_durable: Callable[[Any, Callable[[bool], None]], None]  # call back once an audit intent is written
    pause_client: Callable[[bool], None]  # stop (True) or resume (False) reading the client

    @property
    def engine(self) -> Any:
        return self.engine_of()


class _Failed:
    """An awaited answer that raised instead: the message that asked is refused with this."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


class Relay:
    """One session after login: policy on the way up, tracking on the way down."""

    def __init__(self, services: Services, principal: Principal, catalog: Any, text: TextReader,
                 context: dict[str, Any]) -> None:
        self.services = services
        self.principal = principal
        self.catalog = catalog
        self.text = text
        self.context = context  # "search_path" as the server has it
        self.audit_base = principal_fields(principal)
        self.tracker = Tracker(self)
        self.guard = GuardGate(self)
        self.scopes = ScopeState()
        self.reader = codec.MessageReader(services.config.max_message_size)
        self.phase = Phase.READY
        self.tx_status = "I"
        self.statements = 0
        # prepared statement / portal name -> (statement text, decision[, param types or values])
        self.prepared: dict[bytes, tuple[Any, ...]] = {}
        self.portals: dict[bytes, tuple[Any, ...] | None] = {}
        self.held: list[tuple[int, bytes]] | None = None  # messages waiting behind a Suspend
        self._verdict: Any = None  # the awaited answer, for the message at the head of ``held``
        self.startup_path: tuple[str, ...] | None = context.get("search_path")
        self.path_pending: tuple[str, ...] | None = None  # SET search_path, until its transaction ends
        self._protected: tuple[Any, frozenset[str]] = (None, frozenset())
        self.protocol_error: str | None = None  # set when the session must end with FATAL 08P01
        self.protocol_cause = ""
        # Write-ahead (evidence before effect): bytes held back with a statement waiting for its durable
        # statement_start, sent with the next write; whether reading was paused because more arrived meanwhile.
        self.out_prefix = b""
        self.hold_paused = False
        self.ending = ""  # "shutdown": the server drains; statements still open end with that label
        # The refusal streak (R3.5) hears outcomes in the order the statements came, a refusal as soon as
        # pgwarden decides it (so a lockout stops the very next statement, pipelined ones too).
        self.outcomes: deque[Run] = deque()

    # --- the I/O layer's inputs ----------------------------------------------------------------

    def client_data(self, data: bytes) -> None:
        reader = self.reader
        whole = not reader._buf
        try:
            msgs = reader.feed(data)
        except codec.ProtocolError as exc:
            self._violation(f"pgwarden: invalid message from client: {exc}", "framing")
            return
        if msgs:
            self.client_messages(msgs, data if whole and not reader._buf else None)

    def server_data(self, data: bytes) -> bytes:
        """The bytes the client gets for these bytes of the server's."""
        return self.tracker.feed(data)

    def resume(self, answer: Any) -> None:
        """The awaited answer for the held message (an exception: the check failed)."""
        if isinstance(answer, Exception):
            answer = _Failed(f"pgwarden: a check this statement needs failed ({type(answer).__name__}); refused")
        held, self.held = self.held or [], None
        self._verdict = answer
        self.client_messages(held[:1], None)
        if self._verdict is answer:  # not asked again (a lockout or a reload came in between)
            self._verdict = None
            reserved = getattr(answer, "reserved", None)
            if reserved is not None:
                self.services.guards.give_back(self.principal, reserved, 0)
        if self.held is not None:  # the head waits again: the rest stays behind it
            self.held.extend(held[1:])
        elif len(held) > 1:
            self.client_messages(held[1:], None)

    def take_verdict(self, kind: type) -> Any:
        """The awaited answer if it is of ``kind`` (and so belongs to this question), else None."""
        v = self._verdict
        if isinstance(v, kind):
            self._verdict = None
            return v
        if isinstance(v, _Failed) and kind is Verdict:
            self._verdict = None
            return Verdict(False, v.message, reason="check failed")
        return None

    def failed_wait(self) -> str | None:
        v = self._verdict
        if isinstance(v, _Failed):
            self._verdict = None
            return v.message
        return None

    def busy(self) -> bool:
        """Is the server still to answer something this client sent (a statement running)?"""
        return bool(self.tracker.expect) or self.held is not None

    def answer_coming(self) -> bool:
        """Will the server answer without more input? Only if the last thing sent is whole and ends a
        request (a Query, or a Sync): PostgreSQL, reading EOF after a Parse without Sync, answers nothing."""
        if self.reader.buffered:
            return False
        if self.held:
            return self.held[-1][0] in (F.QUERY, F.SYNC)
        expect = self.tracker.expect
        return bool(expect) and expect[-1].kind in (policy.Q, policy.S, FN)

    # --- client -> server ----------------------------------------------------------------------

    def client_messages(self, msgs: list[tuple[int, bytes]], raw: bytes | None) -> None:
        """Track and police each message; forward ``raw`` as is unless something changed."""
        if self.held is not None:
            self.held.extend(msgs)  # a check or an intent is in flight: keep the order
            if not self.hold_paused:
                self.hold_paused = True  # and read no more until it is answered
                self.services.pause_client(True)
            return
        changed: list[bytes] | None = None
        now = time.perf_counter()
        for i, (t, payload) in enumerate(msgs):
            valid = _COPY_IN_VALID if self.phase is Phase.COPY_IN else _READY_VALID
            if t not in valid:
                self._forward(changed, None, msgs[:i])
                self._violation(f"pgwarden: unexpected {NAMES.get(t, 'message type ' + repr(chr(t)))} message "
                                + ("during COPY from stdin" if self.phase is Phase.COPY_IN else
                                   "from the client"), "type")
                return
            queued = len(self.tracker.expect)
            try:
                replacement = self._message(t, payload, now)
            except Suspend as s:
                self._forward(changed, None, msgs[:i])
                self.held = list(msgs[i:])
                self.services.wait(s.check)
                return
            except codec.ProtocolError as exc:
                self._forward(changed, None, msgs[:i])
                self._violation(f"pgwarden: invalid {NAMES.get(t, 'frontend')} message: {exc}", NAMES.get(t, "?"))
                return
            if self.phase is Phase.CLOSED:
                self._forward(changed, raw, msgs[: i + 1])
                return
            if (t == _F_EXECUTE or t == _F_QUERY) and len(self.tracker.expect) > queued \
                    and self._needs_intent(self.tracker.expect[-1]):
                # Write-ahead: this statement, and what came before it in this read, wait for its durable
                # statement_start; what came after waits in ``held``.
                before = b"".join(changed) if changed is not None else \
                    b"".join([codec.message(tt, pp) for tt, pp in msgs[:i]])
                self.held = list(msgs[i + 1:])
                self._wait_for_intent(self.tracker.expect[-1], before,
                                      replacement if replacement is not None else codec.message(t, payload))
                return
            if replacement is not None:
                if changed is None:
                    changed = [codec.message(tt, pp) for tt, pp in msgs[:i]]
                changed.append(replacement)
            elif changed is not None:
                changed.append(codec.message(t, payload))
        self._forward(changed, raw, msgs)

    def _forward(self, changed: list[bytes] | None, raw: bytes | None, msgs: list[tuple[int, bytes]]) -> None:
        if changed is not None:
            data = b"".join(changed)
        elif raw is not None:
            data = raw
        else:
            data = b"".join([codec.message(tt, pp) for tt, pp in msgs])
        if self.out_prefix:
            data, self.out_prefix = self.out_prefix + data, b""
        if data:
            self.services.to_server(data)

    # --- write-ahead: evidence before effect (R5) ----------------------------------------------
    # A statement of a restricted role is held, with everything the client sent after it, until its
    # statement_start is durable in the audit log; then it goes upstream, or, if the log could not be
    # written, it is refused in place (42501) and the server never sees it. Its Expect is queued before
    # the wait, so answers to earlier messages are matched meanwhile; every Run carries ``intent`` (the
    # seq of its statement_start) into its outcome event (``start``), whatever the outcome.

    def _needs_intent(self, e: Expect) -> bool:
        """Will this statement reach the server for a restricted role (so its intent must be durable first)?"""
        if e.refusal is not None or not e.runs or not self.services.audit.write_ahead:
            return False
        if not self.services.engine.restricted(self.principal):
            return False
        return any(r.decision is None or r.decision.action != "refuse" for r in e.runs)

    def _wait_for_intent(self, e: Expect, before: bytes, out: bytes) -> None:
        assert e.runs is not None
        seqs, durable = self.services.audit.intent(self.audit_base, [
            {"statement": r.text, "statement_type": policy.statement_type(r.text)} for r in e.runs])
        for r, seq in zip(e.runs, seqs):
            r.intent = seq
        if self.out_prefix:  # a statement made durable just before (a pipelined client): it goes now
            self._forward(None, b"", [])
        self.out_prefix = before  # the messages before it keep their place: they go with it
        self.services.when_durable(durable, lambda ok: self._intent_done(e, out, ok))

    def _intent_done(self, e: Expect, out: bytes, ok: bool) -> None:
        if self.phase is Phase.CLOSED and not self.ending:
            return  # the runs were ended by the teardown (their events name their starts)
        if not ok and self.services.audit.on_failure != "continue":  # continue: run unlogged, knowingly
            self.out_prefix += self._refused_for_audit(e)
        elif not self.ending:  # after the shutdown notice nothing new starts: the teardown labels it
            self.out_prefix += out
        held, self.held = self.held or [], None
        if self.hold_paused:
            self.hold_paused = False
            self.services.pause_client(False)
        if held and not self.ending:
            self.client_messages(held, None)
        if self.out_prefix and not self.ending:
            self._forward(None, b"", [])  # nothing after it was sent (or it waits again): send it now

    def _refused_for_audit(self, e: Expect) -> bytes:
        """The intent could not be written (disk full, file system gone): the statement does not run."""
        assert e.runs is not None
        d = policy.audit_refusal(self)
        for r in e.runs:
            r.decision = d
        e.refusal = codec.error_response(SqlState.INSUFFICIENT_PRIVILEGE, policy.AUDIT_FAILING)
        if e.kind == policy.Q:
            return codec.query_message(POISON_SQL[:-1])
        e.kind, e.sql = policy.P, e.runs[0].text  # answered like a refused Execute: the server skips to Sync
        return codec.message(F.PARSE, b"pgwarden_refused\x00" + POISON_SQL + b"\x00\x00")

    def _message(self, t: int, payload: bytes, now: float) -> bytes | None:
        """One client message: None to forward it as is, else the bytes to send instead."""
        if t == _F_BIND:
            bind = codec.bind_names(payload)
            st = self.prepared.get(bind[1])
            if st is not None and st[1] is not None and st[1].lookups:
                st = self.guard.with_params(st, payload)
            self.portals[bind[0]] = st
            self.scopes.bound(bind[0], bind[1])
            self.tracker.add(EXPECT_BIND)
            return None
        if t == _F_EXECUTE:
            return self._on_execute(payload, now)
        if t == _F_SYNC:
            self.tracker.add(EXPECT_SYNC)
            return None
        if t == _F_QUERY:
            return policy.on_query(self, payload, now)
        if t == _F_PARSE:
            return policy.on_parse(self, payload)
        if t == F.DESCRIBE:
            self.tracker.add(EXPECT_DESCRIBE)
            return None
        if t == F.CLOSE:
            c = codec.decode_close(payload)
            if c.kind == "S":
                self.prepared.pop(c.name, None)
            else:
                self.portals.pop(c.name, None)
            self.tracker.add(EXPECT_CLOSE)
            return None
        if t == F.COPY_DONE or t == F.COPY_FAIL:
            self.phase = Phase.READY
            return None
        if t == F.TERMINATE:
            self.phase = Phase.CLOSED
            self.services.close_client()
            return None
        if t == F.FUNCTION_CALL:
            # Calls a function by OID, bypassing SQL and therefore every rule.
            return self.refuse_simple(b"", refuse("pgwarden: the FunctionCall protocol message is not allowed",
                                                  reason="FunctionCall message"), now, kind=FN)
        return None  # Flush, CopyData

    def _on_execute(self, payload: bytes, now: float) -> bytes | None:
        name, max_rows = codec.split_execute(payload)
        st = self.portals.get(name)
        svc = self.services
        refusal: Decision | None = None
        if svc.audit.refusing and svc.engine.restricted(self.principal):
            # the audit log failing: a statement prepared earlier does not run unlogged either
            refusal = policy.audit_refusal(self)
        elif self.scopes.portals and (self._scope_ended() or self.scopes.stale(name)):
            refusal = refuse("pgwarden: this statement was prepared under a ticket (or break-glass) that is no "
                             "longer in force; prepare it again", reason="ticket no longer in force")
        elif svc.guards.store is not None:
            refusal = self.guard.execute(st, max_rows)
        if refusal is not None:
            return self.refuse_execute(st[0] if st else "", refusal, now, self.guard.take_guard())
        run = Run(st[0], st[1]) if st else Run()
        run.start = now
        if self.guard.last_guard is not None:
            run.guard = self.guard.take_guard()
        if self.guard.last_reserved is not None:
            run.reserved = self.guard.take_reserved()
        self.tracker.add(Expect(E, [run]))
        # An Execute of a statement refused at Parse is that same refusal, counted there already.
        self.count(run, "skipped" if st is not None and st[1] is not None and st[1].action == "refuse" else None)
        return None

    def _scope_ended(self) -> bool:
        if self.scopes.scope is not None and self.scopes.ended(getattr(self.services.guards.store, "closed_tickets",
                                                                       None)):
            self.set_scope(None, "")
        return False

    # --- refusals: a statement that fails to parse stands in, the server skips as for an error ---

    def refuse_simple(self, sql: bytes, d: Decision, now: float, *, kind: int = policy.Q) -> bytes:
        run = Run(d.redacted if d.redacted else self.text.decode(sql), d)
        run.start = now
        self.tracker.add(Expect(kind, [run], refusal=codec.error_response(d.sqlstate, d.message)))
        self.count(run, "refused")
        return codec.query_message(POISON_SQL[:-1])

    def refuse_execute(self, text: str, refusal: Decision, now: float, guard: dict[str, Any] | None = None) -> bytes:
        """A refused Execute: a Parse that fails stands in for it, so the server skips to Sync as for any error."""
        run = Run(text, refusal)
        run.start = now
        run.guard = guard
        self.tracker.add(Expect(policy.P, [run], refusal=codec.error_response(refusal.sqlstate, refusal.message),
                                sql=text))
        self.count(run, "refused")
        return codec.message(F.PARSE, b"pgwarden_refused\x00" + POISON_SQL + b"\x00\x00")

    # --- the refusal streak, in statement order --------------------------------------------------

    def count(self, run: Run, verdict: str | None) -> None:
        """Queue a statement for the streak: its verdict now ("refused" by pgwarden), or None until it ends."""
        run.verdict = verdict
        self.outcomes.append(run)
        self._drain()

    def _drain(self) -> None:
        guards = self.services.guards
        outcomes = self.outcomes
        while outcomes and outcomes[0].verdict is not None:
            run = outcomes.popleft()
            if run.verdict != "skipped" and guards.store is not None:
                d = run.decision
                guards.after(self.principal, run.verdict == "refused",
                             (d.reason or d.message) if d is not None else "", self._emit_event)

    def set_scope(self, scope: Any, source: str) -> None:
        """Use a ticket's (or break-glass) scope from the next statement on, or stop using one."""
        self.principal = self.scopes.set(self.principal, scope, source, self.audit_base, self.services.audit.emit)

    # --- the tracker's owner: what the server's answers mean for this session ------------------

    def finish(self, run: Run, outcome: str, tag: tuple[str, int | None] | None, rows: int,
               err: Any = None) -> bytes | None:
        """Write the statement's audit event; the receipt NOTICE to send before its CommandComplete, if any."""
        if run.done:
            return None
        run.done = True
        self.statements += 1
        fields, slip, seconds = statement_fields(run, outcome, tag, rows, err, self.protected())
        d = run.decision
        if d is not None and d.reading is not None and d.reading.search_path is not None and outcome == "ok":
            self.path_pending = d.reading.search_path
        elif tag is not None and tag[0] == "ROLLBACK":
            self.path_pending = None
        guards = self.services.guards
        if guards.store is not None:
            if run.reserved is not None:
                guards.give_back(self.principal, run.reserved,
                                 self.guard.records_sent(run, fields["rows"]) if outcome != "refused" else 0)
        else:
            fields.pop("guard", None)
        # A statement that never ran neither breaks nor extends a refusal streak.
        verdict = "refused" if outcome == "refused" else "skipped" if outcome == "skipped" else "ran"
        if run.verdict == "":
            self.count(run, verdict)
        elif run.verdict is None:
            run.verdict = verdict
            self._drain()
        self.services.audit.emit_with("statement", self.audit_base, fields)
        if self.services.stats is not None:  # metrics: counted where the event is written
            self.services.stats.statement(outcome, d, seconds, err.sqlstate if err is not None else None)
        return slip

    def _emit_event(self, event: str, fields: dict[str, Any]) -> None:
        """An event of this person's that is not a statement (a lockout the guards decided)."""
        self.services.audit.emit(event, self.principal, **fields)

    def row_cap_error(self, weight: int = 1) -> bytes:
        """PostgreSQL refused the statement at the row cap the rewriter put in it: say so plainly.

        ``weight``: the records one row of it carries (rules.records); the cap counts records."""
        grants, _ = self.services.engine.grants(self.principal)
        cap = getattr(grants, "row_cap", None)
        budget = " (or than is left of the row budget)" if getattr(grants, "row_budget", None) else ""
        what = f"{cap} rows" if weight <= 1 else \
            f"{cap} records (each of its rows carries {weight} records of protected tables)"
        return codec.error_response(
            SqlState.INSUFFICIENT_PRIVILEGE,
            f"pgwarden: the result has more than {what}, the row cap of role {getattr(grants, 'role', '')}"
            f"{budget}; narrow the query (filters, LIMIT) or ask for a ticket")

    def row_check_error(self) -> bytes:
        """PostgreSQL refused an INSERT at the row check the rewriter put in it: nothing was written."""
        grants, _ = self.services.engine.grants(self.principal)
        return codec.error_response(
            SqlState.INSUFFICIENT_PRIVILEGE,
            f"pgwarden: role {getattr(grants, 'role', '')} may not write a row it could not read back (outside its "
            "row filter); nothing was written")

    def restricted(self) -> bool:
        return self.services.engine.restricted(self.principal)

    def protected(self) -> frozenset[str]:
        """Tables whose reads get a receipt, for the rules in force (a reload changes them)."""
        engine = self.services.engine
        if self._protected[0] is not engine:
            self._protected = (engine, frozenset(protected_by(engine.rules)))
        return self._protected[1]

    def parameter(self, name: str, value: str) -> None:
        self.text.track(name, value)

    def ready(self, status: str) -> None:
        self.tx_status = status
        if self.path_pending is not None and status == "I":
            self._follow_search_path(self.path_pending)

    def copy_in(self) -> None:
        self.phase = Phase.COPY_IN

    def server_error(self) -> None:
        self.path_pending = None  # a SET search_path before it is rolled back with its transaction
        if self.phase is Phase.COPY_IN:
            self.phase = Phase.READY  # the server left COPY mode
    def unexpected_error(self, err: Any) -> None:
        self.services.audit.emit("error", self.principal, sqlstate=err.sqlstate, error=mask_shapes(err.message))

    def _follow_search_path(self, path: tuple[str, ...]) -> None:
        """A SET search_path took effect (its transaction ended without an error): resolve names with it."""
        self.path_pending = None
        if path == ():
            self.context.pop("search_path", None)
            if self.startup_path is not None:
                self.context["search_path"] = self.startup_path
        else:
            user = self.services.config.upstream.user
            self.context["search_path"] = tuple(user if s == "$user" else s for s in path)

    # --- endings -------------------------------------------------------------------------------

    def _violation(self, message: str, cause: str) -> None:
        self.protocol_error = message
        self.protocol_cause = cause
        self.phase = Phase.CLOSED
        self.services.close_client()

    def abandon(self, outcome: str, sqlstate: str) -> None:
        """The session ends with statements unanswered: each gets its event, with this outcome."""
        for r in self.tracker.pending():
            r.done = True
            fields = {"statement_type": policy.statement_type(r.text), "statement": r.text, "outcome": outcome,
                      "sqlstate": sqlstate, "rows": None,
                      "duration_ms": round((time.perf_counter() - r.start) * 1000.0, 3)}
            if r.intent:
                fields["start"] = r.intent
            self.services.audit.emit_with("statement", self.audit_base or principal_fields(self.principal), fields)
            if self.services.stats is not None:
                self.services.stats.statement(outcome, r.decision, time.perf_counter() - r.start, sqlstate)

    def shutting_down(self) -> None:
        """The server drains (57P01 sent): what waits will not run, and gets its event."""
        self.ending = "shutdown"
        held, self.held = self.held, None
        if held:
            self.refuse_unrun(held)

    def after_shutdown(self, data: bytes) -> None:
        """Bytes after the drain notice: statements in them are not run, and each gets an event."""
        try:
            msgs = self.reader.feed(data)
        except codec.ProtocolError:
            return
        self.refuse_unrun(msgs)

    def refuse_unrun(self, msgs: list[tuple[int, bytes]]) -> None:
        """One event (refused: shutting down) per statement the client sent that will never reach the server."""
        for t, payload in msgs:
            try:
                if t == F.QUERY:
                    text = self.text.decode(payload[:-1] if payload.endswith(b"\x00") else payload)
                    for part in policy.split_statements(text) or [text]:
                        self._shutdown_event(part)
                elif t == F.PARSE:
                    m = codec.decode_parse(payload)
                    self.prepared[m.name] = (self.text.decode(m.sql), None)
                elif t == _F_BIND:
                    portal, name = codec.bind_names(payload)
                    self.portals[portal] = self.prepared.get(name)
                elif t == _F_EXECUTE:
                    st = self.portals.get(codec.split_execute(payload)[0])
                    self._shutdown_event(st[0] if st else "")
            except codec.ProtocolError:
                return

    def _shutdown_event(self, text: str) -> None:
        logged = text
        try:  # the text as the log may show it (sensitive literals redacted): the engine's own reading
            if text:
                d = self.services.engine.decide(self.principal, text, self.catalog, self.context)
                logged = d.redacted or text
        except Exception:  # noqa: BLE001 - unreadable: never logged in clear
            logged = "<statement not analysed; not logged in clear>"
        self.statements += 1
        self.services.audit.emit_with("statement", self.audit_base or principal_fields(self.principal), {
            "statement_type": policy.statement_type(logged), "statement": logged, "outcome": "refused",
            "sqlstate": SqlState.ADMIN_SHUTDOWN, "reason": "shutting down", "rows": 0, "duration_ms": 0.0})

