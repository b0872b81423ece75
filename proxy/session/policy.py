"""Every SQL text a client sends (Query, Parse), decided before it goes upstream. Sans-IO.

A Query is split into statements; each is decided by the engine (rules/: allow, rewrite or
refuse, PostgreSQL's parser confirming it) and replaced by pgwarden's own text; one refused
statement refuses the whole Query. SET pgwarden.ticket / pgwarden.emergency are answered by
pgwarden itself (checked with the state store, never forwarded); SET application_name keeps
the person's prefix. What must wait for the outside world raises Suspend (proxy/session/waits).
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Any

from proxy.guards.ticketstore import TicketError
from proxy.session.scope import ScopeVerdict
from proxy.session.sqltext import split_statements, statement_type
from proxy.session.tracking import P, Q, S, Expect, Run
from proxy.session.waits import Analysed, Suspend
from proxy.wire import codec
from proxy.wire.codes import F
from rules.decision import Decision, refuse
from rules.pgconfirm import DISAGREEMENT, Disagreement, statement_count
from rules.rewrite import PARSER_DISAGREEMENT

if TYPE_CHECKING:
    from proxy.session.core import Relay

__all__ = ["on_query", "on_parse", "decide", "audit_refusal", "app_prefix", "statement_type", "split_statements",
           "AUDIT_FAILING", "P", "Q", "S"]

AUDIT_FAILING = ("pgwarden: the audit log cannot be written, so statements of restricted roles are refused "
                 "until it can; tell the pgwarden administrator")
#: SET/RESET of pgwarden's own settings: answered by pgwarden, never forwarded with their value.
_OWN_SET = re.compile(
    r"\s*(?:(SET)\s+(?:SESSION\s+)?|(RESET)\s+)pgwarden\.(ticket|emergency)"
    r"(?:\s*(?:=|\s+TO\s+|\s+TO$)\s*(?:'((?:[^']|'')*)'|(DEFAULT)))?\s*;?\s*", re.IGNORECASE)
_SET_OR_RESET = re.compile(r"\s*(?:SET|RESET)\b", re.IGNORECASE)
_MENTIONS_OWN = re.compile(r"pgwarden\.", re.IGNORECASE).search
# SET application_name = 'x' would hide the person from the DBA (or name another one): keep the prefix.
_SET_APPNAME = re.compile(
    r"\s*SET\s+(?:SESSION\s+|LOCAL\s+)?application_name\s*(?:=|\bTO\b)\s*"
    r"(?:'((?:[^']|'')*)'|(DEFAULT)\b|([A-Za-z_][A-Za-z0-9_$]*))\s*;?\s*", re.IGNORECASE)
_OWN_NOOP = ("SET pgwarden.noop TO DEFAULT", "RESET pgwarden.noop")


def _quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def app_prefix(r: Relay, app: str) -> str:
    """application_name upstream: the person, then the client's own name."""
    user = r.principal.user
    return f"{user}/{app}" if app else user


def audit_refusal(r: Relay) -> Decision:
    return refuse(AUDIT_FAILING, reason=f"audit log cannot be written: {r.services.audit.failure}")


def _pin_application_name(r: Relay, stmt: str) -> str | None:
    """SET application_name = 'x' -> SET application_name = 'person/x' (None: not such a SET)."""
    m = _SET_APPNAME.fullmatch(stmt)
    if m is None:
        if "application_name" in stmt.lower():
            # Any other spelling is not recognised: keep it from reaching the server unpinned.
            return "SET application_name = " + _quote_literal(app_prefix(r, ""))
        return None
    value = m.group(1).replace("''", "'") if m.group(1) is not None else (m.group(3) or "")
    if m.group(2):
        value = r.principal.application
    r.audit_base["application"] = value  # later events name the application the client set
    return "SET application_name = " + _quote_literal(app_prefix(r, value))


def _own(r: Relay, text: str) -> Decision | None:
    """SET/RESET pgwarden.ticket / emergency: pgwarden's own answer (None: not such a statement)."""
    mentions = _MENTIONS_OWN(text) is not None
    m = _OWN_SET.fullmatch(text) if mentions else None
    if m is None and not (mentions and _SET_OR_RESET.match(text) is not None):
        return None
    d = _own_setting(r, m, text)
    if d.action == "allow":  # the server runs a harmless statement in its place
        return Decision("allow", sql=_OWN_NOOP[1] if m is not None and m.group(2) else _OWN_NOOP[0])
    return d


def _own_setting(r: Relay, m: re.Match[str] | None, text: str) -> Decision:
    """Checked with the state store, never forwarded."""
    svc = r.services
    if m is None:
        return refuse("pgwarden: write SET pgwarden.ticket = 'T-...', SET pgwarden.emergency = 'why', or "
                      "RESET pgwarden.ticket")
    if svc.guards.store is None:
        return refuse("pgwarden: tickets and break-glass need the guard state store, and none is configured")
    if svc.audit.refusing and svc.engine.restricted(r.principal):
        return audit_refusal(r)
    name, value = m.group(3).lower(), m.group(4)
    if r.tx_status != "I":
        # A transaction could roll the SET back while pgwarden kept it: outside transactions only.
        return refuse("pgwarden: set or reset pgwarden.ticket / pgwarden.emergency outside a transaction block")
    if m.group(2) or m.group(5) or value is None:  # RESET / TO DEFAULT: back to the role's own grants
        r.set_scope(None, "")
        return Decision("allow")
    value = value.replace("''", "'")
    if r.scopes.scope is not None and text == r.scopes.source:
        return Decision("allow")  # the same statement again, after a guard wait: already applied
    failed = r.failed_wait()
    if failed is not None:
        return refuse(failed, reason="ticket check failed")
    verdict = r.take_verdict(ScopeVerdict)
    if verdict is None:
        raise Suspend(_scope_check(r, name, value))
    if verdict.scope is None:
        return refuse(verdict.message, reason="ticket refused")
    r.set_scope(verdict.scope, text)
    return Decision("allow")


async def _scope_check(r: Relay, name: str, value: str) -> ScopeVerdict:
    try:
        return ScopeVerdict(await r.services.open_scope(r.principal, name, value), "")
    except TicketError as exc:
        return ScopeVerdict(None, f"pgwarden: {exc}")
    except Exception as exc:  # noqa: BLE001 - fail closed
        return ScopeVerdict(None, f"pgwarden: the ticket cannot be checked ({type(exc).__name__}); refused")


def decide(r: Relay, text: str) -> Decision:
    """The decision for one statement of this session, with the session's own refusals first."""
    svc = r.services
    engine = svc.engine
    guards = svc.guards
    if r.scopes.scope is not None and r.scopes.ended(getattr(guards.store, "closed_tickets", None)):
        r.set_scope(None, "")
    restricted = engine.restricted(r.principal)
    if guards.store is not None:
        blocked = guards.block(r.principal, restricted)
        if blocked is not None:
            return refuse(blocked[0], reason=blocked[1])
    problem = r.text.problem
    if problem is not None and restricted:
        return refuse(f"pgwarden: {problem}; statement refused")
    if svc.audit.refusing and restricted:  # restricted roles never run unlogged statements
        return audit_refusal(r)
    d = _analysed(r, text, restricted)
    reading = d.reading
    if reading is not None and reading.search_path is not None and r.tx_status != "I":
        return refuse("pgwarden: SET search_path only outside a transaction block (pgwarden follows the "
                      "session's path, and a rollback would undo it)", reason="search_path in a transaction")
    if r.scopes.scope is not None and d.action == "rewrite" and d.tables and reading is not None and (
            "PrepareStmt" in reading.kinds or reading.hold):
        # They would outlive the ticket; the protocol's prepared statements are checked when they run.
        return refuse("pgwarden: under a ticket or break-glass, SQL PREPARE and cursors WITH HOLD of protected "
                      "tables are refused (they would outlive it)", reason="would outlive the ticket")
    if guards.store is not None and d.action == "rewrite" and d.tables and reading is not None \
            and "PrepareStmt" in reading.kinds:
        grants, _ = engine.grants(r.principal)
        if grants is not None and (grants.row_budget or grants.guest_lookups):
            # Its EXECUTEs could not be counted: the protocol's own prepared statements can.
            return refuse(f"pgwarden: role {grants.role} has row budgets or lookup quotas, so SQL PREPARE of "
                          "protected tables is refused; prepare through the protocol (Parse/Bind) instead",
                          reason="uncounted PREPARE")
    return d


def _analysed(r: Relay, text: str, restricted: bool) -> Decision:
    """The engine's decision; a large uncached one is analysed in a worker process while this
    session's messages wait (an analysis never blocks other sessions)."""
    engine = r.services.engine
    limits = r.services.config.analysis
    if restricted and len(text) > limits.max_statement_bytes:
        return refuse(f"pgwarden: the statement is {len(text)} characters long, more than the "
                      f"{limits.max_statement_bytes} allowed for restricted roles (analysis.max_statement_bytes); "
                      "split it or use a table of values", reason="statement too large")
    got = engine.prepare(r.guard.capped(r.principal), text, r.catalog, r.context)
    if isinstance(got, Decision):
        return got
    if len(text) <= limits.offload_bytes:
        return engine.finish(got, engine.run(got))
    failed = r.failed_wait()
    if failed is not None:
        return refuse(failed, reason="analysis failed")
    done = r.take_verdict(Analysed)
    if done is not None and done.text == text:
        return engine.finish(got, done.decision)
    raise Suspend(_offload(r, text, got))


async def _offload(r: Relay, text: str, job: Any) -> Analysed:
    return Analysed(text, await r.services.analysis.run(job))


def _split_disagrees(r: Relay, text: str, parts: list[str]) -> Decision | None:
    """PostgreSQL must split a restricted role's Query where the session did (one meaning)."""
    if len(parts) < 2 or not r.services.engine.restricted(r.principal):
        return None
    try:
        n = statement_count(text)
    except Disagreement as e:
        return refuse(PARSER_DISAGREEMENT.format(str(e)[:300]), reason=f"{DISAGREEMENT}: {e}"[:500])
    if n != len(parts):
        why = f"PostgreSQL reads {n} statement(s) in this Query, pgwarden {len(parts)}"
        return refuse(PARSER_DISAGREEMENT.format(why), reason=f"{DISAGREEMENT}: {why}")
    return None


def on_query(r: Relay, payload: bytes, now: float) -> bytes | None:
    """A simple Query: None to forward it as is, else the Query (or the refusal) to send instead."""
    sql = payload[:-1] if payload.endswith(b"\x00") else payload
    if b"\x00" in sql:
        raise codec.ProtocolError("invalid Query message: a NUL inside the text")
    text = r.text.decode(sql)
    parts = split_statements(text)
    rewritten = False
    for i, part in enumerate(parts):
        if part[:3].upper() == "SET":
            pinned = _pin_application_name(r, part)
            if pinned is not None:
                parts[i] = part = pinned
                rewritten = True
    if len(parts) > 1 and sum(_MENTIONS_OWN(p) is not None and _SET_OR_RESET.match(p) is not None
                              for p in parts) > 1:
        # Each is checked with the state store while the Query waits; one per Query keeps that finite.
        return r.refuse_simple(sql, refuse("pgwarden: one SET pgwarden.ticket / pgwarden.emergency per query",
                                           reason="pgwarden: one SET pgwarden.* per query"), now)
    split = _split_disagrees(r, text, parts)
    if split is not None:
        return r.refuse_simple(sql, split, now)
    runs: list[Run] = []
    for i, part in enumerate(parts):
        d = _own(r, part) or decide(r, part)
        if d.action == "refuse":  # one refused statement refuses the whole Query (nothing of it runs)
            return _refuse_query(r, sql, parts, i, runs, d, now)
        if d.sql is not None:  # pgwarden's own text (always, for restricted roles: rules.pgconfirm)
            parts[i] = d.sql
            rewritten = True
        run = Run(d.redacted or part, d)
        run.start = now
        runs.append(run)
    if r.services.guards.store is not None:
        out = _guard_query(r, payload, sql, parts, runs, now)
        if out is not None:
            return out[0]
    r.guard.cap_retry = None
    if not runs:
        runs = [Run()]
        runs[0].start = now
    r.tracker.add(Expect(Q, runs))
    for run in runs:
        r.count(run, None)
    if rewritten:
        # A newline before each ";": a part may end in a -- comment that would swallow it.
        return codec.query_message(r.text.encode("\n;\n".join(parts)))
    return None


def _refuse_query(r: Relay, sql: bytes, parts: list[str], culprit: int, decided: list[Run], d: Decision,
                  now: float) -> bytes:
    """A Query with a refused statement runs none of its statements: one event each, ``skipped`` for the
    others (they never reach the server), ``refused`` for the one the rules refuse."""
    for j, part in enumerate(parts):
        if j == culprit:
            continue
        run = decided[j] if j < len(decided) else Run(r.services.engine.loggable(part))
        run.start = now
        r.finish(run, "skipped", None, 0)
    if len(parts) > 1 and not d.redacted:
        d = dataclasses.replace(d, redacted=parts[culprit])  # the event shows the statement refused
    return r.refuse_simple(sql, d, now)


def _guard_query(r: Relay, payload: bytes, sql: bytes, parts: list[str], runs: list[Run],
                 now: float) -> tuple[bytes | None] | None:
    """Lookups and rows of a Query counted with the store; (what to send instead,) or None to go on."""
    gate = r.guard
    wants = [gate.rows_wanted(part, run.decision) for run, part in zip(runs, parts)]
    guests = [lk.value for run in runs if run.decision is not None for lk in run.decision.lookups]
    if not guests and not any(wants):
        return None
    refusal = gate.verdict(guests, sum(wants))
    if refusal is not None and gate.cap_retry is None and gate.last_left > 0 and sum(1 for w in wants if w) == 1 \
            and all(run.decision is not None and run.decision.action == "rewrite"
                    for run, w in zip(runs, wants) if w):
        # Fewer rows are left than the cap: decide the read again with what is left as its cap,
        # rather than refuse a statement that may well fit.
        gate.cap_retry = gate.last_left
        return (on_query(r, payload, now),)
    gate.cap_retry = None
    if refusal is not None:
        out = r.refuse_simple(sql, refusal, now)
        r.tracker.expect[-1].runs[0].guard = gate.take_guard()  # type: ignore[index]
        return (out,)
    runs[0].guard = gate.take_guard()
    reserved = gate.take_reserved()
    if reserved is not None:
        for run, w in zip(runs, wants):
            run.reserved = (reserved[0], w) if w else None
    return None


def on_parse(r: Relay, payload: bytes) -> bytes | None:
    """A Parse: None to forward it as is, else the Parse (or the refusal) to send instead."""
    msg = codec.decode_parse(payload)
    rest = payload[len(msg.name) + 1 + len(msg.sql) + 1:]
    text = r.text.decode(msg.sql)
    changed = False
    if text.lstrip()[:3].upper() == "SET":
        pinned = _pin_application_name(r, text)
        if pinned is not None:
            text, changed = pinned, True
    d = _own(r, text) or decide(r, text)
    sent = text
    if d.sql is not None and d.action != "refuse":
        sent, changed = d.sql, True
    if d.redacted:
        text = d.redacted  # what the audit log may show from here on
    if d.action == "refuse":
        r.prepared[msg.name] = (text, d)
        run = Run(text, d)
        r.tracker.add(Expect(P, [run], refusal=codec.error_response(d.sqlstate, d.message), sql=text))
        r.count(run, "refused")  # counted now: the next statement, pipelined or not, is decided after it
        return codec.message(F.PARSE, msg.name + b"\x00" + b"pgwarden refused this statement\x00\x00\x00")
    r.prepared[msg.name] = (text, d, msg.param_types) if d.lookups else (text, d)
    r.scopes.prepared(msg.name)
    r.tracker.add(Expect(P, sql=text))
    if changed:
        return codec.message(F.PARSE, msg.name + b"\x00" + r.text.encode(sent) + b"\x00" + rest)
    return None
