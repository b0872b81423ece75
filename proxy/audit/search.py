"""``pgwarden audit search``: find events by user, role, guest, table, decision, ticket, time, receipt, value.

Pure functions over event dicts (``matches``, ``guests_of``); the command
reads the files. Guests: when the lookup quota (R3.4, a state store) counted
the statement, its event names them in ``guard.lookups``, Bind parameters
included. Otherwise they are read from the logged statement itself, as the
literals compared with a table's subject key (``guest_id = 42``,
``guests.id IN (1, 2)``), with the subject keys taken from the rules; a
guest passed as a bind parameter ($1) is then not in the text, and such
lookups are found only by table and time.

Values: a literal redacted from the log (R2.4) left its keyed hash in the
event's ``value_hashes`` (rules.redact.value_hash); ``--value X`` hashes X with
the same key and matches those, and also finds X where it was logged in clear
(a literal no rule made sensitive), as a whole literal.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from typing import Any

SubjectKeys = Mapping[str, str]  # qualified table -> subject key column ("public.cs_records" -> "guest_id")
DECISIONS = ("allow", "rewrite", "refuse", "error")


def parse_when(text: str, now: datetime | None = None) -> datetime:
    """``30d``, ``12h``, ``90m`` (that long before now), or an ISO date/time (UTC unless it says)."""
    now = now or datetime.now(timezone.utc)
    m = re.fullmatch(r"(\d+)\s*([dhm])", text.strip())
    if m:
        n, unit = int(m.group(1)), m.group(2)
        return now - {"d": timedelta(days=n), "h": timedelta(hours=n), "m": timedelta(minutes=n)}[unit]
    try:
        t = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"not a time: {text!r} (use 30d, 12h, 2026-11-01 or 2026-11-01T08:00+08:00)") from None
    return t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)


def event_time(ev: Mapping[str, Any]) -> datetime | None:
    t = ev.get("time")
    if not isinstance(t, str):
        return None
    try:
        return datetime.fromisoformat(t)
    except ValueError:
        return None


def decision_of(ev: Mapping[str, Any]) -> str | None:
    """allow | rewrite | refuse | error for a statement event; None for other events."""
    if ev.get("event") != "statement":
        return None
    outcome = ev.get("outcome")
    if outcome == "refused":
        return "refuse"
    if outcome == "error":
        return "error"
    return str(ev.get("decision") or "allow")


def _short(table: str) -> str:
    return table.removeprefix("public.")


@lru_cache(maxsize=4096)
def _guests_in(sql: str, keys: tuple[tuple[str, str], ...]) -> tuple[str, ...]:
    import sqlglot
    from sqlglot import exp

    by_table = {_short(t): col for t, col in keys}
    try:
        trees = sqlglot.parse(sql, read="postgres")
    except Exception:  # noqa: BLE001 - an unparsable (redacted) statement names no guest we can read
        return ()
    found: list[str] = []
    for tree in trees:
        if tree is None:
            continue
        aliases: dict[str, str] = {}
        for t in tree.find_all(exp.Table):
            aliases[t.alias_or_name] = t.name
            aliases[t.name] = t.name
        only = next(iter(set(aliases.values()))) if len(set(aliases.values())) == 1 else None

        def keyed(col: exp.Expression) -> bool:
            if not isinstance(col, exp.Column):
                return False
            table = aliases.get(col.table) if col.table else only
            if table is not None:
                return by_table.get(table) == col.name
            return col.name in by_table.values() and col.name != "id"

        def literal(e: exp.Expression) -> str | None:
            if isinstance(e, exp.Cast):
                e = e.this
            return str(e.this) if isinstance(e, exp.Literal) else None

        for node in tree.find_all(exp.EQ, exp.In):
            if isinstance(node, exp.EQ):
                for col, val in ((node.this, node.expression), (node.expression, node.this)):
                    v = literal(val)
                    if keyed(col) and v is not None:
                        found.append(v)
            elif keyed(node.this):
                found.extend(v for v in (literal(x) for x in node.expressions) if v is not None)
    return tuple(dict.fromkeys(found))


def guests_of(ev: Mapping[str, Any], keys: SubjectKeys) -> tuple[str, ...]:
    """The guests (subject key values) a statement event looked up."""
    named = ev.get("guests")
    if isinstance(named, list):
        return tuple(str(g) for g in named)
    guard = ev.get("guard")
    if isinstance(guard, dict) and isinstance(guard.get("lookups"), dict):
        return tuple(str(g) for g in guard["lookups"])  # counted by the lookup quota, Bind parameters included
    sql = ev.get("statement")
    if ev.get("event") != "statement" or not isinstance(sql, str) or not keys:
        return ()
    tables = ev.get("tables")
    if isinstance(tables, list) and not any(t in keys for t in tables):
        return ()
    return _guests_in(sql, tuple(sorted(keys.items())))


@dataclass(frozen=True)
class Filters:
    user: str | None = None
    role: str | None = None
    guest: str | None = None
    table: str | None = None
    decision: str | None = None
    ticket: str | None = None
    receipt: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    event: str | None = None
    value: str | None = None  # a literal value searched for (see value_hash)
    value_hash: str | None = None  # rules.redact.value_hash(key, value), when the key is known


def matches(ev: Mapping[str, Any], f: Filters, keys: SubjectKeys = {}) -> bool:  # noqa: B006 - read only
    """Does one event pass every filter given?"""
    if f.user is not None and ev.get("user") != f.user:
        return False
    if f.role is not None and ev.get("role") != f.role:
        return False
    if f.event is not None and ev.get("event") != f.event:
        return False
    if f.receipt is not None and ev.get("receipt") != f.receipt:
        return False
    if f.ticket is not None and ev.get("ticket") != f.ticket:
        return False
    if f.decision is not None and decision_of(ev) != f.decision:
        return False
    if f.table is not None:
        tables = ev.get("tables") or []
        if f.table not in tables and f.table not in {_short(t) for t in tables}:
            return False
    if f.since is not None or f.until is not None:
        t = event_time(ev)
        if t is None or (f.since is not None and t < f.since) or (f.until is not None and t >= f.until):
            return False
    if f.guest is not None and f.guest not in guests_of(ev, keys):
        return False
    if f.value is not None and not has_value(ev, f.value, f.value_hash):
        return False
    return True


def has_value(ev: Mapping[str, Any], value: str, digest: str | None) -> bool:
    """Did this statement search for ``value``: its redacted literals' hashes, or the value as a literal in clear?"""
    hashes = ev.get("value_hashes")
    if digest is not None and isinstance(hashes, list) and digest in hashes:
        return True
    text = ev.get("statement")
    if not isinstance(text, str) or not value:
        return False
    quoted = "'" + value.replace("'", "''") + "'"
    if quoted in text:
        return True
    return bool(re.fullmatch(r"-?\d+(\.\d+)?", value)) and re.search(rf"(?<![\w.']){re.escape(value)}(?![\w.'])",
                                                                   text) is not None


def search(events: Iterable[dict[str, Any]], f: Filters, keys: SubjectKeys = {}) -> Iterator[dict[str, Any]]:  # noqa: B006
    return (ev for ev in events if matches(ev, f, keys))


TABLE_COLUMNS = (("time", 26), ("user", 10), ("role", 16), ("decision", 8), ("rows", 6), ("receipt", 18),
                 ("statement", 0))


def table_row(ev: Mapping[str, Any]) -> str:
    """One readable line per event (the statement last, untruncated)."""
    vals = {
        "time": str(ev.get("time", ""))[:26], "user": str(ev.get("user") or "-"),
        "role": str(ev.get("role") or "-"), "decision": decision_of(ev) or str(ev.get("event", "")),
        "rows": "" if ev.get("rows") is None else str(ev.get("rows")), "receipt": str(ev.get("receipt") or ""),
        "statement": str(ev.get("statement") or ev.get("error") or ev.get("reason") or ""),
    }
    return "  ".join(vals[k].ljust(w) if w else vals[k] for k, w in TABLE_COLUMNS).rstrip()


def table_header() -> str:
    return "  ".join(k.ljust(w) if w else k for k, w in TABLE_COLUMNS)
