"""``pgwarden check``: the rules against the live catalog, every problem with its file:line.

Loading already refuses what is wrong in the YAML itself; this adds what only
the database can tell: a table or column that does not exist, a time column
that is not a time, a mask that cannot mask the column's type.
"""

from __future__ import annotations

from typing import Any

from .catalog import Catalog, split_qualified
from .model import Rules, TableRules

TIME_TYPES = ("timestamp with time zone", "timestamp without time zone", "date")


def _relation(cat: Catalog, name: str) -> Any:
    parts = split_qualified(name)
    return cat.resolve(list(parts), ["public"])


def _mask_problem(spec: Any, type_name: str) -> str | None:
    from masking.kinds import can_mask

    if not can_mask(spec, type_name):
        return f"mask {getattr(spec, 'kind', spec)} cannot mask a column of type {type_name}"
    return None


def check_rules(rules: Rules, cat: Catalog) -> list[str]:
    """Every problem found, as 'file:line: message' strings (empty: the rules fit the database)."""
    problems: list[str] = []
    tables: dict[str, Any] = {}
    for name, t in rules.tables.items():
        rel = _relation(cat, name)
        if rel is None:
            problems.append(f"{t.line}: table {name} does not exist in database {cat.database!r}")
            continue
        tables[name] = rel
        problems += _check_table(t, rel)
    for role in rules.roles.values():
        for tname, g in role.grants.items():
            rel = tables.get(tname)
            if rel is None:
                continue
            named = set(g.hide) | set(g.masks) | (set(g.unmask) if g.unmask is not None else set())
            for c in g.rows:
                if c.kind == "column":
                    named.add(str(c.args["name"]))
                elif c.kind == "owned_through":
                    named.add(str(c.args["key"]))
            for col in sorted(named):
                if rel.column(col) is None:
                    problems.append(f"{g.where}: role {role.name}: column {col!r} does not exist in {tname}")
            for col, kind in g.masks.items():
                column = rel.column(col)
                if column is not None and (p := _mask_problem(kind, column.type_name)):
                    problems.append(f"{g.where}: role {role.name}: {tname}.{col}: {p}")
    return problems


def _check_table(t: TableRules, rel: Any) -> list[str]:
    out = []
    for label, col in (("subject_key", t.subject_key), ("record_key", t.record_key), ("time_column", t.time_column),
                       ("department_column", t.department_column)):
        if col and rel.column(col) is None:
            out.append(f"{t.line}: {label} {col!r} does not exist in {t.name}")
    if t.time_column and (c := rel.column(t.time_column)) is not None and c.type_name not in TIME_TYPES:
        out.append(f"{t.line}: time_column {t.time_column!r} of {t.name} is {c.type_name}, not a timestamp or date")
    for col, kind in t.sensitive.items():
        c = rel.column(col)
        if c is None:
            out.append(f"{t.line}: sensitive column {col!r} does not exist in {t.name}")
        elif p := _mask_problem(kind, c.type_name):
            out.append(f"{t.line}: {t.name}.{col}: {p}")
    return out
