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

import re
from collections.abc import Iterator, Sequence
from decimal import Decimal, InvalidOperation
from dataclasses import dataclass
from typing import Any

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError

from .catalog import Catalog, normalise_identifier
from .grants import StatementGrants

DIALECT = "postgres"

#: The name any DECLARE gives its cursor, as written (however the rest of it is spelled).
DECLARE_NAME = re.compile(r"\s*DECLARE\s+(\"(?:[^\"]|\"\")+\"|[A-Za-z_][A-Za-z0-9_$]*)\s", re.IGNORECASE)
#: DECLARE name [options] CURSOR [WITH[OUT] HOLD] FOR query: (name as written, query).
DECLARE = re.compile(
    r"\s*(?:/\*.*?\*/\s*)*DECLARE\s+(\"(?:[^\"]|\"\")+\"|[A-Za-z_][A-Za-z0-9_$]*)\s+"
    r"(?:(?:BINARY|ASENSITIVE|INSENSITIVE|NO\s+SCROLL|SCROLL)\s+)*"
    r"CURSOR\s+(?:(?:WITH|WITHOUT)\s+HOLD\s+)?FOR\s+(.*)", re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True, slots=True)
class Lookup:
    """One guest a statement looks up: ``value`` is the key as text, or a parameter number."""

    table: str
    value: str | None = None
    param: int | None = None
    integer: bool = True  # the key is a number: '+03', ' 3' and 3.0 are all guest 3


_INTEGER_TYPES = ("bigint", "integer", "smallint", "numeric", "int8", "int4", "int2")


def canonical_key(value: str, integer: bool) -> str:
    """The guest a value names, as PostgreSQL would read it against the key column."""
    if not integer:
        return value
    text = value.strip()
    try:
        d = Decimal(text)
    except InvalidOperation:
        return value  # not a number: PostgreSQL refuses it for a numeric key
    if d.is_finite() and d == d.to_integral_value():
        return str(int(d))
    return text


class UnclearLookup(Exception):
    """A predicate constrains the subject key in a shape that cannot be counted."""


def find_lookups(sql: str, grants: StatementGrants, catalog: Catalog,
                 search_path: Sequence[str] | None = None) -> tuple[Lookup, ...]:
    """Every guest lookup in ``sql`` (deduplicated), or UnclearLookup."""
    keyed = {t: g.subject_key for t, g in grants.tables.items() if g.subject_key}
    if not keyed:
        return ()
    m = DECLARE.match(sql)
    if m is not None:
        sql = m.group(2)  # a cursor's query is read like any other (its FETCHes return its rows)
    try:
        trees = [t for t in sqlglot.parse(sql, read=DIALECT) if t is not None]
    except SqlglotError:
        raise UnclearLookup("a statement pgwarden cannot read for lookups") from None
    ctx = _Analysis(keyed, catalog, search_path)
    out: dict[Lookup, None] = {}
    for tree in trees:
        if isinstance(tree, exp.Command):
            raise UnclearLookup(f"{tree.name.upper()} of a query (prepare it through the protocol instead)")
        ctx.ctes = {c.alias_or_name.lower() for c in tree.find_all(exp.CTE)}
        for scope in tree.find_all(exp.Select, exp.Update, exp.Delete):
            for lk in ctx.scope_lookups(scope):
                out[lk] = None
    return tuple(out)


@dataclass(frozen=True)
class _Source:
    """One FROM item of a scope: a protected table with a subject key, another table, or derived rows."""

    kind: str  # "keyed" | "plain" | "derived"
    key: str = ""
    integer: bool = True
    rel: Any = None


class _Analysis:
    """Reads each SELECT/UPDATE/DELETE scope of a statement for guest keys (fail closed)."""

    def __init__(self, keyed: dict[str, str], catalog: Catalog, search_path: Sequence[str] | None) -> None:
        self.keyed = keyed
        self.keys = frozenset(keyed.values())  # subject key column names of this role's tables
        self.catalog = catalog
        self.search_path = search_path
        self.ctes: set[str] = set()

    # --- what a scope reads from -------------------------------------------------------------

    def _sources(self, scope: exp.Expression) -> dict[str, _Source]:
        items: list[exp.Expression] = []
        if isinstance(scope, (exp.Update, exp.Delete)):
            items.append(scope.this)
            items.extend(scope.args.get("using") or [])
        from_ = scope.args.get("from_")
        if from_ is not None:
            items.append(from_.this)
        for j in scope.args.get("joins") or []:
            items.append(j.this)
        out: dict[str, _Source] = {}
        for it in items:
            alias = normalise_identifier(it.alias_or_name, False) if it.alias_or_name else f"?{len(out)}"
            out[alias] = self._source(it)
        return out

    def _source(self, it: exp.Expression) -> _Source:
        if not isinstance(it, exp.Table) or (not it.db and it.name.lower() in self.ctes):
            return _Source("derived")
        parts = tuple(normalise_identifier(p, False) for p in (it.catalog, it.db, it.name) if p)
        rel = self.catalog.resolve(parts, self.search_path)
        if rel is None:
            return _Source("derived")
        root = self.catalog.root_of(rel).qualified_name
        key = self.keyed.get(root) or self.keyed.get(rel.qualified_name)
        if key is None:
            return _Source("plain", rel=rel)
        col = rel.column(key)
        integer = col is not None and col.type_name.split("(")[0] in _INTEGER_TYPES
        return _Source("keyed", key=key, integer=integer, rel=rel)

    def _is_subject(self, col: exp.Column, sources: dict[str, _Source]) -> bool:
        """Could this column be a guest key? (Unknown lineage counts as yes, when the name fits.)"""
        name = normalise_identifier(col.name, bool(col.this.args.get("quoted")) if isinstance(col.this, exp.Identifier)
                                    else False)
        if col.table:
            src = sources.get(normalise_identifier(col.table, False))
            if src is None or src.kind == "derived":
                return name in self.keys  # an outer reference, a CTE or a derived table: by name
            return src.kind == "keyed" and name == src.key
        owners = [s for s in sources.values()
                  if s.kind == "derived" or (s.rel is not None and s.rel.column(name) is not None)]
        if not owners:
            return name in self.keys  # no FROM item has it: a reference to an outer query
        return any((s.kind == "keyed" and name == s.key) or (s.kind == "derived" and name in self.keys)
                   for s in owners)

    # --- one scope ----------------------------------------------------------------------------

    def scope_lookups(self, scope: exp.Expression) -> Iterator[Lookup]:
        sources = self._sources(scope)
        integer = all(s.integer for s in sources.values() if s.kind == "keyed") if sources else True
        classes = _Classes()
        bound: dict[str, list[tuple[str | None, int | None]]] = {}
        subjects: set[str] = set()
        allowed: set[int] = set()  # ids of subject columns in a recognised place
        for cond in _conditions(scope):
            for conj in _conjuncts(cond):
                self._read(conj, sources, classes, bound, subjects, allowed)
        for col in _own_columns(scope):
            if not self._is_subject(col, sources):
                continue
            if id(col) in allowed or _bare_position(col, scope):
                continue
            raise UnclearLookup(col.sql(dialect=DIALECT))
        roots = {classes.find(x) for x in subjects}
        for member, values in bound.items():
            if classes.find(member) in roots:
                for value, param in values:
                    yield Lookup("", None if value is None else canonical_key(value, integer), param, integer)

    def _ident(self, col: exp.Column, sources: dict[str, _Source]) -> str:
        q = normalise_identifier(col.table, False) if col.table else "?"
        return f"{q}.{normalise_identifier(col.name, False)}"

    def _read(self, conj: exp.Expression, sources: dict[str, _Source], classes: _Classes,
              bound: dict[str, list[tuple[str | None, int | None]]], subjects: set[str], allowed: set[int]) -> None:
        """Record what one WHERE/ON conjunct says about guest keys (unrecognised shapes are left alone:
        their subject columns are then found outside a recognised place, and the statement refused)."""
        while isinstance(conj, exp.Paren):
            conj = conj.this

        def note(col: exp.Column) -> str:
            ident = self._ident(col, sources)
            if self._is_subject(col, sources):
                subjects.add(ident)
                allowed.add(id(col))
            return ident

        if isinstance(conj, exp.EQ):
            left, right = _unparen(conj.this), _unparen(conj.expression)
            for a, b in ((left, right), (right, left)):
                if not isinstance(a, exp.Column):
                    continue
                if isinstance(b, exp.Column):
                    if self._derived_side(a, sources) or self._derived_side(b, sources):
                        return  # a key joined to rows the statement made up itself: not counted, refused
                    classes.union(note(a), note(b))
                    return
                c = _constant(b)
                if c is not None:
                    bound.setdefault(note(a), []).append(c)
                    return
                if isinstance(b, exp.Subquery) and self._keyed_subquery(b):
                    note(a)
                    return
        elif isinstance(conj, exp.In) and isinstance(_unparen(conj.this), exp.Column):
            col = _unparen(conj.this)
            query = conj.args.get("query")
            if query is not None:
                if self._keyed_subquery(query):
                    note(col)
                return
            values = [_constant(v) for v in conj.expressions]
            if values and all(v is not None for v in values):
                bound.setdefault(note(col), []).extend(v for v in values if v is not None)
            return
        elif isinstance(conj, exp.Or):
            items = [_unparen(i) for i in _disjuncts(conj)]
            if items and all(isinstance(i, exp.EQ) and isinstance(_unparen(i.this), exp.Column)
                             and _constant(i.expression) is not None for i in items):
                idents = {self._ident(_unparen(i.this), sources) for i in items}
                if len(idents) == 1:
                    for i in items:
                        c = _constant(i.expression)
                        assert c is not None
                        bound.setdefault(note(_unparen(i.this)), []).append(c)
            return
        elif isinstance(conj, exp.Is) or (isinstance(conj, exp.Not) and isinstance(conj.this, exp.Is)):
            is_ = conj if isinstance(conj, exp.Is) else conj.this
            if isinstance(is_.this, exp.Column) and isinstance(is_.expression, exp.Null):
                note(is_.this)  # IS [NOT] NULL looks nobody up

    def _derived_side(self, col: exp.Column, sources: dict[str, _Source]) -> bool:
        if not col.table:
            return False
        src = sources.get(normalise_identifier(col.table, False))
        return src is not None and src.kind == "derived" and not self._is_subject(col, sources)

    def _keyed_subquery(self, sub: exp.Expression) -> bool:
        """``key IN (SELECT other_key FROM protected ...)``: fine, that scope is read on its own.
        Anything else on the right (``SELECT 3``, a VALUES list) would name guests uncounted."""
        select = sub.this if isinstance(sub, exp.Subquery) else sub
        if not isinstance(select, exp.Select) or len(select.expressions) != 1:
            return False
        item = select.expressions[0]
        item = item.this if isinstance(item, exp.Alias) else item
        if not isinstance(item, exp.Column):
            return False
        sources = self._sources(select)
        if not item.table:
            return any(s.kind == "keyed" and s.key == normalise_identifier(item.name, False) for s in sources.values())
        src = sources.get(normalise_identifier(item.table, False))
        return src is not None and src.kind == "keyed" and src.key == normalise_identifier(item.name, False)


def _unparen(e: exp.Expression) -> Any:
    while isinstance(e, exp.Paren):
        e = e.this
    return e


def _own_columns(scope: exp.Expression) -> Iterator[exp.Column]:
    """Columns of this scope, not of nested SELECTs (those are scopes of their own)."""
    for col in scope.find_all(exp.Column):
        owner = col.find_ancestor(exp.Select, exp.Update, exp.Delete)
        if owner is scope:
            yield col


def _bare_position(col: exp.Column, scope: exp.Expression) -> bool:
    """A key merely shown, grouped or sorted by: that looks nobody up."""
    parent = col.parent
    if isinstance(parent, exp.Alias):
        parent = parent.parent
    if parent is scope and col.arg_key == "expressions" or (isinstance(col.parent, exp.Alias)
                                                            and col.parent.arg_key == "expressions"
                                                            and col.parent.parent is scope):
        return True
    if isinstance(col.parent, exp.Group):
        return True
    if isinstance(col.parent, exp.Ordered) and isinstance(col.parent.parent, exp.Order):
        return True
    return False


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


def _flatten(e: exp.Expression, kind: type[exp.Expression]) -> Iterator[exp.Expression]:
    """The operands of a chain of ANDs (or ORs), parentheses dropped."""
    while isinstance(e, exp.Paren):
        e = e.this
    if isinstance(e, kind):
        yield from _flatten(e.this, kind)
        yield from _flatten(e.expression, kind)
    else:
        yield e


def _conjuncts(e: exp.Expression) -> Iterator[exp.Expression]:
    return _flatten(e, exp.And)


def _disjuncts(e: exp.Expression) -> Iterator[exp.Expression]:
    return _flatten(e, exp.Or)


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


def _constant(e: exp.Expression) -> tuple[str | None, int | None] | None:
    """A literal or a $n parameter (possibly cast): (text, None) or (None, n); else None."""
    cast = False
    while isinstance(e, (exp.Cast, exp.Paren)):
        cast = cast or isinstance(e, exp.Cast)
        e = e.this
    if isinstance(e, exp.Literal):
        v = e.this
        if cast and not canonical_key(v, True).lstrip("-").isdigit():
            # '3.7'::int is 4: a cast may round; which guest it names is not for pgwarden to guess.
            raise UnclearLookup(f"a cast of {v!r}")
        return v, None
    if isinstance(e, exp.Neg) and isinstance(e.this, exp.Literal) and not e.this.is_string:
        return f"-{e.this.this}", None
    if isinstance(e, exp.Parameter) and isinstance(e.this, exp.Literal) and not e.this.is_string:
        return None, int(e.this.this)
    if isinstance(e, exp.Placeholder):
        raise UnclearLookup("a placeholder")
    return None
