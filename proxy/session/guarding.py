"""The guards that span statements (R3.3 row budgets, R3.4 lookup quotas), from one session's side.

What a statement wants from the state store (guests it looks up, rows it may return) is
worked out here from the decision's facts; the store's answer comes back through a wait
(:class:`proxy.session.waits.Suspend`) and is taken by the message that asked for it. Sans-IO:
the checks are awaitables the I/O layer runs.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from proxy.guards.checks import Verdict, declared_cursor, decode_param, fetch_rows, skip_comments
from proxy.session.waits import Suspend
from proxy.wire import codec
from rules.decision import Decision, refuse
from rules.lookups import canonical_key
from rules.model import CAP_ATTRIBUTE
from rules.principal import Principal

if TYPE_CHECKING:
    from proxy.session.core import Relay

__all__ = ["GuardGate"]


def _param_key(value: str | None, integer: bool) -> str | None:
    return None if value is None else canonical_key(value, integer)


class GuardGate:
    """Lookups and row reservations of one session, and the store's verdicts on them."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.last_guard: dict[str, Any] | None = None  # counters for the next audit event
        self.last_reserved: Any = None  # the row budget reservation the last verdict made
        self.last_left = 0  # rows left of the budget when the last verdict refused for it
        self.cap_retry: int | None = None  # a Query decided again with the rows left as its cap
        #: cursors declared over protected tables (their FETCHes count) -> records one of their rows carries
        self.cursors: dict[str, int] = {}

    def capped(self, p: Principal) -> Principal:
        """This person, with the rows left of their budget as the cap of the statement being decided."""
        if not self.cap_retry:
            return p
        return dataclasses.replace(p, attributes={**p.attributes, CAP_ATTRIBUTE: self.cap_retry})

    def rows_wanted(self, text: str, d: Decision | None, max_rows: int = 0) -> int:
        """Rows a statement may return, to reserve from the person's row budget (0: nothing to reserve).

        Reads of protected tables may return up to the row cap (the rewritten SQL refuses more);
        a FETCH from a cursor declared over them, up to its count. A DECLARE returns nothing itself.
        """
        r = self.relay
        grants, _ = r.services.engine.grants(r.principal)
        if grants is None or not grants.row_budget or not grants.row_cap:
            return 0
        cap = min(grants.row_cap, self.cap_retry) if self.cap_retry else grants.row_cap
        if d is not None and d.action == "rewrite" and d.tables:
            # Classified on pgwarden's own regenerated text (no comments), never on the client's.
            if d.sql is not None and d.reading is not None and "DeclareCursorStmt" in d.reading.kinds:
                name = declared_cursor(d.sql)
                if name is not None:
                    self.cursors[name] = max(1, d.records_per_row)
                return 0
            # anything else may return up to the cap (in records: rows x the records one row carries)
            return min(max_rows * max(1, d.records_per_row), cap) if max_rows > 0 else cap
        if self.cursors:
            body = skip_comments(text)
            if body[:5].upper() == "FETCH":
                f = fetch_rows(body, cap)
                if f is None:
                    return cap  # a FETCH pgwarden cannot read: assume the most
                return min(f[1] * self.cursors[f[0]], cap) if f[0] in self.cursors else 0
            if body[:7].upper() == "EXECUTE" or body[:4].upper() == "MOVE":
                return cap
        return 0

    def records_sent(self, run: Any, rows: int) -> int:
        """What a statement's rows cost the row budget: rows x the records one of them carries
        (the decision's, or for a FETCH the cursor's; rules.records)."""
        d = run.decision
        weight = d.records_per_row if d is not None else 1
        if self.cursors and run.text:
            body = skip_comments(run.text)
            if body[:5].upper() == "FETCH":
                f = fetch_rows(body, 1)
                if f is not None:
                    weight = self.cursors.get(f[0], weight)
        return rows * max(1, weight)

    def verdict(self, guests: list[str | None], want: int) -> Decision | None:
        """None if the statement may go ahead; else the refusal. Suspends the first time it is asked."""
        r = self.relay
        got = r.take_verdict(Verdict)
        if got is None:
            grants, _ = r.services.engine.grants(r.principal)
            if None in guests or (guests and not getattr(grants, "guest_lookups", None)):
                return refuse("pgwarden: a guest lookup could not be read; refused", reason="unreadable lookup")
            raise Suspend(r.services.guards.check(r.principal, grants, [g for g in guests if g is not None],
                                                  want, exempt=r.scopes.guests()))
        self.last_guard = got.audit()
        self.last_reserved = got.reserved
        self.last_left = got.left
        if got.allowed:
            return None
        return refuse(got.message, reason=got.reason or "guard refused")

    def take_guard(self) -> dict[str, Any] | None:
        g, self.last_guard = self.last_guard, None
        return g

    def take_reserved(self) -> Any:
        res, self.last_reserved = self.last_reserved, None
        return res

    @staticmethod
    def with_params(st: tuple[Any, ...], payload: bytes) -> tuple[Any, ...]:
        """Keep a Bind's parameter values with its portal: the quota counts the guests they name."""
        try:
            bind = codec.decode_bind(payload)
        except codec.ProtocolError:
            return (st[0], st[1], None)
        formats = bind.param_formats
        types = st[2] if len(st) > 2 else ()
        values: dict[int, str | None] = {}
        for n, v in enumerate(bind.params, start=1):
            binary = (formats[0] if len(formats) == 1 else formats[n - 1] if len(formats) >= n else 0) == 1
            try:
                values[n] = decode_param(v, binary, types[n - 1] if len(types) >= n else 0)
            except ValueError:
                values[n] = None  # unreadable: the lookup is refused
        return (st[0], st[1], values)

    def execute(self, st: tuple[Any, ...] | None, max_rows: int) -> Decision | None:
        """Execute under the guards: lockouts and an unreachable store stop it here too (a statement
        parsed earlier must not outlive them); lookups and rows are counted first. The refusal, if any."""
        r = self.relay
        engine = r.services.engine
        blocked = r.services.guards.block(r.principal, engine.restricted(r.principal))
        if blocked is not None:
            return refuse(blocked[0], reason=blocked[1])
        if st is None or st[1] is None:
            grants, _ = engine.grants(r.principal)
            if grants is not None and (grants.guest_lookups or grants.row_budget):
                # A portal pgwarden did not see bound (a SQL cursor, a SQL-prepared statement): it
                # cannot be counted, so for a role with quotas or budgets it is not run.
                return refuse(f"pgwarden: role {grants.role} may Execute only statements prepared through the "
                              "protocol (Parse/Bind); read SQL cursors with FETCH", reason="uncounted portal")
            return None
        d: Decision = st[1]
        params = st[2] if len(st) > 2 else None
        guests = [lk.value if lk.param is None else _param_key((params or {}).get(lk.param), lk.integer)
                  for lk in d.lookups]
        want = self.rows_wanted(st[0], d, max_rows)
        if guests or want:
            return self.verdict(guests, want)
        return None
