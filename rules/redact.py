"""Sensitive literals never reach the audit log in clear (R2.4).

A literal compared with a column the rules classify as sensitive (an ID
number typed into a WHERE clause, a phone in an IN list) is replaced, in the
copy of the statement that is logged, by the same mask the column gets. The
match is by column name across every classified table the statement could
mean: over-redacting a log line is cheap, a clear ID number in it is not.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlglot
from sqlglot import exp

_COMPARISONS = (exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE, exp.Like, exp.ILike, exp.Operator)


def sensitive_columns(tables: Mapping[str, Any]) -> dict[str, Any]:
    """column name -> mask spec, over every classified table (the first classification wins)."""
    out: dict[str, Any] = {}
    for t in tables.values():
        for col, spec in t.sensitive.items():
            out.setdefault(col.lower(), spec)
    return out


def mentions_sensitive(low_sql: str, sensitive: Mapping[str, Any]) -> bool:
    """Could this (lower-cased) statement name a sensitive column? U&"..." spells names in escapes."""
    return "u&" in low_sql or any(c in low_sql for c in sensitive)


def _masked(spec: Any, lit: exp.Literal) -> exp.Expression:
    try:
        from masking.kinds import mask_value

        value = mask_value(spec, lit.this)
    except Exception:  # noqa: BLE001 - a literal the mask cannot take is redacted completely
        value = "***"
    return exp.Literal.string("***" if value is None else str(value))


NOT_REDACTED = "<statement not parsed; not logged in clear>"


def redact(sql: str, sensitive: Mapping[str, Any]) -> str | None:
    """The statement with sensitive literals masked, or None when there is nothing to redact.

    Never raises: a statement that cannot be parsed or regenerated is not logged at all
    (a hostile text must not turn the audit path into a crash, nor into a clear log line).
    """
    low = sql.lower()
    if not sensitive or not mentions_sensitive(low, sensitive):
        return None
    try:
        return _redact(sql, low, sensitive)
    except Exception:  # noqa: BLE001 - sqlglot fails in many ways on hostile text; fail closed
        return NOT_REDACTED


def _redact(sql: str, low: str, sensitive: Mapping[str, Any]) -> str | None:
    try:
        trees = sqlglot.parse(sql, read="postgres")
    except sqlglot.errors.SqlglotError:
        return NOT_REDACTED
    changed = False
    out = []
    if "u&" in low:
        # sqlglot reads U&"..." identifiers as a bitwise AND: names cannot be trusted, redact every literal.
        for tree in trees:
            if tree is None:
                continue
            for lit in list(tree.find_all(exp.Literal)):
                lit.replace(exp.Literal.string("***"))
            out.append(tree.sql(dialect="postgres"))
        return ";\n".join(out)
    for tree in trees:
        if tree is None:
            continue

        def fix(node: exp.Expression) -> exp.Expression:
            nonlocal changed
            if isinstance(node, _COMPARISONS + (exp.In,)):
                cols = [c for c in (node.this, node.args.get("expression")) if isinstance(c, exp.Column)]
                spec = next((sensitive[c.name.lower()] for c in cols if c.name.lower() in sensitive), None)
                if spec is None:
                    return node
                for lit in node.find_all(exp.Literal):
                    if lit.is_string or lit.is_number:
                        lit.replace(_masked(spec, lit))
                        changed = True
            return node

        out.append(tree.transform(fix).sql(dialect="postgres"))
    return ";\n".join(out) if changed else None
