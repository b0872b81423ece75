"""Which guests a statement looks up (R3.4), by what its values mean, not what they are called; no I/O.

A statement looks up guest G when rows of G are selected by a condition on the
subject key (``guest_id``), however the key is spelled. :mod:`rules.lineage`
says what every value is: ``x2`` under ``cs_records AS c(x1, x2)`` is the key,
``g`` under ``(SELECT guest_id AS g ...) t`` is the key, ``guest_id`` under
``JOIN (SELECT 3635 AS guest_id) v USING (guest_id)`` is the constant 3635.

Conditions are read in every query block (WHERE, JOIN ... ON, USING and
NATURAL joins, IN lists and IN/= subqueries, ORs of equalities), and values
they state equal fall into one class (``a.k = b.k AND b.k = 5``: one class).
A class holding a guest key and constants or parameters looks those guests
up: each is counted (parameters at Bind, with their real values). A class
holding a key and anything else (another table's column, a function of rows,
``generate_series``) pins guests pgwarden cannot name: refused.

For a role with a lookup quota, every other use of a key in a condition
(arithmetic, casts, ranges, functions, LIKE, ``= ANY($1)``, CASE, FILTER,
ORDER BY, HAVING), and every condition on a whole-row or computed value that
carries a key, could hide a lookup from the count, so the statement is refused
with a message that says how to write it. Showing, grouping or sorting by the
key itself, and computing output from it, looks nobody up.

Records picked by other identifying values: rows of a keyed table chosen by
its ``record_key`` (``WHERE id = 12345``) or by a column of personal data the
role sees in clear (a supervisor's ``guest_name = '张三'``) name a guest
pgwarden cannot tell from the text. For a role with a quota, any condition on
such an identity column (an equality, a pattern, a function of it) is refused
unless the same statement also pins that table's guest key (``AND guest_id =
42``), which is then counted; joining on it (``c.id = d.cs_record_id``) and
showing or sorting by it are not conditions. A range of record keys against
values (``id > $1 ORDER BY id LIMIT 50``: a tool paging through a table) picks
no guest and is allowed, unless its bounds meet (``BETWEEN 5 AND 5``, ``>= 5
AND <= 5``). A masked column is not an identity: a condition on it compares
masked values, which name no one for sure.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError

from .catalog import Catalog
from .grants import StatementGrants, TableGrant
from .lineage import Info, Lineage, Scope, Term

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
    """A predicate constrains the subject key in a shape that cannot be counted.

    ``hint``: how to write it instead, when the general advice (key = value) does not fit.
    """

    def __init__(self, what: str, hint: str = "") -> None:
        super().__init__(what)
        self.hint = hint


def find_lookups(sql: str, grants: StatementGrants, catalog: Catalog,
                 search_path: Sequence[str] | None = None) -> tuple[Lookup, ...]:
    """Every guest lookup in ``sql`` (deduplicated), or UnclearLookup."""
    keyed = {t: g for t, g in grants.tables.items() if g.subject_key}
    if not keyed:
        return ()
    m = DECLARE.match(sql)
    if m is not None:
        sql = m.group(2)  # a cursor's query is read like any other (its FETCHes return its rows)
    try:
        trees = [t for t in sqlglot.parse(sql, read=DIALECT) if t is not None]
    except SqlglotError:
        raise UnclearLookup("a statement pgwarden cannot read for lookups") from None
    out: dict[Lookup, None] = {}
    for tree in trees:
        if isinstance(tree, exp.Command):
            raise UnclearLookup(f"{tree.name.upper()} of a query (prepare it through the protocol instead)")
        for lk in _Statement(tree, keyed, catalog, search_path).lookups():
            out[lk] = None
    return tuple(out)


class _Classes:
    """Values a condition states equal are one class: a guest bound to one binds them all."""

    def __init__(self) -> None:
        self.parent: dict[Term, Term] = {}

    def find(self, x: Term) -> Term:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: Term, b: Term) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[ra] = rb

    def groups(self) -> dict[Term, list[Term]]:
        out: dict[Term, list[Term]] = {}
        for t in list(self.parent):
            out.setdefault(self.find(t), []).append(t)
        return out


#: Nodes whose value selects rows (or values) by what is inside them: a key in them is a condition.
_SELECTIVE = (exp.Predicate, exp.Connector, exp.Not, exp.If, exp.Case, exp.Nullif, exp.RegexpLike, exp.AggFunc,
              exp.Filter, exp.Window, exp.WithinGroup, exp.Distinct, exp.Any, exp.All)
#: Block arguments in which a key can only select (a condition, an ordering, a row count).
_CONDITION_ARGS = frozenset({"where", "having", "qualify", "order", "group", "limit", "offset", "joins", "from_",
                             "from", "windows", "distinct", "connect", "prewhere", "laterals"})


class _Statement:
    """One statement's lookups: conditions read into classes, then every key use checked."""

    def __init__(self, tree: exp.Expression, keyed: dict[str, TableGrant], catalog: Catalog,
                 search_path: Sequence[str] | None) -> None:
        self.tree = tree
        self.keyed = keyed
        self.catalog = catalog
        self.lin = Lineage(tree, catalog, search_path)
        self.classes = _Classes()
        self.recognised: set[int] = set()  # Column nodes read as operands of a counted condition
        self.key_names = frozenset(g.subject_key for g in keyed.values() if g.subject_key)

    # --- what a value is -------------------------------------------------------------------------

    def grant(self, inst: tuple[int, ...]) -> TableGrant | None:
        base = self.lin.base(inst)
        if base is None or base.rel is None:
            return None
        rel = base.rel
        return self.keyed.get(self.catalog.root_of(rel).qualified_name) or self.keyed.get(rel.qualified_name) or \
            next((self.keyed[a] for a in sorted(rel.ancestors) if a in self.keyed), None)

    def is_key(self, t: Term) -> bool:
        if t[0] != "col":
            return False
        g = self.grant(t[1])
        return g is not None and t[2] == g.subject_key

    def involves_key(self, info: Info) -> bool:
        for inst, col in info.reads:
            if not inst:
                if col in self.key_names:
                    return True  # a name nothing resolves: by name, to be safe
                continue
            g = self.grant(inst)
            if g is not None and (col == g.subject_key or col == "*"):
                return True
        return False

    def identity(self, inst: tuple[int, ...], col: str) -> bool:
        """A column naming one record or one person for this role: the record key, clear personal data."""
        from .grants import Treatment

        g = self.grant(inst)
        if g is None or col == g.subject_key:
            return False
        if col == g.record_key:
            return True
        rule = g.columns.get(col)
        return col in g.personal and (rule is None or rule.treatment == Treatment.CLEAR)

    def identities(self, info: Info) -> list[tuple[tuple[int, ...], str]]:
        return [(inst, c) for inst, c in info.reads if inst and self.identity(inst, c)]

    def integer(self, t: Term) -> bool:
        base = self.lin.base(t[1])
        col = base.rel.column(t[2]) if base is not None and base.rel is not None else None
        return col is not None and col.type_name.split("(")[0] in _INTEGER_TYPES

    # --- conditions --------------------------------------------------------------------------------

    def lookups(self) -> Iterator[Lookup]:
        for scope in self.lin.blocks:
            for cond in _conditions(scope.node):
                for conj in _flatten(cond, exp.And):
                    self._read(conj, scope)
            for left, right, join in scope.equalities:
                self._equal_infos(left, right, join)
            for join in scope.unclear_joins:
                if any(self.involves_key(s.whole()) for s in scope.sources):
                    raise UnclearLookup(f"a join whose common columns pgwarden cannot tell ({join.sql(dialect=DIALECT)})",
                                        "name the join's columns (JOIN ... ON a.guest_id = b.guest_id)")
        picked: list[tuple[tuple[int, ...], str]] = []  # identity columns used in a condition
        bounds: dict[tuple[Any, ...], tuple[set[str], set[str]]] = {}  # record key ranges: (lower, upper) values
        for col in self.tree.find_all(exp.Column):
            if id(col) in self.recognised:
                continue
            info = self.lin.info(col)
            if self._harmless(col, info):
                continue
            if self.involves_key(info):
                raise UnclearLookup(col.sql(dialect=DIALECT))
            ids = self.identities(info)
            if ids and self._paging(col, info, bounds):
                continue
            picked.extend(ids)
        for (inst, name), (low, high) in bounds.items():
            if low & high:
                picked.append((inst, name))  # >= x AND <= x: one record
        found = list(self._counted(picked))
        yield from found

    def _read(self, conj: exp.Expression, scope: Scope) -> None:
        """Record what one condition says about guest keys; shapes not recognised are left alone (their key
        columns are then found outside a recognised place, and the statement refused)."""
        conj = _unparen(conj)
        if isinstance(conj, (exp.EQ, exp.NullSafeEQ)):
            left, right = _unparen(conj.this), _unparen(conj.expression)
            if isinstance(left, exp.Tuple) and isinstance(right, exp.Tuple) \
                    and len(left.expressions) == len(right.expressions):
                for a, b in zip(left.expressions, right.expressions):
                    self._equal(_unparen(a), _unparen(b), scope, conj)
                return
            self._equal(left, right, scope, conj)
        elif isinstance(conj, exp.In) and set(k for k, v in conj.args.items() if v) <= {"this", "expressions", "query"}:
            self._in(conj, scope)
        elif isinstance(conj, exp.Or):
            items = [_unparen(i) for i in _flatten(conj, exp.Or)]
            lhs = [self.lin.info(i.this, scope) if isinstance(i, (exp.EQ, exp.In)) else None for i in items]
            if all(i is not None and i.pure and i.exact for i in lhs) and len({i.terms for i in lhs if i}) == 1:
                for i in items:
                    self._read(i, scope)
        elif isinstance(conj, exp.Is) or (isinstance(conj, exp.Not) and isinstance(conj.this, exp.Is)):
            is_ = conj if isinstance(conj, exp.Is) else conj.this
            if isinstance(is_.this, exp.Column) and isinstance(is_.expression, exp.Null):
                self.recognised.add(id(is_.this))  # IS [NOT] NULL looks nobody up

    def _in(self, conj: exp.In, scope: Scope) -> None:
        a = _unparen(conj.this)
        ia = self.lin.info(a, scope)
        query = conj.args.get("query")
        items: list[Info] = []
        if query is not None:
            items.append(self._column_of(query))
        for e in conj.expressions:
            if isinstance(e, (exp.Values, exp.Select, exp.Subquery)):
                items.append(self._column_of(e))
            else:
                items.append(self.lin.info(e, scope))
        if ia.pure and ia.exact and items and all(i.pure and i.exact for i in items):
            for i in items:
                self._union(ia, i)
            self._mark(a)
        elif self.involves_key(ia) or any(self.involves_key(i) for i in items):
            raise UnclearLookup(conj.sql(dialect=DIALECT))

    def _column_of(self, query: exp.Expression) -> Info:
        """The one column of a subquery (IN, =), as a value."""
        cols = self.lin.outputs(query)
        if cols is None or len(cols) != 1:
            return Info(exact=False)
        return cols[0][1]

    def _equal(self, a: exp.Expression, b: exp.Expression, scope: Scope, conj: exp.Expression) -> None:
        ia, ib = self.lin.info(a, scope), self.lin.info(b, scope)
        if ia.pure and ib.pure and ia.exact and ib.exact:
            self._union(ia, ib)
            self._mark(a)
            self._mark(b)
        elif self.involves_key(ia) or self.involves_key(ib):
            raise UnclearLookup(conj.sql(dialect=DIALECT))

    def _equal_infos(self, ia: Info, ib: Info, join: exp.Expression) -> None:
        if ia.pure and ib.pure and ia.exact and ib.exact:
            self._union(ia, ib)
        elif self.involves_key(ia) or self.involves_key(ib):
            raise UnclearLookup(f"a join on a guest key that pgwarden cannot follow ({join.sql(dialect=DIALECT)})")

    def _union(self, ia: Info, ib: Info) -> None:
        for x in ia.terms:
            for y in ib.terms:
                self.classes.union(x, y)

    def _mark(self, node: exp.Expression) -> None:
        if isinstance(node, exp.Column):
            self.recognised.add(id(node))
        elif isinstance(node, exp.Dot):  # (c).guest_id: the row is read for that one field
            self.recognised.update(id(c) for c in node.find_all(exp.Column))

    # --- where a key may appear without being a condition ------------------------------------------

    def _harmless(self, col: exp.Column, info: Info) -> bool:
        """Shown, grouped or sorted by, or output computed from it: that looks nobody up."""
        scope = self.lin.scope_of(col)
        block = scope.node if scope is not None else None
        parent = col.parent
        if isinstance(parent, exp.Group) or (isinstance(parent, exp.Ordered) and isinstance(parent.parent, exp.Order)):
            return info.pure  # the key itself (not a whole row or a computed value)
        node: exp.Expression = col
        while node.parent is not None and node.parent is not block:
            p = node.parent
            if isinstance(p, _SELECTIVE) or self.lin._is_aggregate(p):
                return False
            node = p
        if node.parent is None:
            return False
        return node.arg_key == "expressions" and node.arg_key not in _CONDITION_ARGS

    _RANGES: dict[type, int] = {exp.GT: 0, exp.GTE: 0, exp.LT: 1, exp.LTE: 1}  # column on the left: lower/upper

    def _paging(self, col: exp.Column, info: Info, bounds: dict[tuple[Any, ...], tuple[set[str], set[str]]]) -> bool:
        """Is ``col`` a record key compared, as a range, with a value (not picking one record)?"""
        if not (info.pure and info.exact and len(info.terms) == 1):
            return False
        (t,) = info.terms
        g = self.grant(t[1]) if t[0] == "col" else None
        if g is None or t[2] != g.record_key:
            return False
        p = col.parent
        while isinstance(p, exp.Paren):
            p = p.parent
        key = (t[1], t[2])
        if isinstance(p, exp.Between) and _unparen(p.this) is col:
            lo, hi = self._value(p.args.get("low")), self._value(p.args.get("high"))
            return lo is not None and hi is not None and lo != hi
        side = self._RANGES.get(type(p))
        if side is None:
            return False
        if _unparen(p.this) is col:
            other = p.expression
        elif _unparen(p.expression) is col:
            other, side = p.this, 1 - side
        else:
            return False
        v = self._value(other)
        if v is None:
            return False
        bounds.setdefault(key, (set(), set()))[side].add(v)
        return True

    def _value(self, e: exp.Expression | None) -> str | None:
        """The text of a constant or parameter (``$1``), else None."""
        if e is None:
            return None
        info = self.lin.info(e)
        if not (info.pure and len(info.terms) == 1):
            return None
        (t,) = info.terms
        if t[0] == "const":
            return canonical_key(t[2], True)
        return f"${t[1]}" if t[0] == "param" else None

    # --- what is counted --------------------------------------------------------------------------

    def _counted(self, picked: list[tuple[tuple[int, ...], str]]) -> Iterator[Lookup]:
        groups = self.classes.groups()
        pinned = {root for root, members in groups.items() if any(t[0] in ("const", "param") for t in members)}
        for root, members in groups.items():
            keys = [t for t in members if self.is_key(t)]
            values = [t for t in members if t[0] in ("const", "param")]
            if keys:
                others = [t for t in members if t[0] == "col" and not self.is_key(t)]
                if others:
                    raise UnclearLookup(f"a guest key compared with {self._describe(others[0])}",
                                        "compare the key with values or with another table's guest key")
                integer = all(self.integer(k) for k in keys)
                for t in values:
                    if t[0] == "param":
                        yield Lookup("", None, t[1], integer)
                        continue
                    text = t[2]
                    if t[4] and integer and not canonical_key(text, True).lstrip("-").isdigit():
                        # '3.7'::int is 4: a cast may round; which guest it names is not for pgwarden to guess.
                        raise UnclearLookup(f"a cast of {text!r}")
                    yield Lookup("", canonical_key(text, integer), None, integer)
                continue
            if values:  # an identity column equal to a value picks a record or a person
                picked.extend((t[1], t[2]) for t in members if t[0] == "col" and self.identity(t[1], t[2]))
        for inst, col in dict.fromkeys(picked):
            g = self.grant(inst)
            assert g is not None
            if not self._pinned(inst, pinned):
                name = self._describe(("col", inst, col))
                raise UnclearLookup(f"rows picked by {name} name a guest pgwarden cannot count",
                                    f"add {g.subject_key} = <the guest> to the condition (it is then counted)")

    def _pinned(self, inst: tuple[int, ...], pinned: set[Term]) -> bool:
        """Are this table instance's rows those of guests the statement names (and counts)? Its key is
        equal to values, or its record key to the record key of such an instance (the same records)."""
        seen: set[tuple[int, ...]] = set()
        todo = [inst]
        while todo:
            cur = todo.pop()
            if cur in seen:
                continue
            seen.add(cur)
            g = self.grant(cur)
            if g is None:
                continue
            if self.classes.find(("col", cur, g.subject_key)) in pinned:
                return True
            if g.record_key:
                root = self.classes.find(("col", cur, g.record_key))
                for t in self.classes.parent:
                    if t[0] == "col" and t[1] != cur and self.classes.find(t) == root:
                        other = self.grant(t[1])
                        if other is not None and other.table == g.table and t[2] == other.record_key:
                            todo.append(t[1])
        return False

    def _describe(self, t: Term) -> str:
        base = self.lin.base(t[1])
        table = base.rel.name if base is not None and base.rel is not None else "a table"
        return f"{table}.{t[2]}"


def _unparen(e: exp.Expression) -> Any:
    while isinstance(e, exp.Paren):
        e = e.this
    return e


def _conditions(block: exp.Expression) -> list[exp.Expression]:
    out = []
    where = block.args.get("where")
    if where is not None:
        out.append(where.this)
    for j in block.args.get("joins") or []:
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
