"""The session core without sockets (issue 15): random interleavings against a model of PostgreSQL.

A real :class:`proxy.session.core.Relay` (the real engine and hotel rules, the demo catalog) sits
between a scripted client and a small model of PostgreSQL's protocol behaviour (simple and
extended protocol, errors and skip-to-Sync). Hypothesis chooses the requests (statements that
are allowed, refused by the rules, or fail in the server; simple Queries of several statements;
extended batches), how they are pipelined, how the server's answers are cut into chunks, and
whether the client disconnects at some point. Checked every time against a reference of what
PostgreSQL would have answered had each refused statement failed there:

* the client receives exactly the reference message sequence (types and SQLSTATEs, 42501 for
  refusals), nothing of pgwarden's stand-in statements;
* every statement gets exactly one audit event, with the reference outcome
  (ok / error / refused / skipped), also when the client goes away mid-stream.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pgparse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.config import AnalysisLimits
from proxy.guards.checks import Guards
from proxy.session.core import Relay, Services
from proxy.session.text import TextReader
from proxy.wire import codec
from proxy.wire.codes import B, F
from rules.engine import Engine
from rules.model import load_rules
from rules.principal import Principal
from tests.unit.test_rewrite_fixtures import RULES, _CATALOG

STATEMENTS = {"ok": "SELECT 1", "refused": "SELECT * FROM guests", "error": "SELECT 1 / 0"}
ENGINE = Engine(load_rules(RULES))


# --- a model of PostgreSQL's answers ----------------------------------------------------------------


class ModelServer:
    """Frontend bytes in, backend bytes out, following PostgreSQL's protocol (not its SQL)."""

    def __init__(self) -> None:
        self.reader = codec.MessageReader(1 << 24)
        self.failed = False  # after an error in the extended protocol: skip to Sync
        self.statements: dict[bytes, str] = {}
        self.portals: dict[bytes, str] = {}
        self.out = bytearray()

    @staticmethod
    def _fails(sql: str) -> str | None:
        if "pgwarden refused this statement" in sql:
            return "42601"
        if "/ 0" in sql:
            return "22012"
        return None

    def feed(self, data: bytes) -> None:
        for t, payload in self.reader.feed(data):
            self._message(t, payload)

    def _error(self, sqlstate: str) -> None:
        self.out += codec.error_response(sqlstate, "model error")

    def _message(self, t: int, payload: bytes) -> None:
        if t == F.QUERY:
            sql = payload[:-1].decode()
            stmts = [s["stmt"] for s in pgparse.parse(sql)] if "pgwarden refused" not in sql else [None]
            if not stmts:
                self.out += codec.empty_query_response()
            pieces = [p for p in sql.split("\n;\n")] if len(stmts) > 1 else [sql]
            for piece in pieces:
                why = self._fails(piece)
                if why:
                    self._error(why)
                    break
                self.out += codec.command_complete("SELECT 1")
            self.out += codec.ready_for_query("I")
            return
        if t == F.SYNC:
            self.failed = False
            self.out += codec.ready_for_query("I")
            return
        if self.failed or t == F.FLUSH:
            return
        if t == F.PARSE:
            m = codec.decode_parse(payload)
            sql = m.sql.decode()
            if self._fails(sql) == "42601":
                self._error("42601")
                self.failed = True
                return
            self.statements[m.name] = sql
            self.out += codec.message(B.PARSE_COMPLETE)
        elif t == F.BIND:
            portal, name = codec.bind_names(payload)
            self.portals[portal] = self.statements.get(name, "")
            self.out += codec.message(B.BIND_COMPLETE)
        elif t == F.DESCRIBE:
            self.out += codec.message(B.NO_DATA)
        elif t == F.EXECUTE:
            portal, _ = codec.split_execute(payload)
            why = self._fails(self.portals.get(portal, ""))
            if why:
                self._error(why)
                self.failed = True
            else:
                self.out += codec.command_complete("SELECT 1")
        elif t == F.CLOSE:
            self.out += codec.message(B.CLOSE_COMPLETE)


# --- the scripted client and its reference -----------------------------------------------------------


@dataclass
class Request:
    kind: str  # "query" | "batch"
    statements: list[str]  # kinds: ok / refused / error
    describe: bool = False

    def wire(self, n: int) -> bytes:
        if self.kind == "query":
            return codec.query_message("; ".join(STATEMENTS[s] for s in self.statements))
        out = b""
        for j, s in enumerate(self.statements):
            name = f"s{n}_{j}".encode()
            out += codec.message(F.PARSE, name + b"\0" + STATEMENTS[s].encode() + b"\0\0\0")
            out += codec.message(F.BIND, name + b"\0" + name + b"\0\0\0\0\0\0\0")
            if self.describe:
                out += codec.message(F.DESCRIBE, b"P" + name + b"\0")
            out += codec.message(F.EXECUTE, name + b"\0" + struct.pack("!i", 0))
        return out + codec.message(F.SYNC)

    def reference(self) -> tuple[list[tuple[str, str | None]], list[str]]:
        """(messages the client should get, as (type, sqlstate), outcomes of the statement events)."""
        msgs: list[tuple[str, str | None]] = []
        outcomes: list[str] = []
        if self.kind == "query":
            if "refused" in self.statements:  # nothing of the Query runs
                msgs.append(("E", "42501"))
                outcomes += ["refused" if s == "refused" else "skipped" for s in self.statements]
                first = self.statements.index("refused")
                outcomes = [o if i == first or o == "skipped" else "skipped" for i, o in enumerate(outcomes)]
            else:
                for i, s in enumerate(self.statements):
                    if s == "error":
                        msgs.append(("E", "22012"))
                        outcomes.append("error")
                        outcomes += ["skipped"] * (len(self.statements) - i - 1)
                        break
                    msgs.append(("C", None))
                    outcomes.append("ok")
            return msgs + [("Z", None)], outcomes
        for i, s in enumerate(self.statements):
            if s == "refused":
                msgs.append(("E", "42501"))
                outcomes += ["refused"] + ["skipped"] * (len(self.statements) - i - 1)
                break
            msgs += [("1", None), ("2", None)] + ([("n", None)] if self.describe else [])
            if s == "error":
                msgs.append(("E", "22012"))
                outcomes += ["error"] + ["skipped"] * (len(self.statements) - i - 1)
                break
            msgs.append(("C", None))
            outcomes.append("ok")
        return msgs + [("Z", None)], outcomes


class Audit:
    """The audit log as the relay sees it: events in memory."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.refusing = False
        self.write_ahead = False
        self.on_failure = "refuse"
        self.failure = ""

    def emit(self, event: str, principal: Any, **fields: Any) -> None:
        self.events.append({"event": event, **fields})

    def emit_with(self, event: str, base: dict[str, Any], fields: dict[str, Any]) -> None:
        self.events.append({"event": event, **fields})


@dataclass
class Harness:
    relay: Relay
    audit: Audit
    server: ModelServer
    to_client: bytearray = field(default_factory=bytearray)
    waits: list[Any] = field(default_factory=list)
    closed: bool = False


def harness() -> Harness:
    audit = Audit()
    server = ModelServer()
    h: Harness
    cfg = SimpleNamespace(max_message_size=1 << 24, analysis=AnalysisLimits(), upstream=SimpleNamespace(user="svc"))
    services = Services(engine_of=lambda: ENGINE, guards=Guards(None, lambda: ENGINE.rules, lambda c: None),
                        audit=audit, config=cfg, stats=None, analysis=None, to_server=server.feed,
                        wait=lambda aw: h.waits.append(aw), close_client=lambda: setattr(h, "closed", True),
                        open_scope=lambda *a: None, when_durable=lambda *a: None, pause_client=lambda p: None)
    principal = Principal(user="alice", role="front_desk", department="FO", attributes={"training_completed": True},
                          database="hotel")
    relay = Relay(services, principal, _CATALOG, TextReader(), {})
    h = Harness(relay, audit, server)
    return h


def client_view(data: bytes) -> list[tuple[str, str | None]]:
    out = []
    for t, payload in codec.MessageReader(1 << 24).feed(data):
        out.append((chr(t), codec.decode_error(payload).sqlstate if t == B.ERROR_RESPONSE else None))
    return out


requests = st.lists(st.builds(
    Request, kind=st.sampled_from(["query", "batch"]),
    statements=st.lists(st.sampled_from(sorted(STATEMENTS)), min_size=1, max_size=3),
    describe=st.booleans()), min_size=1, max_size=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(reqs=requests, steps=st.lists(st.tuples(st.booleans(), st.integers(1, 64)), max_size=60),
       leave_after=st.one_of(st.none(), st.integers(0, 5)))
def test_interleavings_answer_as_postgresql_would(reqs: list[Request], steps: list[tuple[bool, int]],
                                                 leave_after: int | None) -> None:
    h = harness()
    wire = [r.wire(n) for n, r in enumerate(reqs)]
    sent = 0
    steps = list(steps)
    while True:
        send, size = steps.pop(0) if steps else (sent < len(wire), 1 << 20)
        if leave_after is not None and sent > leave_after:
            break
        if send and sent < len(wire):
            h.relay.client_data(wire[sent])
            sent += 1
        elif h.server.out:
            chunk, h.server.out[:size] = bytes(h.server.out[:size]), b""
            h.to_client += h.relay.server_data(chunk)
        elif sent >= len(wire):
            break
    assert not h.waits and not h.closed
    statements = [e for e in h.audit.events if e["event"] == "statement"]
    if leave_after is not None and sent > leave_after:
        # The client went away: whatever was still unanswered gets its event now.
        h.relay.abandon("client_disconnected", "08006")
        statements = [e for e in h.audit.events if e["event"] == "statement"]
        assert len(statements) == sum(len(r.statements) for r in reqs[:sent])
        assert not h.relay.busy()
        return
    want_msgs: list[tuple[str, str | None]] = []
    want_outcomes: list[str] = []
    for r in reqs:
        m, o = r.reference()
        want_msgs += m
        want_outcomes += o
    assert client_view(bytes(h.to_client)) == want_msgs
    assert sorted(e["outcome"] for e in statements) == sorted(want_outcomes)
    assert [e["outcome"] for e in statements if e["outcome"] != "skipped"] == \
           [o for o in want_outcomes if o != "skipped"]
    assert not h.relay.busy()


def test_a_message_invalid_in_copy_in_is_a_protocol_violation() -> None:
    h = harness()
    h.relay.copy_in()
    h.relay.client_data(codec.message(F.COPY_DATA, b"1\n"))
    assert not h.closed
    h.relay.client_data(codec.query_message("SELECT 1"))
    assert h.closed and h.relay.protocol_error and "during COPY from stdin" in h.relay.protocol_error


def test_a_malformed_bind_is_a_protocol_violation_not_a_crash() -> None:
    h = harness()
    h.relay.client_data(codec.message(F.BIND, b"no terminator"))
    assert h.closed and "invalid Bind message" in (h.relay.protocol_error or "")
