"""Approval tickets and break-glass as the policy engine sees them (R4, R2.5); no I/O.

A ticket's scope is structured, never free text: tables, guests, departments, regions,
a record time range and whether legal-hold records are included. An approved ticket
widens a person's grants exactly that far: for each table in scope, the rows the
scope describes are added (OR) to what the role already sees; a table the role has
no grant for is granted for those rows only, with every sensitive column masked.
Columns are never unmasked by a ticket.

Who may approve, and how many must, is in the rules (``tickets:``); the decision of
whether a ticket is approved is :func:`approval`, a pure function of its decisions.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlglot
from sqlglot import exp

from .grants import ColumnRule, StatementGrants, StatementKind, TableGrant, Treatment


@dataclass(frozen=True)
class TicketPolicy:
    """``tickets:`` in the rules."""

    approvers: frozenset[str] = frozenset()  # roles whose members may approve
    legal_approvers: frozenset[str] = frozenset()  # one of these must co-approve legal-hold access
    hq_approvers: frozenset[str] = frozenset()  # one of these must approve a cross-region ticket (R1.5)
    approvals_needed: int = 2  # distinct approvers (dual authorisation)
    default_hours: int = 8
    max_hours: int = 72
    keep_closed_days: int = 92  # closed tickets are purged after about three months
    emergency_backing_hours: int = 24  # break-glass must be backed by a ticket within this


@dataclass(frozen=True)
class Scope:
    """What a ticket (or a break-glass) opens; hashable, so grants can be cached per scope."""

    ticket: str
    tables: tuple[str, ...]
    guests: tuple[str, ...] = ()
    departments: tuple[str, ...] = ()
    regions: tuple[str, ...] = ()
    time_from: datetime | None = None
    time_to: datetime | None = None
    legal: bool = False
    emergency: bool = False
    expires_at: datetime | None = None


@dataclass(frozen=True)
class Decision:
    approver: str
    approver_role: str
    approve: bool


def approval(requester: str, legal: bool, cross_region: bool, decisions: Sequence[Decision],
             policy: TicketPolicy) -> tuple[str, str]:
    """("approved" | "rejected" | "pending", what is still missing)."""
    if any(not d.approve for d in decisions):
        return "rejected", ""
    ok = [d for d in decisions if d.approve and d.approver != requester]
    approvers = {d.approver for d in ok if d.approver_role in policy.approvers}
    missing = []
    if len(approvers) < policy.approvals_needed:
        missing.append(f"{policy.approvals_needed - len(approvers)} more approval(s) from "
                       f"{', '.join(sorted(policy.approvers)) or 'nobody'}")
    if legal and not any(d.approver_role in policy.legal_approvers for d in ok):
        missing.append(f"a legal approval ({', '.join(sorted(policy.legal_approvers)) or 'nobody'})")
    if cross_region and not any(d.approver_role in policy.hq_approvers for d in ok):
        missing.append(f"a headquarters approval ({', '.join(sorted(policy.hq_approvers)) or 'nobody'})")
    return ("pending", "; ".join(missing)) if missing else ("approved", "")


def may_decide(approver: str, approver_role: str, requester: str, policy: TicketPolicy) -> str | None:
    """None if this person may approve or reject; else why not."""
    if approver == requester:
        return "the requester can never approve or reject their own ticket"
    if approver_role not in policy.approvers | policy.legal_approvers | policy.hq_approvers:
        return f"role {approver_role} does not approve tickets"
    return None


def cross_region(tables: Sequence[str], regions: Sequence[str], own_region: str | None,
                 classified: Mapping[str, Any]) -> bool:
    """Does a ticket reach past the requester's own region (R1.5: a headquarters approver needed)?

    A table with a region column is cross-region unless the scope keeps it to the requester's region.
    """
    regional = [t for t in tables if getattr(classified.get(t), "region_column", None)]
    if not regional:
        return False
    return not regions or own_region is None or any(r != own_region for r in regions)


def _col(name: str) -> exp.Column:
    return exp.column(exp.to_identifier(name, quoted=True))


def _op(left: exp.Expression, op: str, right: exp.Expression) -> exp.Expression:
    return exp.Operator(this=left, operator=f"pg_catalog.{op}", expression=right)


def _lit(v: str) -> exp.Expression:
    return exp.Literal.number(int(v)) if re.fullmatch(r"-?[0-9]{1,18}", v) else exp.Literal.string(v)


def _in(col: str, values: Sequence[str]) -> exp.Expression:
    """col OPERATOR(pg_catalog.=) ANY (ARRAY[...]): values are literals, never SQL."""
    tree = sqlglot.parse_one("x OPERATOR(pg_catalog.=) ANY(a)", read="postgres")
    arr = exp.Array(expressions=[_lit(v) for v in values])

    def put(n: exp.Expression) -> exp.Expression:
        if isinstance(n, exp.Column) and not n.table and n.name in ("x", "a"):
            return _col(col) if n.name == "x" else arr.copy()
        return n

    return tree.transform(put)


def _ts(value: datetime) -> exp.Expression:
    return exp.Cast(this=exp.Literal.string(value.isoformat()), to=exp.DataType.build("timestamptz"))


def scope_filter(table: Any, scope: Scope) -> exp.Expression | None:
    """The rows of ``table`` (rules.model.TableRules) this scope opens; None if it opens none of them.

    Every part of the scope that the table can express narrows it; a part the table cannot
    express (guests on a table without a subject key) opens nothing rather than everything.
    """
    conds: list[exp.Expression] = []
    if scope.guests:
        if not table.subject_key:
            return None
        conds.append(_in(table.subject_key, scope.guests))
    if scope.departments:
        if not table.department_column:
            return None
        conds.append(_in(table.department_column, scope.departments))
    if scope.regions:
        col = getattr(table, "region_column", None)
        if not col:
            return None
        conds.append(_in(col, scope.regions))
    if scope.time_from is not None or scope.time_to is not None:
        if not table.time_column:
            return None
        if scope.time_from is not None:
            conds.append(_op(_col(table.time_column), ">=", _ts(scope.time_from)))
        if scope.time_to is not None:
            conds.append(_op(_col(table.time_column), "<", _ts(scope.time_to)))
    hold = getattr(table, "legal_hold_column", None)
    if hold and not scope.legal:
        conds.append(exp.Is(this=_col(hold), expression=exp.false()))
    if not conds:
        return exp.true()
    return exp.and_(*conds)


def widen(grants: StatementGrants, tables: Mapping[str, Any], scope: Scope,
          canonical: Any) -> StatementGrants:
    """``grants`` plus what ``scope`` opens (rows only; masks stay as the role has them)."""
    out = dict(grants.tables)
    for name in scope.tables:
        t = tables.get(name)
        if t is None:
            continue
        extra = scope_filter(t, scope)
        if extra is None:
            continue
        key = canonical(name)
        g = out.get(key)
        if g is None:
            cols = {c: ColumnRule(Treatment.MASK, kind) for c, kind in t.sensitive.items()}
            out[key] = TableGrant(table=key, row_filter=extra, columns=cols, kinds=frozenset({StatementKind.SELECT}),
                                  reason=f"ticket {scope.ticket}", subject_key=t.subject_key,
                                  record_key=t.record_key, personal=frozenset(t.sensitive))
        else:
            flt = extra if g.row_filter is None else exp.or_(exp.Paren(this=g.row_filter.copy()),
                                                              exp.Paren(this=extra))
            if g.row_filter is None:
                flt = None  # the role sees every row already
            # Read-only while widened: a ticket opens rows to read, never to write (the role's writes
            # would otherwise reach the ticket's rows too).
            out[key] = dataclasses.replace(g, row_filter=flt, kinds=frozenset({StatementKind.SELECT}),
                                           reason=f"{g.reason}, widened by ticket {scope.ticket}")
    flags = grants.flags | {"emergency" if scope.emergency else "ticket"}
    return dataclasses.replace(grants, tables=out, flags=frozenset(flags))
