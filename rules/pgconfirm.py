"""One meaning: PostgreSQL's own grammar (libpg_query) confirms each decision.

Theory of operation
-------------------
pgwarden decides a statement on sqlglot's reading of the text; PostgreSQL
runs its own reading of whatever bytes reach it. Where the two differ (a block
comment PostgreSQL nests and sqlglot does not, a quoting or operator quirk),
a decision about one statement would be applied to another. So for every
restricted role two texts are read again here, with the parser PostgreSQL
itself uses (libpg_query, through the ``pgparse`` binding), and compared with
what the rewriter read:

* the client's text (:func:`agree`): the same number of statements, of the
  same kinds, naming the same relations. A difference means the client wrote
  something the two parsers read differently: refused (``parser_disagreement``),
  even though what pgwarden sends is its own text.
* the text pgwarden sends (:func:`confirm`): all of the above, and, read by
  PostgreSQL's grammar alone, every protected relation only inside a SELECT
  pgwarden built (a fence or a row filter's subquery, compared tree for tree),
  a DML target only where the decision writes, no statement nested in another,
  no SELECT INTO or row locks, every function call resolvable and allowed,
  settings only those the decision changes.

Both are pure functions of text, catalog and grants; the engine caches them
with the decision, so a cache hit costs nothing here.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import pgparse

from .catalog import BUILTIN_SCHEMAS, Catalog, Relation
from .functions import call_problem
from .grants import StatementGrants

__all__ = ["Reading", "Disagreement", "agree", "confirm", "statement_count", "normalize", "DISAGREEMENT"]

DISAGREEMENT = "parser_disagreement"
#: DeclareCursorStmt.options bit for WITH HOLD (PostgreSQL's CURSOR_OPT_HOLD).
_CURSOR_OPT_HOLD = 0x0020
#: Node names of the statements a restricted role's decision may contain.
_TOP_KINDS = frozenset({
    "SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt", "CopyStmt", "ExplainStmt", "DeclareCursorStmt",
    "PrepareStmt", "ExecuteStmt", "FetchStmt", "ClosePortalStmt", "DeallocateStmt", "VariableSetStmt",
    "VariableShowStmt", "TransactionStmt",
})
_DML = frozenset({"InsertStmt", "UpdateStmt", "DeleteStmt"})
_BODY_CACHE: dict[str, bytes] = {}
_BODY_CACHE_MAX = 8192


class Disagreement(Exception):
    """PostgreSQL's reading differs from the decision's; the message says how (for the audit log)."""


@dataclass(frozen=True, slots=True)
class Reading:
    """What one parser read in a text: the facts a decision rests on.

    ``kinds`` are libpg_query node names, one per statement, so both parsers'
    readings compare directly. ``relations`` are qualified catalog names (CTE
    references excluded). ``bodies`` are the SQL texts of the SELECTs pgwarden
    built around protected rows, ``targets`` the tables written, ``settings``
    the settings SET/RESET change, in order; ``hold``: a cursor WITH HOLD; ``search_path``: the
    path a SET search_path gives the session (which follows it).
    """

    kinds: tuple[str, ...]
    relations: frozenset[str] = frozenset()
    bodies: frozenset[str] = frozenset()
    targets: frozenset[str] = frozenset()
    settings: tuple[str, ...] = ()
    hold: bool = False
    search_path: tuple[str, ...] | None = None  # SET search_path: the schemas, () for the default


@dataclass
class _PgRead:
    """PostgreSQL's reading of one text, and what in it breaks the rules on its own."""

    kinds: list[str] = field(default_factory=list)
    relations: set[str] = field(default_factory=set)
    targets: set[str] = field(default_factory=set)
    settings: list[str] = field(default_factory=list)
    hold: bool = False
    unknown: set[str] = field(default_factory=set)
    #: (relation, path of SELECT subtrees around it, innermost last) for each protected reference
    protected: list[tuple[str, list[dict[str, Any]]]] = field(default_factory=list)
    functions: set[tuple[str, ...]] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)


def _parse(text: str) -> list[dict[str, Any]]:
    try:
        return pgparse.parse(text)
    except pgparse.PGQueryError as e:
        raise Disagreement(f"PostgreSQL cannot parse it ({e.message})") from None
    except (ValueError, RecursionError, MemoryError) as e:
        raise Disagreement(f"PostgreSQL's parser failed ({type(e).__name__})") from None


def statement_count(text: str) -> int:
    """How many statements PostgreSQL reads in ``text`` (empty ones not counted)."""
    return len(_parse(text))


def normalize(text: str) -> str | None:
    """The text with every constant PostgreSQL reads replaced by $n (None: it does not parse)."""
    try:
        return pgparse.normalize(text)
    except (pgparse.PGQueryError, ValueError, RecursionError, MemoryError):
        return None


def _names(items: Sequence[dict[str, Any]] | None) -> tuple[str, ...]:
    return tuple(i["String"]["sval"] for i in items or () if "String" in i)


_LOCATION = re.compile(rb',"location":-?\d+|"location":-?\d+,?')


def _canonical(node: dict[str, Any]) -> bytes:
    """The tree without source positions: equal trees mean equal statements (libpg_query writes a
    node type's fields in one order, so equal trees serialise to equal bytes)."""
    return _LOCATION.sub(b"", orjson.dumps(node))


def _body_canonical(sql: str) -> bytes:
    """A SELECT pgwarden built, as PostgreSQL's tree (cached: the same fences recur)."""
    hit = _BODY_CACHE.get(sql)
    if hit is None:
        stmts = _parse(sql)
        if len(stmts) != 1 or "SelectStmt" not in stmts[0]["stmt"]:
            raise Disagreement("a SELECT pgwarden built does not read as one SELECT")
        hit = _canonical(stmts[0]["stmt"]["SelectStmt"])
        if len(_BODY_CACHE) >= _BODY_CACHE_MAX:
            _BODY_CACHE.clear()
        _BODY_CACHE[sql] = hit
    return hit


class _Walker:
    """One pass over PostgreSQL's tree: resolve relations as PostgreSQL would, note what is off."""

    def __init__(self, catalog: Catalog, search_path: Sequence[str] | None,
                 grants: StatementGrants | None) -> None:
        self.catalog = catalog
        self.search_path = search_path
        self.grants = grants
        self.out = _PgRead()

    # -- statements ---------------------------------------------------------------------

    def statement(self, stmt: dict[str, Any]) -> None:
        ((kind, body),) = stmt.items()
        self.out.kinds.append(kind)
        if kind == "VariableSetStmt":
            self.out.settings.append(str(body.get("name", "")).lower())
        elif kind == "DeclareCursorStmt" and int(body.get("options", 0)) & _CURSOR_OPT_HOLD:
            self.out.hold = True
        elif kind == "SelectStmt":
            pass
        elif kind == "ExplainStmt":
            for opt in body.get("options") or ():
                name = str(opt.get("DefElem", {}).get("defname", "")).lower()
                if name in ("analyze", "analyse", "verbose"):
                    self.out.problems.append(f"EXPLAIN {name.upper()}")
        elif kind == "CopyStmt":
            if body.get("is_from") or body.get("filename") or body.get("is_program") or body.get("relation"):
                self.out.problems.append("COPY other than (query) TO STDOUT")
        targets: tuple[str, ...] = ("relation",) if kind in _DML else ()
        self.node(kind, body, ctes=(), selects=[], top=True, targets=targets)

    # -- the generic walk ---------------------------------------------------------------

    def node(self, kind: str, body: dict[str, Any], *, ctes: tuple[frozenset[str], ...],
             selects: list[dict[str, Any]], top: bool = False, targets: tuple[str, ...] = ()) -> None:
        if kind.endswith("Stmt") and not top and kind != "SelectStmt":
            self.out.problems.append(f"a {kind} inside another statement")
        if kind == "SelectStmt":
            if body.get("intoClause"):
                self.out.problems.append("SELECT INTO")
            if body.get("lockingClause"):
                self.out.problems.append("row locks (FOR UPDATE/SHARE)")
            selects = [*selects, body]
        elif kind == "FuncCall":
            self.out.functions.add(_names(body.get("funcname")))
        elif kind == "RangeVar":
            self.relation(body, ctes, selects, target=False)
        with_clause = body.get("withClause")
        if isinstance(with_clause, dict):
            ctes = self.with_clause(with_clause, ctes, selects)
        for key, value in body.items():
            if key == "withClause":
                continue
            if key in targets and isinstance(value, dict):
                self.relation(value, ctes, selects, target=True)
            elif kind == "SelectStmt" and key in ("larg", "rarg") and isinstance(value, dict):
                self.node("SelectStmt", value, ctes=ctes, selects=selects)  # set operation arms, unwrapped
            else:
                self.value(value, ctes, selects)

    def value(self, value: Any, ctes: tuple[frozenset[str], ...], selects: list[dict[str, Any]]) -> None:
        if isinstance(value, list):
            for v in value:
                self.value(v, ctes, selects)
        elif isinstance(value, dict):
            if len(value) == 1:
                ((k, v),) = value.items()
                if k[:1].isupper() and isinstance(v, dict):
                    self.node(k, v, ctes=ctes, selects=selects)
                    return
            if "relname" in value:  # a RangeVar in a field of that type, unwrapped (INTO, COPY, ...)
                self.relation(value, ctes, selects, target=False)
                return
            # Another struct-typed field, unwrapped (alias, typeName, ...). Anything not recognised
            # above is still walked, so a relation in it is seen, just without its scope: that can
            # only make a reference look unscoped or unfenced, and refuse.
            for v in value.values():
                self.value(v, ctes, selects)

    def with_clause(self, w: dict[str, Any], ctes: tuple[frozenset[str], ...],
                    selects: list[dict[str, Any]]) -> tuple[frozenset[str], ...]:
        """PostgreSQL's CTE scoping: a CTE sees the earlier ones (all of them WITH RECURSIVE)."""
        items = [c.get("CommonTableExpr", {}) for c in w.get("ctes") or ()]
        names = [str(c.get("ctename", "")) for c in items]
        recursive = bool(w.get("recursive"))
        for i, cte in enumerate(items):
            visible = frozenset(names if recursive else names[:i])
            self.value(cte.get("ctequery"), (*ctes, visible), selects)
        return (*ctes, frozenset(names))

    def relation(self, rv: dict[str, Any], ctes: tuple[frozenset[str], ...], selects: list[dict[str, Any]], *,
                 target: bool) -> None:
        parts = tuple(p for p in (rv.get("catalogname"), rv.get("schemaname"), rv.get("relname")) if p)
        if len(parts) == 1 and not target and any(parts[0] in scope for scope in ctes):
            return
        rel = self.catalog.resolve(parts, self.search_path)
        if rel is None:
            self.out.unknown.add(".".join(parts))
            return
        qn = rel.qualified_name
        self.out.relations.add(qn)
        if target:
            self.out.targets.add(qn)
        elif self.grants is not None and self.protected(rel):
            self.out.protected.append((qn, selects))

    def protected(self, rel: Relation) -> bool:
        g = self.grants
        assert g is not None
        if rel.schema in BUILTIN_SCHEMAS:
            return rel.qualified_name not in g.catalog_relations
        if rel.qualified_name in g.tables:
            return True
        root = self.catalog.root_of(rel)
        return root.qualified_name in g.tables or any(a in g.tables for a in rel.ancestors)


def read(text: str, catalog: Catalog, search_path: Sequence[str] | None = None,
         grants: StatementGrants | None = None) -> _PgRead:
    """PostgreSQL's reading of ``text``."""
    w = _Walker(catalog, search_path, grants)
    for stmt in _parse(text):
        s = stmt.get("stmt")
        if not isinstance(s, dict) or len(s) != 1:
            raise Disagreement("PostgreSQL reads an empty or unknown statement")
        w.statement(s)
    return w.out


def _compare(pg: _PgRead, ours: Reading) -> Iterator[str]:
    if len(pg.kinds) != len(ours.kinds):
        yield f"PostgreSQL reads {len(pg.kinds)} statement(s), pgwarden {len(ours.kinds)}"
    elif tuple(pg.kinds) != ours.kinds:
        yield f"PostgreSQL reads {', '.join(pg.kinds)}, pgwarden {', '.join(ours.kinds)}"
    if pg.unknown:
        yield f"PostgreSQL reads relation {', '.join(sorted(pg.unknown))}, which pgwarden did not"
    if pg.relations != ours.relations:
        only_pg = sorted(pg.relations - ours.relations)
        only_us = sorted(ours.relations - pg.relations)
        yield "the relations differ (" + "; ".join(
            ([f"only PostgreSQL reads {', '.join(only_pg)}"] if only_pg else [])
            + ([f"only pgwarden reads {', '.join(only_us)}"] if only_us else [])) + ")"
    if tuple(pg.settings) != ours.settings:
        yield f"PostgreSQL sets {', '.join(pg.settings) or 'nothing'}, pgwarden {', '.join(ours.settings) or 'nothing'}"
    if pg.hold != ours.hold:
        yield "the cursors' WITH HOLD differs"


def agree(text: str, ours: Reading, catalog: Catalog, search_path: Sequence[str] | None = None) -> None:
    """Raise Disagreement unless PostgreSQL reads the client's ``text`` as the decision did."""
    pg = read(text, catalog, search_path)
    problems = list(_compare(pg, ours))
    if problems:
        raise Disagreement("; ".join(problems))


def confirm(text: str, ours: Reading, catalog: Catalog, search_path: Sequence[str] | None,
            grants: StatementGrants) -> None:
    """Raise Disagreement unless the text pgwarden sends means, to PostgreSQL, what was decided."""
    pg = read(text, catalog, search_path, grants)
    problems = list(_compare(pg, ours))
    problems.extend(pg.problems)
    if set(pg.targets) - set(ours.targets):
        problems.append(f"PostgreSQL writes {', '.join(sorted(set(pg.targets) - set(ours.targets)))}")
    if any(k not in _TOP_KINDS for k in pg.kinds):
        problems.append(f"statement kind {', '.join(k for k in pg.kinds if k not in _TOP_KINDS)}")
    if pg.protected:
        bodies = {_body_canonical(b) for b in ours.bodies}
        for qn, selects in pg.protected:
            if not any(_canonical(s) in bodies for s in reversed(selects)):
                problems.append(f"protected relation {qn} outside pgwarden's fences")
                break
    for fn in sorted(pg.functions):
        why = call_problem(fn, catalog, search_path, grants)
        if why:
            problems.append(why)
    if problems:
        raise Disagreement("; ".join(problems))
