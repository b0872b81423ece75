"""Which guests a statement looks up (R3.4), read from its predicates; no I/O.

A lookup is a predicate that pins a protected table's subject key (``guest_id``) to
values: ``= literal``, ``= $n``, ``IN (...)`` of those, an OR of such equalities, or
the same through a join (``c.guest_id = g.id AND g.id = 42``). Values reached through
parameters are named by their number and counted at Bind, with the real values.

For a role with a lookup quota, any other predicate on the subject key (arithmetic,
casts, ranges, functions, LIKE, ``= ANY($1)``) could hide a lookup from the count, so
the statement is refused with a message that says how to write it. A key compared
with another column or a subquery is not a lookup by itself: the other side's own
table is analysed where it appears.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError

from .catalog import Catalog, normalise_identifier
from .grants import StatementGrants

DIALECT = "postgres"


@dataclass(frozen=True, slots=True)
class Lookup:
    """One guest a statement looks up: ``value`` is the key as text, or a parameter number."""

    table: str
    value: str | None = None
    param: int | None = None


class UnclearLookup(Exception):
    """A predicate constrains the subject key in a shape that cannot be counted."""


def find_lookups(sql: str, grants: StatementGrants, catalog: Catalog,
                 search_path: Sequence[str] | None = None) -> tuple[Lookup, ...]:
    """Every guest lookup in ``sql`` (deduplicated), or UnclearLookup."""
    keyed = {t: g.subject_key for t, g in grants.tables.items() if g.subject_key}
    if not keyed:
        return ()
    try:
        trees = [t for t in sqlglot.parse(sql, read=DIALECT) if t is not None]
    except SqlglotError:
        return ()  # the rewriter decides what it cannot parse; nothing to count here
    out: dict[Lookup, None] = {}
    for tree in trees:
        ctes = {c.alias_or_name.lower() for c in tree.find_all(exp.CTE)}
        for select in tree.find_all(exp.Select):
            for lk in _select_lookups(select, keyed, catalog, search_path, ctes):
                out[lk] = None
        for node in tree.find_all(exp.Update, exp.Delete):
            for lk in _select_lookups(node, keyed, catalog, search_path, ctes):
                out[lk] = None
    return tuple(out)


def _own_tables(scope: exp.Expression) -> Iterator[exp.Table]:
    """Tables in this SELECT's own FROM/JOIN (not in nested subqueries)."""
    for t in scope.find_all(exp.Table):
        owner = t.find_ancestor(exp.Select, exp.Update, exp.Delete)
        if owner is scope:
            yield t


def _select_lookups(scope: exp.Expression, keyed: dict[str, str], catalog: Catalog,
                    search_path: Sequence[str] | None, ctes: set[str]) -> Iterator[Lookup]:
    keys: dict[str, tuple[str, str]] = {}  # qualifier -> (table, subject key column)
    for t in _own_tables(scope):
        if not t.db and t.name.lower() in ctes:
            continue
        parts = tuple(p for p in (t.catalog, t.db, t.name) if p)
        rel = catalog.resolve(tuple(normalise_identifier(p, False) for p in parts), search_path)
        if rel is None:
            continue
        root = catalog.root_of(rel).qualified_name
        key = keyed.get(root) or keyed.get(rel.qualified_name)
        if key is None:
            continue
        qual = t.alias_or_name
        keys[normalise_identifier(qual, False)] = (root if root in keyed else rel.qualified_name, key)
    if not keys:
        return
    conds = _conditions(scope)
    classes = _Classes()
    bound: dict[str, list[tuple[str | None, int | None]]] = {}
    for c in conds:
        for conj in _conjuncts(c):
            _read(conj, keys, classes, bound)
    for qual, (table, key) in keys.items():
        col = classes.find(f"{qual}.{key}")
        for member, values in bound.items():
            if classes.find(member) == col:
                for value, param in values:
                    yield Lookup(table, value, param)


def _conditions(scope: exp.Expression) -> list[exp.Expression]:
    out = []
    where = scope.args.get("where")
    if where is not None:
        out.append(where.this)
    for j in scope.args.get("joins") or []:
        on = j.args.get("on")
        if on is not None:
            out.append(on)
    return out


def _conjuncts(e: exp.Expression) -> Iterator[exp.Expression]:
    while isinstance(e, exp.Paren):
        e = e.this
    if isinstance(e, exp.And):
        yield from _conjuncts(e.this)
        yield from _conjuncts(e.expression)
    else:
        yield e


class _Classes:
    """Columns joined by equality are one class: a value bound to one binds them all."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        while self.parent.get(x, x) != x:
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[ra] = rb


def _column_key(col: exp.Column, keys: dict[str, tuple[str, str]]) -> str | None:
    """'qualifier.column' for a column of this scope (unqualified: the only table that has it)."""
    name = normalise_identifier(col.name, bool(col.this.args.get("quoted")) if isinstance(col.this, exp.Identifier)
                                else False)
    if col.table:
        return f"{normalise_identifier(col.table, False)}.{name}"
    owners = [q for q, (_, k) in keys.items() if k == name]
    return f"{owners[0]}.{name}" if len(owners) == 1 else f"?.{name}"


def _constant(e: exp.Expression) -> tuple[str | None, int | None] | None:
    """A literal or a $n parameter (possibly cast): (text, None) or (None, n); else None."""
    while isinstance(e, (exp.Cast, exp.Paren)):
        e = e.this
    if isinstance(e, exp.Literal):
        v = e.this
        if not e.is_string:
            try:
                return str(int(v)), None
            except ValueError:
                return v, None
        return (str(int(v)) if v.strip().lstrip("-").isdigit() else v), None
    if isinstance(e, exp.Parameter) and isinstance(e.this, exp.Literal) and not e.this.is_string:
        return None, int(e.this.this)
    if isinstance(e, exp.Placeholder):
        raise UnclearLookup("a placeholder")
    return None


def _read(conj: exp.Expression, keys: dict[str, tuple[str, str]], classes: _Classes,
          bound: dict[str, list[tuple[str | None, int | None]]]) -> None:
    """Record what one conjunct says about columns; UnclearLookup if it hides a subject key."""
    if isinstance(conj, exp.EQ):
        left, right = conj.this, conj.expression
        for a, b in ((left, right), (right, left)):
            if isinstance(a, exp.Column):
                if isinstance(b, exp.Column):
                    ka, kb = _column_key(a, keys), _column_key(b, keys)
                    if ka and kb:
                        classes.union(ka, kb)
                    return
                c = _constant(b)
                if c is not None:
                    k = _column_key(a, keys)
                    if k:
                        bound.setdefault(k, []).append(c)
                    return
                if isinstance(b, exp.Subquery):
                    return
    elif isinstance(conj, exp.In) and isinstance(conj.this, exp.Column):
        if conj.args.get("query") is not None:
            return
        values = [_constant(v) for v in conj.expressions]
        if values and all(v is not None for v in values):
            k = _column_key(conj.this, keys)
            if k:
                bound.setdefault(k, []).extend(v for v in values if v is not None)
            return
    elif isinstance(conj, exp.Or):
        items = list(_disjuncts(conj))
        cols = {(_column_key(i.this, keys) if isinstance(i, exp.EQ) and isinstance(i.this, exp.Column) else None)
                for i in items}
        if len(cols) == 1 and None not in cols and all(_constant(i.expression) is not None for i in items):
            (k,) = cols
            assert k is not None
            bound.setdefault(k, []).extend(v for i in items if (v := _constant(i.expression)) is not None)
            return
    elif isinstance(conj, exp.Is) or (isinstance(conj, exp.Not) and isinstance(conj.this, exp.Is)):
        return  # IS [NOT] NULL looks nobody up
    # Anything else: fine unless it involves a subject key column of this scope.
    subject = {k for _, k in keys.values()}
    for col in conj.find_all(exp.Column):
        if normalise_identifier(col.name, False) not in subject or _below_subquery(col, conj):
            continue
        k = _column_key(col, keys)
        if k is not None and (k.startswith("?.") or k.split(".", 1)[0] in keys):
            raise UnclearLookup(col.sql(dialect=DIALECT))


def _below_subquery(node: exp.Expression, top: exp.Expression) -> bool:
    p = node.parent
    while p is not None and p is not top:
        if isinstance(p, (exp.Subquery, exp.Select)):
            return True
        p = p.parent
    return False


def _disjuncts(e: exp.Expression) -> Iterator[exp.Expression]:
    while isinstance(e, exp.Paren):
        e = e.this
    if isinstance(e, exp.Or):
        yield from _disjuncts(e.this)
        yield from _disjuncts(e.expression)
    else:
        yield e
