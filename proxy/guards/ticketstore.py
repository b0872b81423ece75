"""Tickets and break-glass records in the state store (R4); the rules about them are rules/tickets.py.

Every change is one transaction on one connection: approvals take the ticket's row lock,
so two approvers deciding at once on two replicas are counted one after the other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import asyncpg

from rules.tickets import Decision, Scope, TicketPolicy, approval, may_decide

from proxy.guards.statestore import channel


class TicketError(Exception):
    """A request the ticket rules refuse; the message says why, for the person who asked."""


@dataclass(frozen=True)
class Request:
    requester: str
    role: str
    department: str | None
    tables: tuple[str, ...]
    reason: str
    hours: int
    guests: tuple[str, ...] = ()
    departments: tuple[str, ...] = ()
    regions: tuple[str, ...] = ()
    time_from: datetime | None = None
    time_to: datetime | None = None
    legal: bool = False
    cross_region: bool = False
    emergency: int | None = None


async def request(conn: asyncpg.Connection, schema: str, r: Request, policy: TicketPolicy) -> str:
    if not r.tables:
        raise TicketError("a ticket names at least one table")
    if not r.reason.strip():
        raise TicketError("a ticket needs a reason")
    if not 0 < r.hours <= policy.max_hours:
        raise TicketError(f"a ticket lasts 1 to {policy.max_hours} hours once approved")
    if r.time_from and r.time_to and r.time_from >= r.time_to:
        raise TicketError("the record time range is empty (--from must be before --to)")
    async with conn.transaction():
        if r.emergency is not None:
            owner = await conn.fetchval(f"SELECT user_name FROM {schema}.emergencies WHERE id = $1 FOR UPDATE",
                                        r.emergency)
            if owner != r.requester:
                raise TicketError(f"emergency access {r.emergency} is not yours")
        tid = await conn.fetchval(f"""
            INSERT INTO {schema}.tickets (id, requester, requester_role, requester_department, tables, guests,
                departments, regions, time_from, time_to, legal, cross_region, reason, hours, emergency)
            VALUES ('T-' || to_char(now(), 'YYYY') || '-' || lpad(nextval('{schema}.ticket_numbers')::text, 6, '0'),
                    $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
            RETURNING id""", r.requester, r.role, r.department, list(r.tables), list(r.guests), list(r.departments),
                              list(r.regions), r.time_from, r.time_to, r.legal, r.cross_region, r.reason, r.hours,
                              r.emergency)
        if r.emergency is not None:
            await conn.execute(f"UPDATE {schema}.emergencies SET ticket = $2 WHERE id = $1", r.emergency, tid)
    return str(tid)


async def decide(conn: asyncpg.Connection, schema: str, ticket: str, approver: str, approver_role: str,
                 approve: bool, comment: str, policy: TicketPolicy) -> tuple[str, str]:
    """Record one approval or rejection; returns the ticket's status after it, and what is missing."""
    async with conn.transaction():
        t = await conn.fetchrow(f"SELECT * FROM {schema}.tickets WHERE id = $1 FOR UPDATE", ticket)
        if t is None:
            raise TicketError(f"no ticket {ticket}")
        if t["status"] != "pending":
            raise TicketError(f"ticket {ticket} is {t['status']}; only pending tickets are decided")
        why = may_decide(approver, approver_role, t["requester"], policy)
        if why is not None:
            raise TicketError(why)
        done = await conn.fetchval(f"SELECT true FROM {schema}.ticket_decisions WHERE ticket = $1 AND approver = $2",
                                   ticket, approver)
        if done:
            raise TicketError(f"{approver} has already decided on {ticket}; a second approver is needed")
        await conn.execute(f"INSERT INTO {schema}.ticket_decisions (ticket, approver, approver_role, approve, comment)"
                           " VALUES ($1, $2, $3, $4, $5)", ticket, approver, approver_role, approve, comment)
        rows = await conn.fetch(f"SELECT approver, approver_role, approve FROM {schema}.ticket_decisions "
                                "WHERE ticket = $1", ticket)
        status, missing = approval(t["requester"], t["legal"], t["cross_region"],
                                   [Decision(r["approver"], r["approver_role"], r["approve"]) for r in rows], policy)
        if status == "approved":
            await conn.execute(f"UPDATE {schema}.tickets SET status = 'approved', approved_at = now(), "
                               "expires_at = now() + make_interval(hours => hours) WHERE id = $1", ticket)
        elif status == "rejected":
            await conn.execute(f"UPDATE {schema}.tickets SET status = 'rejected', closed_at = now() WHERE id = $1",
                               ticket)
    return status, missing


async def show(conn: asyncpg.Connection, schema: str, ticket: str) -> dict[str, Any]:
    t = await conn.fetchrow(f"SELECT * FROM {schema}.tickets WHERE id = $1", ticket)
    if t is None:
        raise TicketError(f"no ticket {ticket}")
    out = dict(t)
    out["decisions"] = [dict(r) for r in await conn.fetch(
        f"SELECT approver, approver_role, approve, comment, at FROM {schema}.ticket_decisions WHERE ticket = $1 "
        "ORDER BY at", ticket)]
    if isinstance(out.get("summary"), str):
        out["summary"] = json.loads(out["summary"])
    return out


async def listing(conn: asyncpg.Connection, schema: str, user: str, everyone: bool) -> list[dict[str, Any]]:
    """The tickets a person is involved in (requested or decided); approvers see every pending one too."""
    rows = await conn.fetch(f"""
        SELECT t.id, t.requester, t.status, t.tables, t.reason, t.created_at, t.expires_at
        FROM {schema}.tickets t
        WHERE $2 OR t.requester = $1 OR t.status = 'pending' AND $3
           OR EXISTS (SELECT FROM {schema}.ticket_decisions d WHERE d.ticket = t.id AND d.approver = $1)
        ORDER BY t.created_at""", user, everyone, everyone)
    return [dict(r) for r in rows]


async def close(conn: asyncpg.Connection, schema: str, ticket: str, by: str, summary: dict[str, Any],
                policy: TicketPolicy) -> int:
    """Close (archive) a ticket with what was read under it; purge closed ones past their keep time.

    Returns how many old tickets were purged. Every replica drops the ticket from sessions using it.
    """
    async with conn.transaction():
        t = await conn.fetchrow(f"SELECT requester, status FROM {schema}.tickets WHERE id = $1 FOR UPDATE", ticket)
        if t is None:
            raise TicketError(f"no ticket {ticket}")
        if t["status"] == "closed":
            raise TicketError(f"ticket {ticket} is already closed")
        await conn.execute(f"UPDATE {schema}.tickets SET status = 'closed', closed_at = now(), closed_by = $2, "
                           "summary = $3::jsonb WHERE id = $1", ticket, by, json.dumps(summary, default=str))
        await conn.execute("SELECT pg_notify($1, $2)", channel(schema),
                           json.dumps({"kind": "ticket_closed", "user": t["requester"], "ticket": ticket}))
        purged = await conn.fetchval(f"""
            WITH d AS (DELETE FROM {schema}.tickets WHERE status IN ('closed', 'rejected')
                       AND closed_at < now() - make_interval(days => $1) RETURNING 1)
            SELECT count(*) FROM d""", policy.keep_closed_days)
    return int(purged)


async def scope_of(conn: Any, schema: str, ticket: str, user: str) -> Scope:
    """The scope of an approved, unexpired ticket of this person's; TicketError says why not."""
    t = await conn.fetchrow(f"SELECT * FROM {schema}.tickets WHERE id = $1", ticket)
    if t is None:
        raise TicketError(f"there is no ticket {ticket}")
    if t["requester"] != user:
        raise TicketError(f"ticket {ticket} is not yours; a ticket is used only by the person who requested it")
    if t["status"] != "approved":
        raise TicketError(f"ticket {ticket} is {t['status']}, not approved")
    if t["expires_at"] is None or t["expires_at"] <= datetime.now(timezone.utc):
        raise TicketError(f"ticket {ticket} expired at {t['expires_at']}")
    return Scope(ticket=ticket, tables=tuple(t["tables"]), guests=tuple(t["guests"]),
                 departments=tuple(t["departments"]), regions=tuple(t["regions"]), time_from=t["time_from"],
                 time_to=t["time_to"], legal=t["legal"], expires_at=t["expires_at"])


async def start_emergency(conn: Any, schema: str, user: str, role: str, reason: str, hours: int,
                          tables: tuple[str, ...]) -> Scope:
    """Break-glass: at once, for ``hours``; recorded so that a ticket must follow (R4.5)."""
    if not reason.strip():
        raise TicketError("break-glass needs a reason: SET pgwarden.emergency = 'why'")
    active = await conn.fetchrow(f"SELECT id, expires_at FROM {schema}.emergencies WHERE user_name = $1 "
                                 "AND expires_at > now() ORDER BY id DESC LIMIT 1", user)
    if active is not None:
        # One break-glass at a time, never renewed by asking again: another session joins it as it is.
        return Scope(ticket=f"E-{active['id']}", tables=tables, emergency=True, expires_at=active["expires_at"])
    row = await conn.fetchrow(f"INSERT INTO {schema}.emergencies (user_name, role, reason, expires_at) "
                              "VALUES ($1, $2, $3, now() + make_interval(hours => $4)) RETURNING id, expires_at",
                              user, role, reason, hours)
    return Scope(ticket=f"E-{row['id']}", tables=tables, emergency=True, expires_at=row["expires_at"])


async def overdue(conn: asyncpg.Connection, schema: str, policy: TicketPolicy) -> list[dict[str, Any]]:
    """Break-glass uses not backed, within the backing time, by a ticket that was then approved."""
    rows = await conn.fetch(f"""
        SELECT e.id, e.user_name, e.role, e.reason, e.started_at, e.expires_at FROM {schema}.emergencies e
        LEFT JOIN {schema}.tickets t ON t.id = e.ticket
        WHERE t.approved_at IS NULL AND e.started_at < now() - make_interval(hours => $1)
        ORDER BY e.started_at""", policy.emergency_backing_hours)
    return [dict(r) for r in rows]


def parse_scope(words: list[str]) -> dict[str, tuple[str, ...]]:
    """--scope "guest 42,43" / "department FO" / "region east" -> structured fields (never free text)."""
    out: dict[str, list[str]] = {"guests": [], "departments": [], "regions": []}
    names = {"guest": "guests", "guests": "guests", "department": "departments", "departments": "departments",
             "dept": "departments", "region": "regions", "regions": "regions"}
    for w in words:
        kind, _, values = w.strip().partition(" ")
        key = names.get(kind.lower())
        vals = [v.strip() for v in values.replace(";", ",").split(",") if v.strip()]
        if key is None or not vals:
            raise TicketError(f"scope {w!r}: write 'guest 42[,43]', 'department FO' or 'region east'")
        out[key].extend(vals)
    return {k: tuple(v) for k, v in out.items()}


def when(text: str | None) -> datetime | None:
    """--from/--to: a date or an ISO time (UTC unless it says otherwise)."""
    if not text:
        return None
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise TicketError(f"{text!r} is not a date (YYYY-MM-DD) or an ISO time") from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)



async def open_scope(store: Any, rules: Any, principal: Any, name: str, value: str) -> Any:
    """The scope ``SET pgwarden.ticket = value`` (name "ticket") or ``SET pgwarden.emergency =
    why`` (name "emergency") opens for this person; TicketError says why not."""
    from rules.model import effective_role

    if not store.healthy:
        raise TicketError(f"the guard state store cannot be reached ({store.problem})")
    pool = store._require()
    if name == "ticket":
        return await scope_of(pool, store.schema, value.strip(), principal.user)
    role, _ = effective_role(rules, principal) if rules is not None else (None, "")
    if role is None or not role.emergency_tables:
        raise TicketError(f"role {principal.role} has no break-glass scope in the rules")
    return await start_emergency(pool, store.schema, principal.user, role.name, value, role.emergency_hours,
                                 role.emergency_tables)
