"""Row caps count records, not result rows (R3.2, R3.3): how many protected records one row carries.

Theory of operation
-------------------
A cap of 200 is meant to let at most 200 records of protected tables leave in
one statement. Counting result rows undercounts as soon as one row carries
several records: ten correlated scalar subqueries
``(SELECT row_to_json(c)::text FROM cs_records c ORDER BY c.id OFFSET n.i*10+k LIMIT 1)``
over ``generate_series(0, 199)`` return 200 rows and 2,000 records. So the
question is what "a record leaving" means, and who counts it.

*What leaves.* A record of a protected table leaves when values of its fence
row reach the result. A fence row that a WHERE, a join condition, an ORDER BY
or an EXISTS consumes does not leave; nor does one that only feeds a count or
a rank. Every other route carries one row's values per use:

* the FROM items of the statement's own block: one record per protected item
  whose columns the select list uses (a self-join carries two);
* a scalar subquery, a window function (``lag``, ``nth_value``) and an
  aggregate (``max``, ``sum``, ``mode``, a value picked by ``max(CASE ...)``
  in a pivot): each brings another row's values in, so each use is a record
  slot of its own, per output row;
* row constructors, whole-row references, ``row_to_json``, arrays and string
  concatenation of such values: the union of what their parts carry;
* aggregates that pack any number of rows into one value (``array_agg``,
  ``string_agg``, ``json_agg``, ``ARRAY(SELECT ...)``): no bound at all, so
  they stay refused for capped roles (as does ``WITH RECURSIVE``, which can fold
  every row into one value).

:mod:`rules.lineage` follows every output column back through derived tables,
CTEs (each reference its own slots), set operations, LATERAL and correlated
subqueries to these slots; the number of distinct slots in the result's
columns is the most records one result row can carry, ``W`` (at least 1: a
row of counts still counts as a row, as before). ``count(*)``, ``count(x)``
and ranks give no slot, so ``SELECT count(*) FROM cs_records`` over 50,000
records is one row of one record's worth, as it should be.

*Who counts.* PostgreSQL counts the rows, as before: the cap wrapper
(``rules.rewrite._capped``) materialises the result and reads at most
``cap // W + 1`` rows of it before sending any, and fails the statement (a cast
error the session turns into 42501) when more than ``cap // W`` rows come, so
rows x W never passes the cap. The row budget reserves the cap and is charged
rows x W for what was sent (``Decision.records_per_row``).

*Why not a counter inside each fence.* A fence cannot tell a row that leaves
from one an aggregate or a predicate consumes: both pass through it. Counting
there (``set_config`` ticks per fence row) would refuse ``SELECT count(*)``
over a large table, or, placed only where values leave, need exactly the
analysis above to place the ticks, plus state that outlives the statement in a
transaction (cursors are read over several FETCHes, a Query message holds
several statements) and ``set_config`` calls in the text PostgreSQL runs. The
only thing a dynamic tick would add is not charging a scalar subquery that
found no row; the static bound charges it (fail closed).

*Limits, said plainly.* W is an upper bound: a scalar subquery that returns
NULL, or the same record reached twice, is still charged. An aggregate's
value is taken to carry one record (``sum``, ``avg`` of a group of one is the
value itself); a crafted arithmetic encoding inside one aggregate
(``sum(x * 10^(k * id))``) can pack several values into one number, which
no row count can see: that is a statistic-shaped export, not closed here.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlglot import exp

from .lineage import Info, Lineage

__all__ = ["Unbounded", "records_per_row", "columns_read"]


class Unbounded(Exception):
    """A result value can carry any number of records (a packing aggregate, ARRAY(SELECT ...))."""


def _width(infos: Iterable[Info]) -> int:
    slots = set()
    for i in infos:
        if i.unbounded:
            raise Unbounded()
        slots |= i.slots
    return len(slots)


def _query_width(lin: Lineage, node: exp.Expression) -> int:
    """The most protected records one row of ``node`` carries."""
    if isinstance(node, exp.Subquery):
        return _query_width(lin, node.this)
    if isinstance(node, exp.SetOperation):
        return max(_query_width(lin, node.this), _query_width(lin, node.expression))
    if isinstance(node, exp.Values):
        rows = [r.expressions if isinstance(r, exp.Tuple) else [r] for r in node.expressions]
        return max((_width(lin.info(c) for c in row) for row in rows), default=0)
    cols = lin.outputs(node)
    if cols is None:
        raise Unbounded()  # a query the lineage cannot read: no bound can be given
    return _width(i for _, i in cols)


def records_per_row(lin: Lineage) -> int:
    """W for the statement ``lin`` was built on (>= 1); Unbounded if no bound exists."""
    tree = lin.tree
    if isinstance(tree, exp.Copy):
        tree = tree.this
    return max(1, _query_width(lin, tree))


#: Query-block arguments whose expressions are evaluated for every row they see (use sites).
_SITE_ARGS = ("where", "group", "having", "qualify", "order", "distinct", "windows", "limit", "offset",
              "expressions")


def columns_read(lin: Lineage) -> set[tuple[str, str]]:
    """(qualified relation, column) of every protected column the statement uses, anywhere it is used.

    A derived table's or CTE's select item counts only where the outer query uses its column
    (PostgreSQL does not compute the others); ``*`` and whole-row references use every column;
    ``count(*)`` uses none.
    """
    infos: list[Info] = [i for _, i in lin.top or ()]
    tree = lin.tree.this if isinstance(lin.tree, exp.Copy) else lin.tree
    top = tree.this if isinstance(tree, exp.Subquery) else tree
    for scope in list(lin.scopes.values()):
        node = scope.node
        for key in _SITE_ARGS:
            if key == "expressions" and not isinstance(node, exp.Update):
                continue  # a select list is used only through its outputs
            value = node.args.get(key)
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, exp.Expression):
                    infos.append(lin.info(v, scope))
        for j in node.args.get("joins") or []:
            on = j.args.get("on")
            if isinstance(on, exp.Expression):
                infos.append(lin.info(on, scope))
        for left, right, _ in scope.equalities:
            infos.extend((left, right))
    if lin.top is None and isinstance(top, exp.Expression):
        infos.append(lin.info(top))
    out: set[tuple[str, str]] = set()
    for info in infos:
        for inst, col in info.reads:
            base = lin.base(inst)
            if base is None or not base.protected or base.rel is None:
                continue
            names = base.rel.column_names
            if col == "*":
                out.update((base.rel.qualified_name, c) for c in names)
            elif col in names:
                out.add((base.rel.qualified_name, col))
    return out
