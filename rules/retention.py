"""Retention rules (R5.5, R2.6): how long each kind of row is kept, and the SQL that finds the rest.

Written in the rules file under ``retention:``, per table, as an ordered list::

    retention:
      public.cs_records:
        - {name: major complaints, when: "category = 'complaint' AND severity = 'major'", keep: 2 years}
        - {name: ordinary conversations, keep: 6 months}

The first rule whose ``when`` holds for a row decides how long it is kept (a
rule without ``when`` takes every row the rules above it did not), so
overlapping conditions can never shorten a longer period; a row no rule
takes is kept. Age is measured on the table's ``time_column`` (from
``tables:``, or ``time_column:`` here). Rows with the legal-hold column true
are never selected (``legal_hold: COLUMN``; by default a boolean
``legal_hold`` column, when the table has one). ``when`` is SQL the DBA
writes, like the ``sql:`` row conditions; it must parse as one condition.
Pure: parsing and SQL text only; ``proxy.retention`` runs it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .yamlfile import ConfigError, Located, load_yaml

_KEEP = re.compile(r"\s*(\d+)\s+(day|days|week|weeks|month|months|year|years)\s*")


@dataclass(frozen=True)
class RetentionRule:
    table: str  # qualified: public.cs_records
    name: str
    keep: str  # a PostgreSQL interval: "6 months"
    when: str | None
    earlier: tuple[str, ...]  # the ``when`` of the rules above it (rows they take are not this rule's)
    time_column: str
    legal_hold: str | None  # None: decided from the catalog (a boolean legal_hold column, if any)
    where: str  # file:line


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_table(qualified: str) -> str:
    schema, _, table = qualified.rpartition(".")
    return f"{quote_ident(schema or 'public')}.{quote_ident(table)}"


def _check_condition(sql: str, where: str) -> None:
    import sqlglot
    from sqlglot import exp

    try:
        trees = [t for t in sqlglot.parse(f"SELECT 1 WHERE {sql}", read="postgres") if t is not None]
    except Exception as exc:  # noqa: BLE001 - sqlglot raises several kinds; all mean "not a condition"
        raise ConfigError(f"{where}: when is not a SQL condition: {exc}") from None
    if len(trees) != 1 or not isinstance(trees[0], exp.Select) or any(
            n is not trees[0] for n in trees[0].find_all(exp.Select, exp.Subquery)):
        raise ConfigError(f"{where}: when must be one condition on the table's own columns, without subqueries")


def parse_retention(data: Any, loc: Located, tables: Mapping[str, Any]) -> tuple[RetentionRule, ...]:
    """The ``retention:`` section of a rules document (``tables``: its ``tables:`` section, for time columns)."""
    if data is None:
        return ()
    if not isinstance(data, dict):
        raise ConfigError(f"{loc.where('retention')}: retention must map tables to lists of rules")
    out: list[RetentionRule] = []
    for table, spec in data.items():
        path: tuple[Any, ...] = ("retention", table)
        where = loc.where(*path)
        if "." not in table:
            raise ConfigError(f"{where}: name the table with its schema, e.g. public.{table}")
        declared = tables.get(table)
        time_column = declared.get("time_column") if isinstance(declared, dict) else None
        legal_hold = None
        items = spec
        if isinstance(spec, dict):
            unknown = set(spec) - {"rules", "time_column", "legal_hold"}
            if unknown:
                raise ConfigError(f"{loc.where(*path, sorted(unknown)[0])}: unknown key {sorted(unknown)[0]!r} "
                                  "(expected rules, time_column, legal_hold)")
            time_column = spec.get("time_column", time_column)
            legal_hold = spec.get("legal_hold")
            items = spec.get("rules")
            path = path + ("rules",)
        if not isinstance(items, list) or not items:
            raise ConfigError(f"{loc.where(*path)}: retention of {table} needs a list of rules")
        if not time_column:
            raise ConfigError(f"{where}: {table} has no time_column (give it under tables: or here)")
        earlier: list[str] = []
        for i, r in enumerate(items):
            rw = loc.where(*path, i)
            if not isinstance(r, dict) or "keep" not in r:
                raise ConfigError(f"{rw}: a retention rule is {{keep: 6 months}} with optional when: and name:")
            unknown = set(r) - {"keep", "when", "name"}
            if unknown:
                raise ConfigError(f"{rw}: unknown key {sorted(unknown)[0]!r} (expected keep, when, name)")
            m = _KEEP.fullmatch(str(r["keep"]))
            if m is None:
                raise ConfigError(f"{rw}: keep must be like '6 months', '2 years', '90 days', not {r['keep']!r}")
            when = r.get("when")
            if when is not None:
                when = str(when)
                _check_condition(when, rw)
            if earlier and earlier[-1] == "":
                raise ConfigError(f"{rw}: unreachable: the rule above has no when: and takes every row left")
            out.append(RetentionRule(table=str(table), name=str(r.get("name") or f"rule {i + 1}"),
                                     keep=f"{m.group(1)} {m.group(2)}", when=when, earlier=tuple(earlier),
                                     time_column=str(time_column), legal_hold=legal_hold, where=rw))
            earlier.append(when or "")
    return tuple(out)


def condition(rule: RetentionRule, legal_hold: str | None) -> str:
    """Rows this rule removes, older than the cutoff given as $1 (timestamptz)."""
    parts = [f"{quote_ident(rule.time_column)} < $1"]
    if rule.when:
        parts.append(f"({rule.when})")
    parts.extend(f"(({w}) IS NOT TRUE)" for w in rule.earlier if w)
    if legal_hold:
        parts.append(f"{quote_ident(legal_hold)} IS NOT TRUE")
    return " AND ".join(parts)


def held_condition(rule: RetentionRule, legal_hold: str) -> str:
    """Rows this rule would remove but for their legal hold."""
    base = condition(rule, None)
    return f"{base} AND {quote_ident(legal_hold)} IS TRUE"


def count_sql(rule: RetentionRule, cond: str) -> str:
    return f"SELECT count(*) FROM {quote_table(rule.table)} WHERE {cond}"


def delete_batch_sql(rule: RetentionRule, cond: str) -> str:
    """Delete at most $2 rows (partitions included: rows are named by tableoid and ctid)."""
    t = quote_table(rule.table)
    return (f"DELETE FROM {t} WHERE (tableoid, ctid) IN "
            f"(SELECT tableoid, ctid FROM {t} WHERE {cond} LIMIT $2)")
