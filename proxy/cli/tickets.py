"""`pgwarden ticket request|approve|reject|list|show|close|overdue` (R4).

The person running it is established like a client login: a user of the config and their
password (see proxy/cli_guards.py). Every command that changes a ticket writes an audit event.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from proxy.cli.guards import add_actor_arguments, authenticate_actor, with_state


def add_ticket_commands(sub: Any) -> None:
    t = sub.add_parser("ticket", help="apply for, approve and close access tickets")
    ts = t.add_subparsers(dest="ticket_command", required=True)
    r = ts.add_parser("request", help="apply for a ticket (for yourself)")
    r.add_argument("--table", action="append", required=True, help="a table (repeat for more)")
    r.add_argument("--scope", action="append", default=[], help="'guest 42[,43]', 'department FO', 'region east'")
    r.add_argument("--from", dest="time_from", help="records from this date/time (inclusive)")
    r.add_argument("--to", dest="time_to", help="records up to this date/time (exclusive)")
    r.add_argument("--reason", required=True)
    r.add_argument("--legal", action="store_true", help="include legal-hold records (needs a legal approver too)")
    r.add_argument("--hours", type=int, help="how long it lasts once approved (default from the rules)")
    r.add_argument("--emergency", type=int, help="the break-glass use (E-N: give N) this ticket backs")
    for name, helptext in (("approve", "approve a ticket"), ("reject", "reject a ticket")):
        a = ts.add_parser(name, help=helptext)
        a.add_argument("id")
        a.add_argument("--comment", default="")
    c = ts.add_parser("close", help="close and archive a ticket with a summary of what was read under it")
    c.add_argument("id")
    ts.add_parser("list", help="tickets you requested or decided (approvers: every pending one)")
    s = ts.add_parser("show", help="one ticket with its decisions")
    s.add_argument("id")
    ts.add_parser("overdue", help="break-glass uses not backed by a ticket in time")
    for p in ts.choices.values():
        add_actor_arguments(p)
        p.set_defaults(fn=_ticket, command="ticket")


def _ticket(args: argparse.Namespace) -> int:
    from proxy.guards.ticketstore import TicketError

    got = authenticate_actor(args)
    if isinstance(got, int):
        return got
    cfg, state, rules, actor = got
    action: Callable[[Any], Awaitable[int]] = {
        "request": _request, "approve": _decide, "reject": _decide, "close": _close, "list": _list,
        "show": _show, "overdue": _overdue}[args.ticket_command]

    from proxy.audit.log import AuditLog, default_replica

    # A change that cannot be audited is not made: the log must take an event before the store is touched.
    log = AuditLog(cfg.audit_path, replica=default_replica() + ":tickets", key=cfg.audit_key)  # a chain of its own
    try:
        log.emit("ticket_command", actor, command=args.ticket_command, id=getattr(args, "id", None))
        log.flush()
        if not log.healthy:
            print(f"pgwarden: the audit log {cfg.audit_path} cannot be written; nothing was changed",
                  file=sys.stderr)
            return 5
        return int(with_state(state, lambda conn: action(Ctx(args, cfg, state.schema, rules, actor, conn, log))))
    except TicketError as exc:
        print(f"pgwarden: {exc}", file=sys.stderr)
        return 4
    except OSError as exc:
        print(f"pgwarden: {exc.strerror or exc}", file=sys.stderr)
        return 1
    finally:
        log.close()


class Ctx:
    def __init__(self, args: argparse.Namespace, cfg: Any, schema: str, rules: Any, actor: Any, conn: Any,
                 log: Any) -> None:
        self.args, self.cfg, self.schema, self.rules, self.actor, self.conn = args, cfg, schema, rules, actor, conn
        self.log = log

    def audit(self, event: str, **fields: Any) -> None:
        self.log.emit(event, self.actor, **fields)


def _qualified(rules: Any, name: str) -> str:
    if name in rules.tables:
        return name
    if f"public.{name}" in rules.tables:
        return f"public.{name}"
    from proxy.guards.ticketstore import TicketError

    raise TicketError(f"table {name!r} is not in the rules")


async def _request(c: Ctx) -> int:
    from proxy.guards.ticketstore import Request, parse_scope, request, when

    a = c.args
    scope = parse_scope(a.scope)
    tables = tuple(dict.fromkeys(_qualified(c.rules, t) for t in a.table))
    from rules.tickets import cross_region

    cross = cross_region(tables, scope["regions"], c.actor.attributes.get("region"), c.rules.tables)
    r = Request(requester=c.actor.user, role=c.actor.role, department=c.actor.department, tables=tables,
                reason=a.reason, hours=a.hours or c.rules.tickets.default_hours, legal=a.legal, cross_region=cross,
                time_from=when(a.time_from), time_to=when(a.time_to), emergency=a.emergency, **scope)
    tid = await request(c.conn, c.schema, r, c.rules.tickets)
    backs = {"backs_emergency": f"E-{a.emergency}"} if a.emergency is not None else {}  # for audit report
    c.audit("ticket_requested", ticket=tid, tables=list(tables), scope={k: list(v) for k, v in scope.items()},
            time_from=a.time_from, time_to=a.time_to, legal=a.legal, cross_region=cross, reason=a.reason, **backs)
    print(tid)
    return 0


async def _decide(c: Ctx) -> int:
    from proxy.guards.ticketstore import decide

    approve = c.args.ticket_command == "approve"
    status, missing = await decide(c.conn, c.schema, c.args.id, c.actor.user, c.actor.role, approve,
                                   c.args.comment, c.rules.tickets)
    c.audit("ticket_approved" if approve else "ticket_rejected", ticket=c.args.id, status=status,
            comment=c.args.comment)
    print(f"{c.args.id}: {status}" + (f" (still needs {missing})" if missing else ""))
    return 0


async def _close(c: Ctx) -> int:
    from proxy.guards.ticketstore import TicketError, close, show

    t = await show(c.conn, c.schema, c.args.id)
    if c.actor.user != t["requester"] and c.actor.role not in c.rules.tickets.approvers:
        raise TicketError("only the requester or an approver may close a ticket")
    summary = read_summary(c.cfg.audit_path, c.args.id)
    purged = await close(c.conn, c.schema, c.args.id, c.actor.user, summary, c.rules.tickets)
    c.audit("ticket_closed", ticket=c.args.id, summary=summary, purged=purged)
    print(f"{c.args.id}: closed; {summary['statements']} statements, {summary['rows']} rows, "
          f"{len(summary['guests'])} guests read under it" + (f"; {purged} old tickets purged" if purged else ""))
    return 0


async def _list(c: Ctx) -> int:
    from proxy.guards.ticketstore import listing

    everyone = c.actor.role in c.rules.tickets.approvers | c.rules.tickets.legal_approvers
    for t in await listing(c.conn, c.schema, c.actor.user, everyone):
        print(f"{t['id']}  {t['status']:<8}  {t['requester']:<10}  {','.join(t['tables'])}  {t['reason']}")
    return 0


async def _show(c: Ctx) -> int:
    from proxy.guards.ticketstore import TicketError, show

    t = await show(c.conn, c.schema, c.args.id)
    involved = c.actor.user == t["requester"] or any(d["approver"] == c.actor.user for d in t["decisions"])
    if not involved and c.actor.role not in c.rules.tickets.approvers | c.rules.tickets.legal_approvers:
        raise TicketError(f"ticket {c.args.id} is not one you are involved in")
    print(json.dumps(t, default=str, ensure_ascii=False, indent=2))
    return 0


async def _overdue(c: Ctx) -> int:
    from proxy.guards.ticketstore import overdue

    for e in await overdue(c.conn, c.schema, c.rules.tickets):
        print(f"E-{e['id']}  {e['user_name']:<10}  {e['role']:<18}  started {e['started_at']:%Y-%m-%d %H:%M}  "
              f"{e['reason']}")
    return 0


def read_summary(audit_path: str, ticket: str) -> dict[str, Any]:
    """What was read under a ticket, from the audit log: statements, rows, guests, tables."""
    statements = rows = 0
    guests: set[str] = set()
    tables: set[str] = set()
    from proxy.audit.files import read_lines

    base = Path(audit_path)
    # Worker files (audit-w1.jsonl) and monthly ones (audit-%Y-%m.jsonl, finished months gzipped).
    pattern = base.stem.replace("%Y", "[0-9]" * 4).replace("%m", "[0-9]" * 2) + "*" + base.suffix
    files = sorted([*base.parent.glob(pattern), *base.parent.glob(pattern + ".gz")]) if audit_path != "-" else []
    for f in files:
        for raw in read_lines(str(f)):
            line = raw.decode("utf-8", "replace")
            if ticket not in line:
                continue
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if e.get("event") != "statement" or e.get("ticket") != ticket:
                continue
            statements += 1
            rows += int(e.get("rows") or 0)
            guests.update((e.get("guard") or {}).get("lookups", {}).keys())
            tables.update(e.get("tables") or [])
    return {"statements": statements, "rows": rows, "guests": sorted(guests), "tables": sorted(tables)}
