"""Column lineage: what each value in a statement is made of, whatever it is called.

Theory of operation
-------------------
Three guards and the audit log need the *meaning* of a column reference, not
its spelling: the lookup quota (is this value exactly a guest key? R3.4), the
row cap (how many protected records can one result row carry? R3.2/R3.3), the
redaction of logged literals (is this literal compared with a sensitive
column? R2.4) and the audit event's ``masked`` field (which columns did the
statement read? R5.1). A name tells none of these: ``x2`` is ``guest_id``
under ``cs_records AS c(x1, x2)``, ``g`` is ``guest_id`` under
``(SELECT guest_id AS g ...) t``, ``guest_id`` is the constant 3635 under
``JOIN (SELECT 3635 AS guest_id) v USING (guest_id)``.

:class:`Lineage` walks one sqlglot tree once with PostgreSQL's scoping rules
(CTE visibility, aliases hiding table names, alias column lists renaming by
position, USING/NATURAL merging, LATERAL and correlated references, a column
name before a whole-row reference) and gives every value an :class:`Info`:

``reads``  the base-table columns it depends on, per table *instance*
           (one per table reference; a CTE referenced twice gives two);
``slots``  the protected records it can carry out: one per protected
           instance, renewed at every point that brings another row's
           values in (a scalar subquery, an aggregate, a window function);
``terms``  when the value *is* a column, a constant or a parameter (through
           renames, derived tables, CTEs, set operations), what it is;
           empty when it is computed from something;
``lits``   the literals whose values flow into it (also from derived tables);
``exact``  False when a name could not be resolved with certainty: users
           then take the union of everything it could be, and guards that
           need certainty refuse.

Whatever this module cannot follow it answers conservatively: an unknown
source makes every name it might hold resolve to it (``exact`` False), a
function's output depends on all of its arguments, and a construct that packs
any number of rows into one value is ``unbounded``. Pure; no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from sqlglot import exp

from .catalog import Catalog, Relation, normalise_identifier

__all__ = ["Info", "Base", "Lineage", "PACKING_AGGREGATES", "NO_RECORD_AGGREGATES"]

Inst = tuple[int, ...]  # a table reference; a CTE reference prefixes its node id
Term = tuple[Any, ...]  # ("col", inst, name) | ("const", literal id, text, is_string, cast) | ("param", n)
Slot = tuple[int, ...]

#: Aggregates that put many rows' values into one result value (sqlglot's names for some of them):
#: what they return is unbounded in records, so roles with a row cap may not call them.
PACKING_AGGREGATES = frozenset({
    "array_agg", "group_concat", "string_agg", "j_s_o_n_array_agg", "json_agg", "jsonb_agg", "json_agg_strict",
    "jsonb_agg_strict", "j_s_o_n_object_agg", "json_object_agg", "j_s_o_n_b_object_agg", "jsonb_object_agg",
    "json_object_agg_strict", "jsonb_object_agg_strict", "json_object_agg_unique", "jsonb_object_agg_unique",
    "json_object_agg_unique_strict", "jsonb_object_agg_unique_strict",
    "xmlagg", "j_s_o_n_arrayagg", "json_arrayagg", "json_objectagg", "range_agg", "range_intersect_agg",
    "array_concat_agg", "array_union_agg",
})
#: Aggregates and window functions whose value is a count, a rank or a truth value: no record's
#: values come out of them (an oracle of a bit, not an export).
NO_RECORD_AGGREGATES = frozenset({
    "count", "count_if", "countif", "bool_and", "bool_or", "every", "logical_and", "logical_or", "regr_count",
    "row_number", "rank", "dense_rank", "percent_rank", "cume_dist", "ntile",
})


@dataclass(frozen=True, slots=True)
class Info:
    """What one value is made of (see the module docstring)."""

    reads: frozenset[tuple[Inst, str]] = frozenset()
    slots: frozenset[Slot] = frozenset()
    terms: frozenset[Term] = frozenset()
    lits: frozenset[int] = frozenset()
    pure: bool = False  # terms non-empty and every alternative is exactly one of them
    exact: bool = True
    unbounded: bool = False

    def fresh(self, node: exp.Expression) -> Info:
        """The same value taken from another row (a subquery, an aggregate): new record slots."""
        return replace(self, slots=frozenset((id(node), *s) for s in self.slots))


EMPTY = Info()


def combine(infos: Iterable[Info]) -> Info:
    """A value computed from all of ``infos``."""
    reads: set[tuple[Inst, str]] = set()
    slots: set[Slot] = set()
    lits: set[int] = set()
    exact, unbounded = True, False
    for i in infos:
        reads |= i.reads
        slots |= i.slots
        lits |= i.lits
        exact = exact and i.exact
        unbounded = unbounded or i.unbounded
    return Info(frozenset(reads), frozenset(slots), frozenset(), frozenset(lits), False, exact, unbounded)


def either(infos: Sequence[Info], *, exact: bool = True) -> Info:
    """A value that is one of ``infos`` (set operation arms, an ambiguous name)."""
    if len(infos) == 1 and exact:
        return infos[0]
    base = combine(infos)
    terms = frozenset(t for i in infos for t in i.terms)
    pure = bool(infos) and all(i.pure for i in infos)
    return replace(base, terms=terms, pure=pure, exact=base.exact and exact)


@dataclass(frozen=True, slots=True)
class Base:
    """One base-table reference: the relation (None if the catalog does not know it) and how it was named."""

    node: exp.Table
    rel: Relation | None
    written: str  # the table name as written, normalised (for name-based fallbacks)
    protected: bool


@dataclass
class Source:
    """One FROM item as its query block sees it."""

    refname: str | None  # what a qualifier may say: the alias, else the table's own name
    schema: str | None  # an unaliased table's schema (for ``schema.table.column``)
    columns: list[tuple[str, Info]] | None  # None: not known (the source may have any column)
    opaque: Info = EMPTY  # what any column of an unknown source could be
    base: Inst | None = None  # a base table (or a CTE reference to one: prefixed)

    def column(self, name: str) -> Info | None:
        if self.columns is None:
            return None
        hits = [i for n, i in self.columns if n == name]
        if not hits:
            return None
        return hits[0] if len(hits) == 1 else either(hits, exact=False)

    def whole(self) -> Info:
        if self.columns is None:
            return self.opaque
        return combine(i for _, i in self.columns)


@dataclass
class Scope:
    """One query block (SELECT, UPDATE, DELETE, INSERT's RETURNING, a set operation's ORDER BY)."""

    node: exp.Expression
    parent: Scope | None
    ctes: dict[str, Any]
    sources: list[Source] = field(default_factory=list)
    merged: dict[str, Info] = field(default_factory=dict)  # USING / NATURAL join columns
    outputs: list[tuple[str, Info]] | None = None  # the select list (ORDER BY may name it)
    #: Equalities the FROM clause states (USING, NATURAL): (left, right, the join node).
    equalities: list[tuple[Info, Info, exp.Expression]] = field(default_factory=list)
    unclear_joins: list[exp.Expression] = field(default_factory=list)  # NATURAL over unknown columns


@dataclass
class _Cte:
    name: str
    node: exp.Expression  # the CTE's query
    columns: list[str] | None  # the alias column list
    outputs: list[tuple[str, Info]] | None = None
    busy: bool = False  # being analysed (a recursive reference)


_BLOCKS = (exp.Select, exp.Update, exp.Delete, exp.Insert)
#: Block arguments that hold its sources (read when the block is built), not expressions over its rows.
_SOURCE_ARGS = frozenset({"from_", "from", "joins", "with_", "with", "this", "expression", "using", "alias",
                          "kind", "distinct_on_unused"})


def ident_name(ident: Any) -> str:
    """The folded name of an Identifier (or a plain string, unquoted)."""
    if isinstance(ident, exp.Identifier):
        return normalise_identifier(ident.this, bool(ident.args.get("quoted")))
    if isinstance(ident, str):
        return normalise_identifier(ident, False)
    if isinstance(ident, exp.ColumnDef) and isinstance(ident.this, exp.Identifier):
        return ident_name(ident.this)
    return ""


def _alias_parts(node: exp.Expression) -> tuple[str | None, list[str] | None]:
    alias = node.args.get("alias")
    if isinstance(alias, exp.TableAlias):
        name = ident_name(alias.this) if alias.this is not None else None
        cols = [ident_name(c) for c in alias.columns] if alias.columns else None
        return name or None, cols
    if isinstance(alias, exp.Identifier):
        return ident_name(alias), None
    return None, None


def _rename(columns: list[tuple[str, Info]], names: list[str] | None) -> list[tuple[str, Info]]:
    """An alias column list renames a source's columns by position; the rest keep their names."""
    if not names:
        return columns
    return [(names[i] if i < len(names) else n, info) for i, (n, info) in enumerate(columns)]


def _fresh_ref(info: Info, ref: int) -> Info:
    """A CTE's column as one reference of it sees it: its own table instances and record slots."""
    def inst(i: Inst) -> Inst:
        return (ref, *i)

    terms = frozenset(("col", inst(t[1]), t[2]) if t[0] == "col" else t for t in info.terms)
    return replace(info, reads=frozenset((inst(i), c) for i, c in info.reads),
                   slots=frozenset((ref, *s) for s in info.slots), terms=terms)


def output_name(e: exp.Expression) -> str:
    """The column name PostgreSQL gives a select item (FigureColname, the common cases)."""
    if isinstance(e, exp.Alias):
        return ident_name(e.args.get("alias"))
    while isinstance(e, exp.Paren):
        e = e.this
    if isinstance(e, exp.Column):
        return ident_name(e.this) if isinstance(e.this, exp.Identifier) else "?column?"
    if isinstance(e, exp.Dot) and isinstance(e.expression, exp.Identifier):
        return ident_name(e.expression)
    if isinstance(e, exp.Cast):
        inner = output_name(e.this)
        return inner if inner != "?column?" else (e.to.sql(dialect="postgres").lower() if e.to else inner)
    if isinstance(e, exp.Case):
        return "case"
    if isinstance(e, exp.Anonymous):
        return str(e.name).lower()
    if isinstance(e, exp.Func):
        return e.sql_name().lower()
    return "?column?"


class Lineage:
    """The lineage of every value in one statement tree (see the module docstring).

    ``protected(node, rel)``: is this table reference one whose records the row cap counts
    (the rewriter passes the references it fences)? Without a catalog, tables have unknown
    columns and every name resolves to all of them (name-based fallbacks still work).
    """

    def __init__(self, tree: exp.Expression, catalog: Catalog | None = None,
                 search_path: Sequence[str] | None = None,
                 protected: Callable[[exp.Table, Relation | None], bool] | None = None) -> None:
        self.tree = tree
        self.catalog = catalog
        self.search_path = search_path
        self._protected = protected or (lambda _n, _r: False)
        self.bases: dict[int, Base] = {}  # table node id -> base
        self.scopes: dict[int, Scope] = {}  # block node id -> its scope
        self.blocks: list[Scope] = []  # every query block, in the order analysed
        self._queries: dict[int, list[tuple[str, Info]] | None] = {}
        self._infos: dict[int, Info] = {}
        self._aggregate_cache: dict[str, bool] = {}
        self.top = self._statement(tree)
        self._complete()

    def _complete(self) -> None:
        """Read every expression of every block, so each nested subquery has its scope too."""
        done: set[int] = set()
        while True:
            pending = [(k, sc) for k, sc in list(self.scopes.items()) if k not in done]
            if not pending:
                return
            for k, sc in pending:
                done.add(k)
                for key, value in sc.node.args.items():
                    if key in _SOURCE_ARGS:
                        continue
                    for v in value if isinstance(value, list) else [value]:
                        if isinstance(v, exp.Expression) and not isinstance(v, (exp.Identifier, exp.TableAlias)):
                            self._info(v, sc)
                for j in sc.node.args.get("joins") or []:
                    on = j.args.get("on")
                    if isinstance(on, exp.Expression):
                        self._info(on, sc)

    # --- public lookups ---------------------------------------------------------------------------

    def base(self, inst: Inst) -> Base | None:
        return self.bases.get(inst[-1]) if inst else None

    def scope_of(self, node: exp.Expression) -> Scope | None:
        """The query block an expression node belongs to (its nearest enclosing block)."""
        p = node.parent
        while p is not None:
            s = self.scopes.get(id(p))
            if s is not None:
                return s
            p = p.parent
        return None

    def info(self, node: exp.Expression, scope: Scope | None = None) -> Info:
        """The lineage of one expression node (resolved in its own block unless ``scope`` is given)."""
        if scope is None:
            scope = self.scope_of(node)
        return self._info(node, scope)

    def outputs(self, query: exp.Expression) -> list[tuple[str, Info]] | None:
        """The output columns of a query node analysed in this statement (None: unknown)."""
        q = query.this if isinstance(query, exp.Subquery) and not query.args.get("alias") else query
        return self._queries.get(id(q), self._queries.get(id(query)))

    def protected_bases(self) -> list[Base]:
        return [b for b in self.bases.values() if b.protected]

    # --- statements and queries -----------------------------------------------------------------

    def _statement(self, tree: exp.Expression) -> list[tuple[str, Info]] | None:
        if isinstance(tree, (exp.Select, exp.SetOperation, exp.Values, exp.Subquery)):
            return self._query(tree, None, {})
        if isinstance(tree, (exp.Update, exp.Delete)):
            return self._dml(tree)
        if isinstance(tree, exp.Insert):
            return self._insert(tree)
        if isinstance(tree, exp.Copy) and isinstance(tree.this, exp.Subquery):
            return self._query(tree.this, None, {})
        return None

    def _with(self, node: exp.Expression, parent: Scope | None, ctes: dict[str, Any]) -> dict[str, Any]:
        """The CTEs visible inside ``node``: PostgreSQL's scoping (a CTE sees the earlier ones; all, if RECURSIVE)."""
        w = node.args.get("with_") or node.args.get("with")
        if not isinstance(w, exp.With):
            return ctes
        out = dict(ctes)
        recursive = bool(w.args.get("recursive"))
        defs = []
        for cte in w.expressions:
            name, cols = _alias_parts(cte)
            defs.append(_Cte(name or "", cte.this, cols))
        if recursive:
            for d in defs:
                out[d.name] = d
        for d in defs:
            d.busy = True  # a reference to itself (recursion) reads as unknown
            got = self._query(d.node, parent, out if recursive else dict(out))
            d.busy = False
            d.outputs = _rename(got, d.columns) if got is not None else None
            out[d.name] = d
        return out

    def _query(self, node: exp.Expression, parent: Scope | None,
               ctes: dict[str, Any]) -> list[tuple[str, Info]] | None:
        """Analyse a query (once); its output columns."""
        if id(node) in self._queries:
            return self._queries[id(node)]
        self._queries[id(node)] = None  # a cycle reads as unknown
        if isinstance(node, exp.Subquery):
            ctes = self._with(node, parent, ctes)
            out = self._query(node.this, parent, ctes)
        elif isinstance(node, exp.Select):
            out = self._select(node, parent, ctes)
        elif isinstance(node, exp.SetOperation):
            ctes = self._with(node, parent, ctes)
            left = self._query(node.this, parent, ctes)
            right = self._query(node.expression, parent, ctes)
            if left is None or right is None or len(left) != len(right):
                out = None
            else:
                out = [(n, either([a, b])) for (n, a), (_, b) in zip(left, right)]
            scope = Scope(node, parent, ctes, outputs=out)
            scope.sources.append(Source(None, None, out, opaque=combine(i for _, i in out or ())))
            self.scopes[id(node)] = scope
        elif isinstance(node, exp.Values):
            out = self._values(node, parent, ctes)
        elif isinstance(node, exp.Table) and isinstance(node.this, exp.Identifier):
            src = self._table_source(node, parent, ctes)  # TABLE t / a parenthesised join
            out = src.columns
        else:
            out = None
        self._queries[id(node)] = out
        return out

    def _values(self, node: exp.Values, parent: Scope | None, ctes: dict[str, Any]) -> list[tuple[str, Info]] | None:
        scope = Scope(node, parent, ctes)
        self.scopes[id(node)] = scope
        rows = [r.expressions if isinstance(r, exp.Tuple) else [r] for r in node.expressions]
        if not rows:
            return None
        width = len(rows[0])
        if any(len(r) != width for r in rows):
            return None
        cols = [(f"column{i + 1}", either([self._info(r[i], scope) for r in rows])) for i in range(width)]
        _, names = _alias_parts(node)
        return _rename(cols, names)

    def _select(self, node: exp.Select, parent: Scope | None, ctes: dict[str, Any]) -> list[tuple[str, Info]]:
        ctes = self._with(node, parent, ctes)
        scope = Scope(node, parent, ctes)
        self.scopes[id(node)] = scope
        self.blocks.append(scope)
        from_ = node.args.get("from_") or node.args.get("from")
        items: list[tuple[exp.Expression, exp.Join | None]] = []
        if isinstance(from_, exp.From):
            items.append((from_.this, None))
        for j in node.args.get("joins") or []:
            items.append((j.this, j))
        for item, join in items:
            self._add_source(scope, item, join)
        outs: list[tuple[str, Info]] = []
        for e in node.expressions:
            outs.extend(self._select_item(e, scope))
        scope.outputs = outs
        return outs

    def _select_item(self, e: exp.Expression, scope: Scope) -> list[tuple[str, Info]]:
        target = e.this if isinstance(e, exp.Alias) else e
        if isinstance(target, exp.Star) and not isinstance(e, exp.Alias):
            out: list[tuple[str, Info]] = []
            for s in scope.sources:
                out.extend(s.columns if s.columns is not None else [("?", s.opaque)])
            return out
        if isinstance(target, exp.Column) and isinstance(target.this, exp.Star) and not isinstance(e, exp.Alias):
            src = self._named_source(scope, target)
            if src is None:
                return [("?", replace(EMPTY, exact=False))]
            return list(src.columns) if src.columns is not None else [("?", src.opaque)]
        return [(output_name(e), self._info(e, scope))]

    def _dml(self, node: exp.Update | exp.Delete) -> list[tuple[str, Info]] | None:
        ctes = self._with(node, None, {})
        scope = Scope(node, None, ctes)
        self.scopes[id(node)] = scope
        self.blocks.append(scope)
        target = node.this
        self._add_source(scope, target, None)
        from_ = node.args.get("from_") or node.args.get("from")
        if isinstance(from_, exp.From):
            self._add_source(scope, from_.this, None)
        for u in node.args.get("using") or []:
            self._add_source(scope, u, None)
        for j in node.args.get("joins") or []:
            self._add_source(scope, j.this, j)
        returning = node.args.get("returning")
        if isinstance(returning, exp.Returning):
            outs: list[tuple[str, Info]] = []
            for e in returning.expressions:
                outs.extend(self._select_item(e, scope))
            scope.outputs = outs
            return outs
        return None

    def _insert(self, node: exp.Insert) -> list[tuple[str, Info]] | None:
        ctes = self._with(node, None, {})
        source = node.args.get("expression")
        if source is not None:
            self._query(source, None, ctes)
        scope = Scope(node, None, ctes)
        self.scopes[id(node)] = scope
        target = node.this.this if isinstance(node.this, exp.Schema) else node.this
        if isinstance(target, exp.Table):
            self._add_source(scope, target, None)
        returning = node.args.get("returning")
        if isinstance(returning, exp.Returning):
            outs: list[tuple[str, Info]] = []
            for e in returning.expressions:
                outs.extend(self._select_item(e, scope))
            scope.outputs = outs
            return outs
        return None

    # --- FROM items ---------------------------------------------------------------------------

    def _add_source(self, scope: Scope, item: exp.Expression, join: exp.Join | None) -> None:
        """Add one FROM item (with the columns its join merges) to ``scope``."""
        group = item.this if isinstance(item, exp.Subquery) and isinstance(item.this, exp.Table) \
            and item.this.args.get("joins") else item if isinstance(item, exp.Table) and item.args.get("joins") \
            else None
        if group is not None:
            sub = Scope(group, scope, scope.ctes)
            sub.sources.append(self._table_source(group, scope, scope.ctes))
            for j in group.args.get("joins") or []:
                self._add_source(sub, j.this, j)
            scope.equalities.extend(sub.equalities)
            scope.unclear_joins.extend(sub.unclear_joins)
            alias, names = _alias_parts(item) if group is not item else (None, None)
            if alias is None:  # the joined items stay visible by their own names
                if join is not None:
                    scope.unclear_joins.append(join)  # a join to a parenthesised join: USING/NATURAL not followed
                scope.sources.extend(sub.sources)
                scope.merged.update(sub.merged)
                return
            cols: list[tuple[str, Info]] | None = []
            for s in sub.sources:
                if s.columns is None:
                    cols = None
                    break
                cols.extend(s.columns)
            src = Source(alias, None, _rename(cols, names) if cols is not None else None,
                         opaque=combine(s.whole() for s in sub.sources))
        else:
            src = self._source(item, scope)
        if join is not None:
            self._join_columns(scope, src, join)
        scope.sources.append(src)

    def _join_columns(self, scope: Scope, right: Source, join: exp.Join) -> None:
        """USING (k) and NATURAL JOIN: the merged column k, and the equality the join states."""
        using = [ident_name(i.this if isinstance(i, exp.Column) else i) for i in join.args.get("using") or []]
        if str(join.args.get("method") or "").upper() == "NATURAL":
            if right.columns is None or any(s.columns is None for s in scope.sources):
                scope.unclear_joins.append(join)
                return
            left_names = {n for s in scope.sources for n, _ in s.columns or ()} | set(scope.merged)
            using = [n for n, _ in right.columns if n in left_names]
        for name in using:
            left = scope.merged.get(name)
            if left is None:
                found = [c for s in scope.sources if (c := s.column(name)) is not None]
                unknown = [s for s in scope.sources if s.columns is None]
                if not found and not unknown:
                    scope.unclear_joins.append(join)
                    continue
                left = either(found + [self._unknown_column(s, name) for s in unknown],
                              exact=len(found) == 1 and not unknown)
            r = right.column(name)
            if r is None:
                r = self._unknown_column(right, name)
            scope.equalities.append((left, r, join))
            scope.merged[name] = either([left, r])

    def _source(self, item: exp.Expression, scope: Scope) -> Source:
        """One FROM item (not a parenthesised join) as a source of ``scope``."""
        alias, names = _alias_parts(item)
        if isinstance(item, exp.Lateral):
            inner = item.this
            if isinstance(inner, (exp.Subquery, exp.Select, exp.SetOperation, exp.Values)):
                cols = self._query(inner, scope, scope.ctes)  # LATERAL: the items before it are visible
                return Source(alias, None, _rename(cols, names) if cols is not None else None,
                              opaque=self._opaque(cols))
            return self._function_source(inner, scope, alias, names, item)
        outer = scope.parent  # a plain derived table cannot see the other items of its block
        if isinstance(item, exp.Subquery):
            ctes = self._with(item, outer, scope.ctes)
            cols = self._query(item.this, outer, ctes)
            return Source(alias, None, _rename(cols, names) if cols is not None else None, opaque=self._opaque(cols))
        if isinstance(item, exp.Values):
            cols = self._values(item, outer, scope.ctes)
            return Source(alias, None, cols, opaque=self._opaque(cols))
        if isinstance(item, exp.Table):
            if isinstance(item.this, exp.Identifier):
                return self._table_source(item, scope, scope.ctes)
            return self._function_source(item.this, scope, alias, names, item)
        if isinstance(item, (exp.Unnest, exp.Func)):
            return self._function_source(item, scope, alias, names, item)
        return Source(alias, None, None, opaque=replace(combine(self._info(c, scope) for c in item.iter_expressions()),
                                                         exact=False))

    @staticmethod
    def _opaque(cols: list[tuple[str, Info]] | None) -> Info:
        return replace(combine(i for _, i in cols or ()), exact=cols is not None)

    def _function_source(self, fn: exp.Expression, scope: Scope, alias: str | None, names: list[str] | None,
                         holder: exp.Expression | None = None) -> Source:
        """A table function's rows are computed from its arguments: every column depends on all of them."""
        args = combine(self._info(a, scope) for a in fn.iter_expressions()
                       if not isinstance(a, (exp.TableAlias, exp.Identifier)))
        value = replace(args, terms=frozenset(), pure=False)
        if names is None and holder is not None and isinstance(holder.args.get("alias"), exp.TableAlias):
            names = [ident_name(c) for c in holder.args["alias"].columns] or None
        offset = (holder or fn).args.get("offset")
        if names:
            cols = [(n, value) for n in names]
        elif alias:
            cols = [(alias, value)]
        else:
            name = output_name(fn)
            return Source(name, None, None if name in ("?column?", "") else [(name, value)], opaque=value)
        if isinstance(offset, exp.Identifier):
            cols.append((ident_name(offset), EMPTY))
        return Source(alias, None, cols, opaque=value)

    def _table_source(self, node: exp.Table, scope: Scope | None, ctes: dict[str, Any]) -> Source:
        """A named relation: a visible CTE, else a catalog relation (a base instance of its own)."""
        alias, names = _alias_parts(node)
        parts = tuple(ident_name(node.args[k]) for k in ("catalog", "db", "this")
                      if isinstance(node.args.get(k), exp.Identifier))
        if len(parts) == 1 and parts[0] in ctes:
            cte = ctes[parts[0]]
            if cte.busy or cte.outputs is None:
                unknown = replace(EMPTY, exact=False)
                cols = [(n, unknown) for n in cte.columns] if cte.columns else None
                return Source(alias or parts[0], None, _rename(cols, names) if cols else None, opaque=unknown)
            cols = [(n, _fresh_ref(i, id(node))) for n, i in cte.outputs]
            return Source(alias or parts[0], None, _rename(cols, names), opaque=self._opaque(cols))
        rel = self.catalog.resolve(parts, self.search_path) if self.catalog is not None else None
        inst: Inst = (id(node),)
        protected = self._protected(node, rel)
        self.bases[id(node)] = Base(node, rel, parts[-1] if parts else "", protected)
        slots = frozenset({inst}) if protected else frozenset()
        refname = alias or (parts[-1] if parts else None)
        schema = None if alias else (parts[-2] if len(parts) >= 2 else (rel.schema if rel is not None else None))
        if rel is None or not rel.columns:
            unknown = Info(frozenset({(inst, "*")}), slots, exact=False)
            return Source(refname, schema, [(n, unknown) for n in names] if names else None, opaque=unknown,
                          base=inst)
        cols = [(c.name, Info(frozenset({(inst, c.name)}), slots, frozenset({("col", inst, c.name)}), pure=True))
                for c in rel.columns]
        return Source(refname, schema, _rename(cols, names), opaque=combine(i for _, i in cols), base=inst)

    # --- names ----------------------------------------------------------------------------------

    def _named_source(self, scope: Scope | None, col: exp.Column) -> Source | None:
        """The source a qualifier names, nearest block first."""
        table = col.args.get("table")
        qual = ident_name(table) if table is not None else ""
        db = col.args.get("db")
        schema = ident_name(db) if isinstance(db, exp.Identifier) else None
        s = scope
        while s is not None:
            for src in reversed(s.sources):
                if src.refname == qual and (schema is None or src.schema == schema):
                    return src
            s = s.parent
        return None

    def _column(self, col: exp.Column, scope: Scope | None) -> Info:
        if isinstance(col.this, exp.Star):
            src = self._named_source(scope, col)
            return src.whole() if src is not None else replace(EMPTY, exact=False)
        name = ident_name(col.this)
        if col.args.get("table") is not None:
            src = self._named_source(scope, col)
            if src is None:
                return Info(frozenset({((), name)}), exact=False)
            got = src.column(name)
            if got is not None:
                return got
            if src.columns is None:
                return self._unknown_column(src, name)
            # a system column (ctid, tableoid, ...) of a table, or no such column (PostgreSQL refuses it)
            o = src.opaque
            reads = frozenset({(src.base, name)}) if src.base is not None else o.reads
            return Info(reads, o.slots, frozenset(), o.lits, False, False, o.unbounded)
        if scope is not None and self._orders_by_output(col, scope):
            hit = [i for n, i in scope.outputs or () if n == name]
            if hit:
                return hit[0] if len(hit) == 1 else either(hit, exact=False)
        s = scope
        while s is not None:
            if name in s.merged:
                return s.merged[name]
            found = [c for src in s.sources if (c := src.column(name)) is not None]
            unknown = [src for src in s.sources if src.columns is None]
            if found or unknown:
                guesses = found + [self._unknown_column(src, name) for src in unknown]
                if len(found) == 1 and not unknown:
                    return found[0]
                return either(guesses, exact=False)
            s = s.parent
        # No column of that name anywhere: a whole-row reference to a source so named, nearest first.
        s = scope
        while s is not None:
            for src in reversed(s.sources):
                if src.refname == name:
                    return src.whole()
            s = s.parent
        if scope is not None and scope.outputs:
            hit = [i for n, i in scope.outputs if n == name]  # GROUP BY / ORDER BY an output name
            if hit:
                return either(hit, exact=False)
        return Info(frozenset({((), name)}), exact=False)

    @staticmethod
    def _unknown_column(src: Source, name: str) -> Info:
        if src.base is not None:
            return replace(src.opaque, reads=frozenset({(src.base, name)}),
                           terms=frozenset({("col", src.base, name)}), pure=True, exact=False)
        return replace(src.opaque, exact=False)

    @staticmethod
    def _orders_by_output(col: exp.Column, scope: Scope) -> bool:
        """A bare name as an ORDER BY item names an output column first (PostgreSQL's rule)."""
        p = col.parent
        return isinstance(p, exp.Ordered) and isinstance(p.parent, exp.Order) and p.parent.parent is scope.node

    # --- expressions ----------------------------------------------------------------------------

    def _is_aggregate(self, node: exp.Expression) -> bool:
        if isinstance(node, exp.AggFunc):
            return True
        if not isinstance(node, exp.Func):
            return False
        name = node.name.lower() if isinstance(node, exp.Anonymous) else node.sql_name().lower()
        hit = self._aggregate_cache.get(name)
        if hit is None:
            hit = name in PACKING_AGGREGATES or name in NO_RECORD_AGGREGATES
            if not hit and self.catalog is not None:
                hit = any(f.kind in ("aggregate", "window") for f in self.catalog.resolve_function((name,),
                                                                                                  self.search_path))
            self._aggregate_cache[name] = hit
        return hit

    @staticmethod
    def _func_name(node: exp.Expression) -> str:
        if isinstance(node, exp.Anonymous):
            return str(node.name).lower()
        return node.sql_name().lower() if isinstance(node, exp.Func) else ""

    def _aggregate(self, node: exp.Expression, fn: exp.Expression, scope: Scope | None) -> Info:
        """An aggregate or window call (``node`` wraps ``fn`` in OVER, FILTER or WITHIN GROUP, or is it).

        Its value comes from other rows than the current one, so it carries new record slots:
        one row's values at most (min, max, lag, a statistic), none for counts and ranks, and
        any number for the packing aggregates (array_agg, string_agg, ...: ``unbounded``).
        """
        name = self._func_name(fn)
        args = [self._info(a, scope) for a in fn.iter_expressions()
                if not (isinstance(a, exp.Star) and isinstance(fn, exp.Count))]
        # WITHIN GROUP (ORDER BY x): x is the value (percentile_disc, mode); FILTER and OVER only select rows.
        ordered = [self._info(c, scope) for c in node.iter_expressions()
                   if isinstance(node, exp.WithinGroup) and isinstance(c, exp.Order)]
        rest = [self._info(c, scope) for c in node.iter_expressions() if c is not fn and node is not fn]
        value = combine(args + ordered)
        everything = combine([value, *rest])
        if name in NO_RECORD_AGGREGATES or isinstance(fn, exp.Count):
            return replace(everything, slots=frozenset(), terms=frozenset(), pure=False)
        slots = frozenset((id(node), *s) for s in value.slots)
        return replace(everything, slots=slots, terms=frozenset(), pure=False,
                       unbounded=everything.unbounded or name in PACKING_AGGREGATES)

    def _info(self, node: exp.Expression, scope: Scope | None) -> Info:
        key = id(node)
        hit = self._infos.get(key)
        if hit is not None:
            return hit
        self._infos[key] = got = self._compute(node, scope)
        return got

    def _compute(self, node: exp.Expression, scope: Scope | None) -> Info:
        if isinstance(node, exp.Column):
            return self._column(node, scope)
        if isinstance(node, (exp.Paren, exp.Alias)):
            return self._info(node.this, scope)
        if isinstance(node, exp.Star):
            if scope is None:
                return replace(EMPTY, exact=False)
            return combine(s.whole() for s in scope.sources)
        if isinstance(node, exp.Literal):
            return Info(terms=frozenset({("const", id(node), str(node.this), bool(node.is_string), False)}),
                        lits=frozenset({id(node)}), pure=True)
        if isinstance(node, exp.Neg) and isinstance(node.this, exp.Literal) and not node.this.is_string:
            return Info(terms=frozenset({("const", id(node.this), f"-{node.this.this}", False, False)}),
                        lits=frozenset({id(node.this)}), pure=True)
        if isinstance(node, exp.Parameter) and isinstance(node.this, exp.Literal) and not node.this.is_string \
                and str(node.this.this).isdigit():
            return Info(terms=frozenset({("param", int(node.this.this))}), pure=True)
        if isinstance(node, exp.Cast) and not node.args.get("format"):
            inner = self._info(node.this, scope)
            if inner.pure and all(t[0] in ("const", "param") for t in inner.terms):
                terms = frozenset(t[:4] + (True,) if t[0] == "const" else t for t in inner.terms)
                return replace(inner, terms=terms)
            return replace(inner, terms=frozenset(), pure=False)
        if isinstance(node, (exp.Select, exp.SetOperation, exp.Subquery, exp.Values)) and not \
                isinstance(node.parent, (exp.From, exp.Join, exp.Lateral)):
            return self._scalar(node, scope)
        if isinstance(node, exp.Exists):
            q = node.this
            if isinstance(q, (exp.Select, exp.SetOperation, exp.Subquery)):
                self._query(q, scope, scope.ctes if scope else {})
            return EMPTY
        if isinstance(node, exp.In):
            parts = [self._info(node.this, scope)] + [self._info(e, scope) for e in node.expressions]
            q = node.args.get("query")
            if q is not None:
                sub = self._scalar(q, scope)
                parts.append(replace(sub, slots=frozenset()))
            return combine(parts)
        if isinstance(node, exp.Array) and any(isinstance(e, (exp.Select, exp.SetOperation, exp.Subquery))
                                               for e in node.expressions):
            inner = combine(self._scalar(e, scope) for e in node.expressions)
            return replace(inner, unbounded=True)
        if isinstance(node, exp.Window):
            fn = node.this
            if isinstance(fn, exp.Filter):
                fn = fn.this
            if isinstance(fn, exp.Expression) and not isinstance(fn, exp.Identifier):
                return self._aggregate(node, fn, scope)
        if isinstance(node, exp.Filter) and isinstance(node.this, exp.Expression):
            return self._aggregate(node, node.this, scope)
        if isinstance(node, exp.WithinGroup) and isinstance(node.this, exp.Expression):
            return self._aggregate(node, node.this, scope)
        if self._is_aggregate(node):
            return self._aggregate(node, node, scope)
        if isinstance(node, exp.Dot) and isinstance(node.expression, exp.Identifier):
            field_info = self._field(node, scope)
            if field_info is not None:
                return field_info
        return combine(self._info(c, scope) for c in node.iter_expressions())

    def _field(self, node: exp.Dot, scope: Scope | None) -> Info | None:
        """``(t).col``: one column of a whole-row reference."""
        base = node.this
        while isinstance(base, exp.Paren):
            base = base.this
        if not isinstance(base, exp.Column) or base.args.get("table") is not None:
            return None
        name = ident_name(base.this)
        s = scope
        while s is not None:
            if any(src.column(name) is not None for src in s.sources):
                return None  # a column of that name: a composite column, not a row
            for src in reversed(s.sources):
                if src.refname == name:
                    got = src.column(ident_name(node.expression))
                    return got if got is not None else replace(src.whole(), terms=frozenset(), pure=False,
                                                               exact=False)
            s = s.parent
        return None

    def _scalar(self, node: exp.Expression, scope: Scope | None) -> Info:
        """A subquery used as a value: its (one) column, from another row of its own."""
        cols = self._query(node, scope, scope.ctes if scope else {})
        if cols is None:
            return Info(exact=False, unbounded=True)  # a query this module cannot read: assume the worst
        if not cols:
            return EMPTY
        first = cols[0][1] if len(cols) == 1 else combine(i for _, i in cols)
        return first.fresh(node)

    # --- traversal helpers --------------------------------------------------------------------------

    def iter_columns(self) -> Iterator[tuple[exp.Column, Scope | None]]:
        for col in self.tree.find_all(exp.Column):
            yield col, self.scope_of(col)
