"""The SQL rewriter: one statement text + one principal's grants -> allow | rewrite to SQL' | refuse.

Theory of operation (DESIGN.md "How a statement is decided")
-------------------------------------------------------------
1. Lex once with sqlglot's PostgreSQL tokenizer; refuse token shapes whose
   regeneration PostgreSQL would read differently (``1_000``, ``0x1F``,
   adjacent string literals).
2. Split into statements at ``;`` tokens. Each statement is first matched by
   :mod:`rules.classify` (utility statements, by strict token patterns), else
   parsed by sqlglot and allow-listed by node type (SELECT-like, INSERT/UPDATE/
   DELETE, COPY ... TO STDOUT). Anything else, including ``exp.Command``, is
   refused: "parsed" is not "understood".
3. :func:`_analyze` walks the tree: every table reference is resolved (CTE
   names shadow tables, PostgreSQL identifier folding, the session
   search_path) against the catalog snapshot; protected relations become
   *hits*; ungranted, unknown, system and view relations are refused; so are
   dangerous or unknown functions, nested data-modifying statements and
   explicit references to hidden columns.
4. Each hit's ``exp.Table`` is replaced by the fenced derived table
   ``(SELECT <all columns, masked/NULL> FROM "s"."t" WHERE <filter> OFFSET 0) AS alias``;
   provably leakproof conjuncts of the user's own query block (``id = 42``) are
   *copied* into that WHERE after the filter, so indexes work through the fence
   (:func:`_pushdown`); the user's predicates themselves stay above it.
5. SQL' is generated from the AST, re-parsed, and analysed again with the
   fences we built treated as opaque: it must contain no unfenced protected
   relation, and every fence must be exactly one we built (pushed conjuncts
   included), or the statement is refused.
6. One meaning (:mod:`rules.pgconfirm`): PostgreSQL's own grammar reads the
   client's text and SQL' again; both must agree with what was read here
   (statements, kinds, relations, settings), and in SQL' every protected
   relation must sit inside a SELECT built here. Any difference refuses
   (``parser_disagreement``).

What is sent for a restricted role is always SQL', never the client's bytes,
also when nothing protected is touched: a text two parsers read differently
must not reach the one that runs it. Everything here is pure; no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import sqlglot
from sqlglot import exp
from sqlglot.dialects.postgres import Postgres
from sqlglot.errors import ErrorLevel, SqlglotError
from sqlglot.tokens import Token, TokenType

from masking.pgtypes import MaskTypeError, parse_pg_type

from .catalog import BUILTIN_SCHEMAS, Catalog, Column, Relation, normalise_identifier
from .classify import Refused, Simple, Wrapped, recognise
from .decision import ALLOW, Decision, refuse
from .pgconfirm import DISAGREEMENT, Disagreement, Reading, agree, confirm
from .functions import refused as function_refused
from .grants import StatementGrants, StatementKind, TableGrant, Treatment
from .lineage import PACKING_AGGREGATES, Lineage
from .records import Unbounded, columns_read, records_per_row

__all__ = ["rewrite", "NOT_UNDERSTOOD"]

DIALECT = "postgres"
NOT_UNDERSTOOD = "pgwarden: statement not understood; refused"
PARSER_DISAGREEMENT = ("pgwarden: PostgreSQL's parser reads this statement differently from pgwarden's analysis "
                       "({}), so it is refused; write it plainly, without nested or unterminated comments or "
                       "unusual quoting")
_DIALECT = Postgres()
_COMMANDS = frozenset(_DIALECT.tokenizer_class.COMMANDS)

_STRINGISH = frozenset({TokenType.STRING, TokenType.NATIONAL_STRING, TokenType.BYTE_STRING,
                        TokenType.HEREDOC_STRING, TokenType.UNICODE_STRING, TokenType.HEX_STRING,
                        TokenType.BIT_STRING, TokenType.RAW_STRING})
#: Nested nodes that are statements of their own (a SELECT must not hide one).
_NESTED_STATEMENTS = (exp.DML, exp.DDL, exp.Command, exp.Copy, exp.Set, exp.Transaction, exp.Commit,
                      exp.Rollback)
#: format_type() names that sqlglot regenerates faithfully in CAST(NULL AS ...).
_CASTABLE = re.compile(
    r"(bigint|integer|smallint|text|boolean|date|jsonb|json|uuid|bytea|real|double precision|inet|interval"
    r"|numeric(\(\d+(,\d+)?\))?|character varying(\(\d+\))?|character(\(\d+\))?"
    r"|timestamp with time zone|timestamp without time zone|time without time zone)(\[\])?\Z")
#: Table args a protected reference may carry; anything else (TABLESAMPLE, ...) is refused.
_TABLE_ARGS = frozenset({"this", "db", "catalog", "alias", "only"})


@dataclass
class _Hit:
    """One protected table reference to be fenced."""

    node: exp.Table
    rel: Relation
    grant: TableGrant
    pushed: list[exp.Expression] = field(default_factory=list)  # leakproof conjuncts copied inside the fence


@dataclass
class _Ctx:
    """Per-statement-text state: inputs plus what was fenced (for verification and the Decision)."""

    grants: StatementGrants
    catalog: Catalog
    search_path: Sequence[str] | None
    fences: dict[str, _Hit] = field(default_factory=dict)  # generated body SQL -> hit
    #: Bodies of subqueries inside row filters we put in a DML WHERE (they read tables raw, by design).
    filter_bodies: set[str] = field(default_factory=set)
    tables: list[str] = field(default_factory=list)
    shadowed: int = 0  # CTE names that shadow catalogued relations
    # What was read, for PostgreSQL's parser to confirm (rules.pgconfirm.Reading).
    kinds: list[str] = field(default_factory=list)
    settings: list[str] = field(default_factory=list)
    hold: bool = False
    search_path_set: tuple[str, ...] | None = None
    client_relations: set[str] = field(default_factory=set)  # in the client's text
    sent_relations: set[str] = field(default_factory=set)  # in the text pgwarden sends
    targets: set[str] = field(default_factory=set)
    #: Protected (relation, column) pairs the statements use; None once a statement's use is not followed (DML).
    read: set[tuple[str, str]] | None = field(default_factory=set)
    weights: list[int] = field(default_factory=list)  # records one result row may carry, per capped statement

    @property
    def role(self) -> str:
        return self.grants.role or "(unnamed)"


# ---------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------


def rewrite(sql: str, grants: StatementGrants, catalog: Catalog,
            search_path: Sequence[str] | None = None, *, max_tokens: int | None = None) -> Decision:
    """Decide one client SQL text (possibly several statements) for one principal's grants.

    ``max_tokens``: a statement longer than that is refused before it is parsed (the analysis
    of one statement must stay bounded, whatever a client sends).
    """
    if grants.unrestricted:
        return ALLOW
    ctx = _Ctx(grants, catalog, search_path)
    try:
        outs = []
        tokens = _tokenize(sql)
        if max_tokens is not None and len(tokens) > max_tokens:
            raise Refused(f"pgwarden: the statement has {len(tokens)} tokens, more than the {max_tokens} pgwarden "
                          "analyses for restricted roles (analysis.max_tokens); split it or use a table of values",
                          reason="statement too complex")
        for chunk in _split(tokens):
            toks, text = _expand(chunk, sql)
            _check_lexemes(toks, text)
            _check_function_tokens(toks, ctx)
            outs.append(_statement(toks, text, ctx))
    except Refused as r:
        return refuse(r.message, reason=r.reason)
    except (SqlglotError, RecursionError, ValueError, TypeError, AttributeError, KeyError) as e:
        return refuse(f"{NOT_UNDERSTOOD} (analysis failed)", reason=f"rewriter error: {e!r}"[:300])
    text = ";\n".join(text for _, text in outs)
    kinds, settings = tuple(ctx.kinds), tuple(ctx.settings)
    sent = Reading(kinds, frozenset(ctx.sent_relations), frozenset(ctx.fences) | frozenset(ctx.filter_bodies),
                   frozenset(ctx.targets), settings, ctx.hold, ctx.search_path_set)
    try:
        agree(sql, Reading(kinds, frozenset(ctx.client_relations), settings=settings, hold=ctx.hold), catalog,
              search_path)
        confirm(text, sent, catalog, search_path, grants)
    except Disagreement as e:
        return refuse(PARSER_DISAGREEMENT.format(str(e)[:300]), reason=f"{DISAGREEMENT}: {e}"[:500])
    if not any(touched for touched, _ in outs):
        return Decision("allow", sql=text, reason="nothing protected; pgwarden's own text of it is sent",
                        reading=sent)
    tables = tuple(dict.fromkeys(ctx.tables))
    read = frozenset(f"{t}.{c}" for t, c in ctx.read) if ctx.read is not None else None
    return Decision("rewrite", sql=text, reason="protected tables replaced by policy derived tables", tables=tables,
                    reading=sent, records_per_row=max(ctx.weights, default=1), columns_read=read)


def _tokenize(sql: str) -> list[Token]:
    try:
        return _DIALECT.tokenize(sql)
    except SqlglotError as e:
        raise Refused(f"{NOT_UNDERSTOOD} (cannot tokenize)", reason=str(e)[:200]) from None


def _split(tokens: list[Token]) -> Iterator[list[Token]]:
    """Statements at top-level semicolons (the tokenizer already consumed strings and comments)."""
    chunk: list[Token] = []
    for t in tokens:
        if t.token_type == TokenType.SEMICOLON:
            if chunk:
                yield chunk
            chunk = []
        else:
            chunk.append(t)
    if chunk:
        yield chunk


def _expand(chunk: list[Token], sql: str) -> tuple[list[Token], str]:
    """Undo the tokenizer's command quirk: after EXPLAIN/SHOW/FETCH/PREPARE/... at a statement's
    start it swallows the rest of the statement as one STRING token; re-tokenize that text.

    Returns the statement's tokens and the text their positions refer to.
    """
    for i in range(1, len(chunk)):
        if chunk[i].token_type in _COMMANDS and chunk[i - 1].token_type == TokenType.BEGIN:
            raise Refused(f"{NOT_UNDERSTOOD} ({chunk[i].text} after BEGIN)")
    if chunk[0].token_type in _COMMANDS and len(chunk) == 2 and chunk[1].token_type == TokenType.STRING:
        rest = chunk[1].text
        head = Token(TokenType.VAR, chunk[0].text, start=0, end=-1)
        return [head, *_tokenize(rest)], rest
    return chunk, sql


def _check_lexemes(tokens: list[Token], sql: str) -> None:
    """Refuse token shapes sqlglot reads differently from PostgreSQL (regeneration would change them)."""
    for i, t in enumerate(tokens):
        raw = sql[t.start:t.end + 1]
        if t.token_type == TokenType.NUMBER:
            after = sql[t.end + 1:t.end + 2]
            if after and (after.isalnum() or after in "_$\"'"):
                raise Refused(f"{NOT_UNDERSTOOD} (numeric literal {raw}{after}...)")
        if t.token_type in (TokenType.HEX_STRING, TokenType.BIT_STRING) and raw[:1] == "0":
            raise Refused(f"{NOT_UNDERSTOOD} (integer literal {raw})")
        if t.token_type in _STRINGISH and i + 1 < len(tokens) and tokens[i + 1].token_type in _STRINGISH:
            raise Refused(f"{NOT_UNDERSTOOD} (adjacent string literals)")


# ---------------------------------------------------------------------------
# one statement
# ---------------------------------------------------------------------------


def _require_kind(kind: StatementKind, ctx: _Ctx) -> None:
    if kind not in ctx.grants.kinds:
        raise Refused(f"pgwarden: role {ctx.role} may not run {kind.value.upper()} statements")


def _parse(chunk: list[Token], sql: str) -> exp.Expression:
    """sqlglot's parser on one statement's tokens; exactly one expression or refuse."""
    try:
        trees = _DIALECT.parser().parse(chunk, sql)
    except SqlglotError as e:
        raise Refused(f"{NOT_UNDERSTOOD} (cannot parse)", reason=str(e)[:200]) from None
    trees = [t for t in trees if t is not None]
    if len(trees) != 1:
        raise Refused(NOT_UNDERSTOOD)
    return trees[0]


def _statement(chunk: list[Token], sql: str, ctx: _Ctx) -> tuple[bool, str]:
    """(touches protected data?, verified SQL text to send if anything in the batch is rewritten)."""
    known = recognise(chunk, sql)
    if isinstance(known, Simple):
        _require_kind(known.kind, ctx)
        ctx.kinds.append(known.node)
        if known.setting is not None:
            ctx.settings.append(known.setting)
        if known.search_path is not None:
            ctx.search_path_set = known.search_path
        return False, known.sql
    if isinstance(known, Wrapped):
        _require_kind(known.kind, ctx)
        ctx.kinds.append(known.node)
        ctx.hold = ctx.hold or known.hold
        tree = _parse(known.inner, sql)
        if not _is_query(tree):
            raise Refused(f"pgwarden: only a query may follow {known.prefix.split()[0]}; refused")
        if known.kind != StatementKind.SELECT:
            _require_kind(StatementKind.SELECT, ctx)
        touched, text = _query_statement(tree, ctx)
        return touched, known.prefix + text
    tree = _parse(chunk, sql)
    if _is_query(tree):
        _require_kind(StatementKind.SELECT, ctx)
        ctx.kinds.append("SelectStmt")
        return _query_statement(tree, ctx)
    if isinstance(tree, (exp.Insert, exp.Update, exp.Delete)):
        ctx.kinds.append(f"{type(tree).__name__}Stmt")
        return _dml_statement(tree, ctx)
    if isinstance(tree, exp.Copy):
        ctx.kinds.append("CopyStmt")
        return _copy_statement(tree, ctx)
    what = tree.name.split()[0].upper() if isinstance(tree, exp.Command) and tree.name else type(tree).__name__
    raise Refused(f"{NOT_UNDERSTOOD} ({what})")


def _is_query(tree: exp.Expression) -> bool:
    return isinstance(tree, (exp.Select, exp.SetOperation, exp.Values, exp.Subquery))


ROW_CAP_MARKER = "pgwarden-row-cap-exceeded:"
# The row cap (R3.2) as SQL: the uncorrelated subquery runs once, before the first row is sent,
# and reads at most limit+1 rows of the (materialised, order-keeping) result; past the limit, a cast
# that depends on the count fails, so PostgreSQL itself refuses the statement and aborts the
# transaction, and the proxy swaps that error for its own 42501. Cursors and Execute with
# max_rows are covered: the check runs on the first fetch, over the whole result.
# The limit is cap // W, W the records one result row may carry (rules.records): rows x W <= cap.
_CAP_TEMPLATE = (
    "WITH pgwarden_capped AS MATERIALIZED (SELECT 1) SELECT * FROM pgwarden_capped WHERE ("
    "SELECT CASE WHEN pg_catalog.count(*) OPERATOR(pg_catalog.>) {limit} "
    "THEN CAST(pg_catalog.textcat('{marker}', CAST(pg_catalog.count(*) AS pg_catalog.text)) "
    "AS pg_catalog.int4) IS NULL ELSE TRUE END "
    "FROM (SELECT 1 FROM pgwarden_capped LIMIT {probe}) AS pgwarden_probe)"
)
_CAP_WEIGHT = re.compile(re.escape(ROW_CAP_MARKER) + r"(\d+)x")


def _capped(tree: exp.Expression, cap: int, weight: int = 1) -> exp.Expression:
    limit = int(cap) // max(1, int(weight))
    marker = ROW_CAP_MARKER if weight <= 1 else f"{ROW_CAP_MARKER}{int(weight)}x"
    wrapper = sqlglot.parse_one(_CAP_TEMPLATE.format(limit=limit, probe=limit + 1, marker=marker), read=DIALECT)
    cte = wrapper.find(exp.CTE)
    assert cte is not None
    cte.set("this", tree)
    return wrapper


def row_cap_weight(message: str) -> int:
    """The records per row a row-cap error (PostgreSQL's cast error on the marker) was raised with."""
    m = _CAP_WEIGHT.search(message)
    return int(m.group(1)) if m else 1


def _records(tree: exp.Expression, hits: list[_Hit], ctx: _Ctx) -> int:
    """What the statement's protected records do (rules.records): the columns it uses, for the audit
    event's ``masked``, and, for a role with a row cap, the most records one result row carries."""
    if not hits:
        return 1
    ids = {id(h.node) for h in hits}
    capped = bool(ctx.grants.row_cap)
    try:
        lin = Lineage(tree, ctx.catalog, ctx.search_path, protected=lambda n, _r: id(n) in ids)
    except (RecursionError, ValueError, TypeError, AttributeError, KeyError, IndexError):
        if capped:
            raise
        ctx.read = None  # what was read is not known: the audit event lists every masked column
        return 1
    if ctx.read is not None:
        try:
            ctx.read |= columns_read(lin)
        except (RecursionError, ValueError, TypeError, AttributeError, KeyError, IndexError):
            ctx.read = None
    if not capped:
        return 1
    try:
        weight = records_per_row(lin)
    except Unbounded:
        raise Refused(f"pgwarden: role {ctx.role} has a row cap of {ctx.grants.row_cap}; a value that carries any "
                      "number of records (array_agg, string_agg, json_agg, ARRAY(SELECT ...)) is refused") from None
    ctx.weights.append(weight)
    return weight


def _query_statement(tree: exp.Expression, ctx: _Ctx) -> tuple[bool, str]:
    """Analyse, fence, generate, verify a SELECT-like statement."""
    shadowed = ctx.shadowed
    ctx.client_relations |= _relations_of(tree, ctx)
    hits = _analyze(tree, ctx)
    if hits and ctx.grants.row_cap and any(w.args.get("recursive") for w in tree.find_all(exp.With)):
        # A recursive CTE can fold any number of rows' values into one result row.
        raise Refused(f"pgwarden: role {ctx.role} has a row cap of {ctx.grants.row_cap}; "
                      "WITH RECURSIVE over protected tables is refused")
    weight = _records(tree, hits, ctx)  # on the client's tree, before the fences replace its tables
    _fence_all(tree, hits, ctx)
    if hits and ctx.grants.row_cap:
        tree = _capped(tree, ctx.grants.row_cap, weight)
    text = _generate(tree)
    _verify(text, ctx, _is_query)
    return bool(hits) or ctx.shadowed > shadowed, text


def _generate(tree: exp.Expression) -> str:
    try:
        return tree.sql(dialect=DIALECT, comments=False, unsupported_level=ErrorLevel.RAISE)
    except SqlglotError as e:
        raise Refused(f"{NOT_UNDERSTOOD} (cannot regenerate)", reason=str(e)[:200]) from None


# ---------------------------------------------------------------------------
# analysis: tables, functions, hidden columns, nested statements
# ---------------------------------------------------------------------------


def _walk(root: exp.Expression, opaque: set[int]) -> Iterator[exp.Expression]:
    """Every node under ``root`` (inclusive), not descending into ``opaque`` nodes (our fences)."""
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in opaque:
            continue
        yield node
        for child in node.iter_expressions():
            stack.append(child)


def _relations_of(root: exp.Expression, ctx: _Ctx) -> set[str]:
    """Every catalogued relation a table reference under ``root`` names (CTEs and table functions aside)."""
    out: set[str] = set()
    for node in root.find_all(exp.Table):
        if node.args.get("rows_from") or not isinstance(node.this, exp.Identifier) or _is_cte_reference(node):
            continue
        rel = ctx.catalog.resolve(_name_parts(node), ctx.search_path)
        if rel is not None:
            out.add(rel.qualified_name)
    return out


def _analyze(root: exp.Expression, ctx: _Ctx, *, opaque: set[int] | None = None,
             skip: set[int] | None = None) -> list[_Hit]:
    """Resolve and check everything under ``root``; the protected table references to fence.

    ``opaque``: ids of fence subqueries (verification); ``skip``: ids of DML target tables.
    """
    opaque = opaque or set()
    skip = skip or set()
    hits: list[_Hit] = []
    for node in _walk(root, opaque):
        if node is not root and isinstance(node, _NESTED_STATEMENTS):
            raise Refused(f"pgwarden: role {ctx.role} may not run a data-modifying or utility statement "
                          f"inside a query; refused")
        if isinstance(node, exp.Select):
            _check_select(node, ctx)
        elif isinstance(node, exp.Table) and id(node) not in skip:
            hit = _table(node, ctx)
            if hit is not None:
                hits.append(hit)
        elif isinstance(node, exp.Func):
            _check_function(node, ctx)
    seen = [h.rel for h in hits] + [ctx.fences[k].rel for k in _fence_keys(root, opaque, ctx)]
    grants = [h.grant for h in hits] + [ctx.fences[k].grant for k in _fence_keys(root, opaque, ctx)]
    _check_hidden(root, opaque, list(zip(seen, grants)), ctx)
    return hits


def _fence_keys(root: exp.Expression, opaque: set[int], ctx: _Ctx) -> list[str]:
    return [k for k in (_body_key(n) for n in root.find_all(exp.Subquery) if id(n) in opaque)
            if k in ctx.fences]


def _check_select(node: exp.Select, ctx: _Ctx) -> None:
    """SELECT INTO creates a table; FOR UPDATE/SHARE locks rows: neither is reading."""
    if node.args.get("into"):
        raise Refused(f"pgwarden: role {ctx.role} may not run SELECT INTO; refused")
    if node.args.get("locks"):
        raise Refused(f"pgwarden: role {ctx.role} may not lock rows (FOR UPDATE/SHARE); refused")


def _is_cte_reference(node: exp.Table) -> bool:
    """True if an unqualified name refers to a visible CTE (PostgreSQL scoping, exact folded names)."""
    if node.args.get("db") or node.args.get("catalog") or not isinstance(node.this, exp.Identifier):
        return False
    name = normalise_identifier(node.this.this, bool(node.this.args.get("quoted")))
    child: exp.Expression = node
    parent = node.parent
    while parent is not None:
        if isinstance(parent, exp.With):
            ctes = list(parent.expressions)
            idx = next((i for i, c in enumerate(ctes) if c is child), len(ctes))
            visible = ctes if parent.args.get("recursive") else ctes[:idx]
            if name in {_cte_name(c) for c in visible}:
                return True
        else:
            w = parent.args.get("with_")
            if isinstance(w, exp.With) and w is not child and name in {_cte_name(c) for c in w.expressions}:
                return True
        child, parent = parent, parent.parent
    return False


def _cte_name(cte: exp.Expression) -> str:
    alias = cte.args.get("alias")
    ident = alias.this if isinstance(alias, exp.TableAlias) else None
    if not isinstance(ident, exp.Identifier):
        return ""
    return normalise_identifier(ident.this, bool(ident.args.get("quoted")))


def _name_parts(node: exp.Table) -> tuple[str, ...]:
    parts: list[str] = []
    for key in ("catalog", "db", "this"):
        ident = node.args.get(key)
        if ident is None:
            continue
        if not isinstance(ident, exp.Identifier):
            raise Refused(f"{NOT_UNDERSTOOD} (table name {node.sql(dialect=DIALECT)})")
        parts.append(normalise_identifier(ident.this, bool(ident.args.get("quoted"))))
    return tuple(parts)


def _table(node: exp.Table, ctx: _Ctx) -> _Hit | None:
    """Resolve one table reference: None (harmless: CTE, table function, readable catalog) or a hit."""
    if node.args.get("rows_from") or isinstance(node.this, exp.Func):
        return None  # a table function: its calls are checked as functions
    if not isinstance(node.this, exp.Identifier):
        raise Refused(f"{NOT_UNDERSTOOD} (table reference {node.sql(dialect=DIALECT)})")
    parts = _name_parts(node)
    if _is_cte_reference(node):
        if ctx.catalog.resolve(parts, ctx.search_path) is not None:
            ctx.shadowed += 1  # never let PostgreSQL re-decide this scoping from the client's text
        return None
    rel = ctx.catalog.resolve(parts, ctx.search_path)
    if rel is None:
        raise Refused(f"pgwarden: relation {'.'.join(parts)} is unknown to pgwarden's catalog; refused")
    hit = _protect(rel, node, ctx)
    if hit is None and not node.args.get("db"):
        # Named with its schema in the text sent, so the server resolves it as pgwarden did,
        # whatever its search_path (the session follows it, but need not be trusted to).
        node.set("db", exp.to_identifier(rel.schema, quoted=True))
        node.set("catalog", None)
    if hit is not None:
        extra = {k for k, v in node.args.items() if v and k not in _TABLE_ARGS}
        if extra:
            raise Refused(f"pgwarden: {', '.join(sorted(extra))} on protected table {rel.qualified_name} "
                          f"is not supported; refused")
    return hit


def _protect(rel: Relation, node: exp.Table, ctx: _Ctx) -> _Hit | None:
    """Default deny: the grant that applies to ``rel`` (itself, else its root/ancestors) or a refusal."""
    qn, g = rel.qualified_name, ctx.grants
    if rel.schema in BUILTIN_SCHEMAS:
        if qn in g.catalog_relations:
            return None
        raise Refused(f"pgwarden: role {ctx.role} may not read system relation {qn}")
    if qn in g.tables:
        return _Hit(node, rel, g.tables[qn])
    root = ctx.catalog.root_of(rel)
    for anc in [root.qualified_name, *sorted(rel.ancestors)]:
        if anc != qn and anc in g.tables:
            return _Hit(node, rel, g.tables[anc])
    if rel.is_view:
        user = {k for k, r in ctx.catalog.relations.items() if r.schema not in BUILTIN_SCHEMAS and not r.is_view}
        deps = ctx.catalog.protected_dependencies(rel, user)
        calls = set(rel.calls) - set(g.allowed_functions)
        if deps or calls:
            what = ", ".join(sorted(deps | calls))
            raise Refused(f"pgwarden: role {ctx.role} may not read view {qn} (it reads {what})")
        return None
    raise Refused(f"pgwarden: role {ctx.role} may not read table {qn}")


def _func_name(node: exp.Func) -> tuple[tuple[str, ...], str]:
    """(schema parts, lower-case name) of a call; typed sqlglot nodes use their SQL name."""
    if isinstance(node, exp.Anonymous):
        name = node.name
    else:
        name = node.sql_name()
    schema: tuple[str, ...] = ()
    parent = node.parent
    if isinstance(parent, exp.Dot) and parent.expression is node:
        schema = tuple(normalise_identifier(p.name, bool(p.args.get("quoted")))
                       for p in parent.this.find_all(exp.Identifier))
        if not schema:
            raise Refused(f"{NOT_UNDERSTOOD} (function call {parent.sql(dialect=DIALECT)})")
    return schema, name.lower()


# Aggregates that put many rows' values into one result row: with them a row cap counts one row
# while the whole table leaves. Refused for roles with a row cap (rules.lineage.PACKING_AGGREGATES).
_ROW_VALUE_AGGREGATES = PACKING_AGGREGATES
# Ordered-set aggregates return one value per fraction: an array of fractions returns many rows' values.
_ORDERED_SET = frozenset({"percentile_disc", "percentile_cont", "percentile_disc_array", "percentile_cont_array"})


def _number_literal(node: exp.Expression | None) -> bool:
    """A plain numeric literal: one fraction, one value (an array or a parameter could be many)."""
    return isinstance(node, exp.Literal) and node.is_number


def _check_function(node: exp.Func, ctx: _Ctx) -> None:
    """Refuse SQL-running/file/setting functions, unknown functions, and user functions not allowed."""
    schema, name = _func_name(node)
    if function_refused(name):
        raise Refused(f"pgwarden: role {ctx.role} may not call function {name}")
    if ctx.grants.row_cap and (name in _ROW_VALUE_AGGREGATES or (
            isinstance(node, exp.Array) and node.find(exp.Select) is not None) or (
            name in _ORDERED_SET and not _number_literal(node.this))):
        raise Refused(f"pgwarden: role {ctx.role} has a row cap of {ctx.grants.row_cap}; aggregates that return "
                      "many rows' values in one row (array_agg, string_agg, json_agg, ARRAY(SELECT ...)) are refused")
    cands = ctx.catalog.resolve_function((*schema, name), ctx.search_path)
    if not cands:
        if isinstance(node, exp.Anonymous) or schema:
            raise Refused(f"pgwarden: function {'.'.join((*schema, name))} is unknown to pgwarden's catalog; refused")
        return  # a construct sqlglot models itself (CAST, CASE, COALESCE, EXTRACT, ...)
    for f in cands:
        if not f.is_builtin and f.qualified_name not in ctx.grants.allowed_functions:
            raise Refused(f"pgwarden: role {ctx.role} may not call function {f.qualified_name}")


_UDF_CACHE: dict[int, tuple[Catalog, frozenset[str]]] = {}


def _udf_names(catalog: Catalog, allowed: frozenset[str]) -> frozenset[str]:
    """Names of non-built-in functions (any schema) that are not allowed: shadowing candidates."""
    cached = _UDF_CACHE.get(id(catalog))
    if cached is None or cached[0] is not catalog:
        names = frozenset(f"{f.name}\0{f.qualified_name}" for fs in catalog.functions.values()
                          for f in fs if not f.is_builtin)
        if len(_UDF_CACHE) > 8:
            _UDF_CACHE.clear()
        _UDF_CACHE[id(catalog)] = cached = (catalog, names)
    return frozenset(n.split("\0")[0] for n in cached[1] if n.split("\0")[1] not in allowed)


def _check_function_tokens(tokens: list[Token], ctx: _Ctx) -> None:
    """Any ``name (`` whose name is a disallowed user function in any schema is refused.

    sqlglot maps calls it knows to typed nodes and loses the spelling
    (``"Lower"(x)`` becomes LOWER(x)), but the allow path forwards the client's
    text: so look at the tokens PostgreSQL will see, fail closed on name clashes.
    """
    bad = _udf_names(ctx.catalog, ctx.grants.allowed_functions)
    if not bad:
        return
    for t, nxt in zip(tokens, tokens[1:]):
        if nxt.token_type != TokenType.L_PAREN or t.token_type in _STRINGISH or t.token_type == TokenType.NUMBER:
            continue
        name = normalise_identifier(t.text, t.token_type == TokenType.IDENTIFIER)
        if name in bad:
            raise Refused(f"pgwarden: role {ctx.role} may not call function {name}")


def _hidden_names(tables: list[tuple[Relation, TableGrant]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for rel, grant in tables:
        for col in rel.columns:
            rule = grant.columns.get(col.name)
            if rule is not None and rule.treatment == Treatment.HIDDEN:
                out.setdefault(col.name, f"{rel.qualified_name}.{col.name}")
    return out


def _check_hidden(root: exp.Expression, opaque: set[int], tables: list[tuple[Relation, TableGrant]],
                  ctx: _Ctx) -> None:
    """Naming a hidden column anywhere (outside our fences) is refused; conservative: by name only."""
    hidden = _hidden_names(tables)
    if not hidden:
        return
    for node in _walk(root, opaque):
        names: list[exp.Identifier] = []
        if isinstance(node, exp.Column) and isinstance(node.this, exp.Identifier):
            names.append(node.this)
        elif isinstance(node, exp.Join):
            if str(node.args.get("method") or "").upper() == "NATURAL":
                raise Refused(f"pgwarden: role {ctx.role} may not NATURAL JOIN a table with hidden columns "
                              f"({', '.join(sorted(hidden.values()))})")
            names.extend(i for i in node.args.get("using") or () if isinstance(i, exp.Identifier))
        elif isinstance(node, exp.Dot) and isinstance(node.expression, exp.Identifier):
            names.append(node.expression)
        for ident in names:
            n = normalise_identifier(ident.this, bool(ident.args.get("quoted")))
            if n in hidden:
                raise Refused(f"pgwarden: role {ctx.role} may not read column {hidden[n]}")


# ---------------------------------------------------------------------------
# the fence
# ---------------------------------------------------------------------------


def _mask_expr(spec: object, column: exp.Expression, pg_type: str) -> exp.Expression:
    """masking.kinds.mask_sql if available; without it, NULL of the column's type (never the value)."""
    try:
        from masking.kinds import mask_sql  # type: ignore[import-not-found]
    except ImportError:
        return _null_of(pg_type, column)
    return mask_sql(spec, column, pg_type)


def _null_of(pg_type: str, column: exp.Expression) -> exp.Expression:
    """CAST(NULL AS type) for types sqlglot regenerates faithfully, else a never-taken CASE of the column."""
    if _CASTABLE.match(pg_type):
        try:
            return exp.Cast(this=exp.Null(), to=exp.DataType.build(pg_type, dialect=DIALECT))
        except SqlglotError:
            pass
    return exp.Case(ifs=[exp.If(this=exp.false(), true=column)])


def _projection(rel: Relation, grant: TableGrant) -> list[exp.Expression]:
    out: list[exp.Expression] = []
    for col in rel.columns:
        ident = exp.to_identifier(col.name, quoted=True)
        ref = exp.Column(this=ident.copy())
        rule = grant.columns.get(col.name)
        treatment = rule.treatment if rule is not None else Treatment.CLEAR
        if treatment == Treatment.CLEAR:
            out.append(ref)
        elif treatment == Treatment.MASK:
            out.append(exp.Alias(this=_mask_expr(rule.mask if rule else None, ref, col.type_name), alias=ident))
        else:
            out.append(exp.Alias(this=_null_of(col.type_name, ref), alias=ident))
    return out


def _filter_columns_ok(rel: Relation, flt: exp.Expression) -> bool:
    """Every column of the filter's own level exists in ``rel`` (else it could bind to an outer query)."""
    names = set(rel.column_names)
    for col in flt.find_all(exp.Column):
        if _inside_subquery(col, flt) or not isinstance(col.this, exp.Identifier):
            continue
        if normalise_identifier(col.this.this, bool(col.this.args.get("quoted"))) not in names:
            return False
    return True


def _inside_subquery(node: exp.Expression, root: exp.Expression) -> bool:
    p = node.parent
    while p is not None and p is not root:
        if isinstance(p, (exp.Select, exp.SetOperation)):
            return True
        p = p.parent
    return False


def _fence_body(rel: Relation, grant: TableGrant, only: bool,
                pushed: Sequence[exp.Expression] = ()) -> exp.Select:
    """SELECT <columns> FROM "schema"."table" WHERE <filter> [AND <pushed>] OFFSET 0: the policy view of ``rel``.

    ``pushed``: leakproof copies of the user's conjuncts (see :func:`_pushdown`), ANDed after the row
    filter so PostgreSQL can use an index; the user's originals stay above the fence.
    """
    if not rel.columns:
        raise Refused(f"pgwarden: protected relation {rel.qualified_name} has no columns in the catalog; refused")
    table = exp.Table(this=exp.to_identifier(rel.name, quoted=True), db=exp.to_identifier(rel.schema, quoted=True))
    if only:
        table.set("only", True)
    body = exp.Select(expressions=_projection(rel, grant), from_=exp.From(this=table))
    conds: list[exp.Expression] = []
    if grant.row_filter is not None:
        flt = grant.row_filter.copy()
        if not _filter_columns_ok(rel, flt):
            raise Refused(f"pgwarden: the row filter for {rel.qualified_name} names a column it does not have; "
                          f"refused", reason=f"bad row filter {grant.reason}")
        conds.append(flt)
    conds.extend(p.copy() for p in pushed)
    if conds:
        body.set("where", exp.Where(this=conds[0] if len(conds) == 1 else exp.and_(*conds, dialect=DIALECT)))
    body.set("offset", exp.Offset(expression=exp.Literal.number(0)))
    return body


def _body_key(sub: exp.Subquery) -> str:
    inner = sub.this
    return inner.sql(dialect=DIALECT, comments=False) if isinstance(inner, exp.Select) else ""


def _fence(hit: _Hit, ctx: _Ctx) -> exp.Subquery:
    """The derived table that replaces ``hit.node``, under the same alias (or the table's own name)."""
    body = _fence_body(hit.rel, hit.grant, bool(hit.node.args.get("only")), hit.pushed)
    ctx.fences[body.sql(dialect=DIALECT, comments=False)] = hit  # what verification expects, pushed conjuncts included
    ctx.tables.append(hit.rel.qualified_name)
    alias = hit.node.args.get("alias")
    alias = alias.copy() if isinstance(alias, exp.TableAlias) else exp.TableAlias(this=hit.node.this.copy())
    return exp.Subquery(this=body, alias=alias)


# ---------------------------------------------------------------------------
# leakproof pushdown: index use without opening the fence
# ---------------------------------------------------------------------------
#
# The OFFSET 0 fence stops PostgreSQL from moving the user's predicates below the row
# filter (where an error or a side effect could reveal a filtered row), but it also stops
# ``WHERE id = 42`` from reaching an index. So a *copy* of a user's conjunct is placed
# inside the fence, next to the row filter, when it is provably leakproof: it cannot fail,
# and has no side effect, whatever the table's rows hold. The original stays above the
# fence (evaluating both is harmless), so the result is unchanged.
#
# Provably leakproof here means exactly these shapes, nothing else:
#   * a top-level AND-conjunct of the same query block's WHERE (the table not on the
#     nullable side of an outer join), or of the ON of an INNER join that the table takes
#     part in; never OUTER joins' ON, HAVING, other query blocks or set operation arms;
#   * ``col <op> const``, ``const <op> col``, ``col IS [NOT] NULL``, ``col IN (const, ...)``,
#     ``col = $n``, ``col = ANY($n)``, with op one of = <> != < <= > >=;
#   * ``col`` a column of this table (qualified by its alias/name, or unqualified while no
#     other FROM item of the block has a column of that name), CLEAR for this role (a
#     predicate on the real value of a masked column would be an oracle), of a built-in type
#     whose pg_catalog comparison operators are marked leakproof;
#   * ``const`` a plain literal of a kind PostgreSQL types into that same type family
#     (no function call, no subquery, no cast of the column), optionally cast to a type of
#     the column's family (a literal cast fails or not regardless of the rows);
#   * a bound parameter occurring once in the statement (its type is inferred as before);
#     the copy pins it to the column's type, ``CAST($n AS type)``, so a client-declared
#     parameter type cannot make PostgreSQL cast the *column* (bigint -> oid fails on some
#     rows: an oracle); because such a cast can round, a bare parameter is pushed for
#     equality only (a rounded equality only widens the copy; a rounded range could narrow it).
# The copy names the column unqualified (only the table is in scope inside the fence) and
# spells the operator OPERATOR(pg_catalog.op), so no search_path object can stand in for it.

#: Comparison node -> (operator, operator with the operands swapped).
_PUSH_OPS: dict[type, tuple[str, str]] = {
    exp.EQ: ("=", "="), exp.NEQ: ("<>", "<>"), exp.LT: ("<", ">"), exp.LTE: ("<=", ">="),
    exp.GT: (">", "<"), exp.GTE: (">=", "<="),
}
#: Column types (format_type text) -> family; the same-family pg_catalog comparison operators
#: (and int2/int4/int8 across each other) are all proleakproof (tests/integration/test_pushdown_pg.py).
_PUSH_TYPES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(smallint|integer|bigint)\Z"), "int"),
    (re.compile(r"(text|character varying(\(\d+\))?)\Z"), "text"),
    (re.compile(r"character(\(\d+\))?\Z"), "bpchar"),
    (re.compile(r"boolean\Z"), "bool"),
    (re.compile(r"date\Z"), "date"),
    (re.compile(r"timestamp(\(\d\))? without time zone\Z"), "timestamp"),
    (re.compile(r"timestamp(\(\d\))? with time zone\Z"), "timestamptz"),
    (re.compile(r"time(\(\d\))? without time zone\Z"), "time"),
    (re.compile(r"uuid\Z"), "uuid"),
)
#: Family -> the type a bare parameter is pinned to (no type modifier: a cast to varchar(n) truncates);
#: for "int" it is the column's own type, for varchar columns varchar.
_PARAM_TYPES = {"text": "text", "bpchar": "bpchar", "bool": "boolean", "date": "date", "timestamp": "timestamp",
                "timestamptz": "timestamptz", "time": "time", "uuid": "uuid"}
#: sqlglot's type of a literal cast -> family (as regenerated: INT is int4, TIMESTAMP is without time zone).
_CAST_FAMILIES = {
    exp.DataType.Type.SMALLINT: "int", exp.DataType.Type.INT: "int", exp.DataType.Type.BIGINT: "int",
    exp.DataType.Type.TEXT: "text", exp.DataType.Type.VARCHAR: "text", exp.DataType.Type.BPCHAR: "bpchar",
    exp.DataType.Type.BOOLEAN: "bool", exp.DataType.Type.DATE: "date",
    exp.DataType.Type.TIMESTAMP: "timestamp", exp.DataType.Type.TIMESTAMPTZ: "timestamptz",
    exp.DataType.Type.TIME: "time", exp.DataType.Type.UUID: "uuid",
}
_INT8_MAX = 2**63 - 1  # a larger integer literal is numeric in PostgreSQL (numeric_eq is not leakproof)
_DIGITS = re.compile(r"[0-9]+\Z")
_PARAM = re.compile(r"[1-9][0-9]*\Z")
_MAX_IN_LIST = 64
_BUILTIN_TYPE_OID_LIMIT = 16384  # FirstNormalObjectId: built-in types have smaller OIDs


def _fence_all(root: exp.Expression, hits: list[_Hit], ctx: _Ctx) -> None:
    """Replace every hit by its fence; the leakproof conjuncts are found first, on the untouched tree."""
    for hit in hits:
        hit.pushed = _pushdown(hit, root, ctx)
    for hit in hits:
        hit.node.replace(_fence(hit, ctx))


@dataclass
class _Block:
    """The FROM items of the query block a hit sits in."""

    select: exp.Select
    sources: list[exp.Expression]  # FROM item, then each JOIN's item
    pos: int  # the hit's index in ``sources``
    joins: list[exp.Join]


def _pushdown(hit: _Hit, root: exp.Expression, ctx: _Ctx) -> list[exp.Expression]:
    """Leakproof copies (column unqualified) of the conjuncts that restrict ``hit`` in its own block."""
    alias = hit.node.args.get("alias")
    if isinstance(alias, exp.TableAlias) and alias.columns:
        return []  # columns renamed by the alias: keep it simple
    block = _block_of(hit.node)
    if block is None:
        return []
    nullable = _nullable(block.joins)
    if nullable is None:
        return []
    conjuncts: list[exp.Expression] = []
    where = block.select.args.get("where")
    if where is not None and block.pos not in nullable:
        conjuncts.extend(_conjuncts(where.this))
    for k, join in enumerate(block.joins, start=1):
        on = join.args.get("on")
        if on is None or not _is_inner_on(join):
            continue
        if k == block.pos or (k > block.pos and block.pos not in nullable):
            conjuncts.extend(_conjuncts(on))
    out: dict[str, exp.Expression] = {}
    for c in conjuncts:
        p = _leakproof_copy(c, hit, block, root, ctx)
        if p is not None:
            out.setdefault(p.sql(dialect=DIALECT), p)
    return list(out.values())


def _block_of(node: exp.Table) -> _Block | None:
    """The SELECT whose FROM (or one of whose JOINs) is ``node`` itself; None anywhere else."""
    parent = node.parent
    select = parent.parent if parent is not None else None
    if not isinstance(select, exp.Select) or not isinstance(select.args.get("from_"), exp.From):
        return None
    joins = list(select.args.get("joins") or [])
    sources = [select.args["from_"].this, *(j.this for j in joins)]
    if isinstance(parent, exp.From) and select.args["from_"] is parent:
        pos = 0
    elif isinstance(parent, exp.Join) and any(j is parent for j in joins):
        pos = 1 + next(i for i, j in enumerate(joins) if j is parent)
    else:
        return None
    if sources[pos] is not node:
        return None
    return _Block(select, sources, pos, joins)


def _nullable(joins: list[exp.Join]) -> set[int] | None:
    """Indexes of FROM items an outer join may null-extend (conservative); None: a join not understood."""
    out: set[int] = set()
    for k, join in enumerate(joins, start=1):
        side = str(join.args.get("side") or "").upper()
        kind = str(join.args.get("kind") or "").upper()
        if kind not in ("", "INNER", "OUTER", "CROSS"):
            return None
        if side == "LEFT":
            out.add(k)
        elif side == "RIGHT":
            out.update(range(k))
        elif side == "FULL":
            out.update(range(k + 1))
        elif side or kind == "OUTER":
            return None
    return out


def _is_inner_on(join: exp.Join) -> bool:
    kind = str(join.args.get("kind") or "").upper()
    return (not join.args.get("side") and kind in ("", "INNER") and not join.args.get("method")
            and not join.args.get("using") and join.args.get("on") is not None)


def _conjuncts(node: exp.Expression) -> list[exp.Expression]:
    while isinstance(node, exp.Paren):
        node = node.this
    if isinstance(node, exp.And):
        return _conjuncts(node.this) + _conjuncts(node.expression)
    return [node]


def _leakproof_copy(cond: exp.Expression, hit: _Hit, block: _Block, root: exp.Expression,
                    ctx: _Ctx) -> exp.Expression | None:
    """The pushed form of one conjunct, or None if it is not one of the provably leakproof shapes."""
    negated = isinstance(cond, exp.Not)
    test = cond.this if negated else cond
    if isinstance(test, exp.Is) and isinstance(test.this, exp.Column) and isinstance(test.expression, exp.Null) \
            and set(k for k, v in test.args.items() if v is not None) <= {"this", "expression", "negate"}:
        name = _own_column(test.this, hit, block, ctx)
        if name is None:
            return None
        out: exp.Expression = exp.Is(this=_bare(name), expression=exp.Null())
        if test.args.get("negate"):
            out.set("negate", True)
        return exp.Not(this=out) if negated else out
    if negated:
        return None
    if isinstance(cond, exp.In):
        return _in_copy(cond, hit, block, root, ctx)
    ops = _PUSH_OPS.get(type(cond))
    if ops is None:
        return None
    left, right = cond.this, cond.expression
    if isinstance(left, exp.Column):
        col, other, op = left, right, ops[0]
    elif isinstance(right, exp.Column):
        col, other, op = right, left, ops[1]
    else:
        return None
    name = _own_column(col, hit, block, ctx)
    family = _family(hit.rel, name) if name is not None else None
    if name is None or family is None:
        return None
    if isinstance(other, exp.Any):
        inner = other.this.this if isinstance(other.this, exp.Paren) else other.this
        if op != "=" or col is not left or not _param_once(inner, root):
            return None
        array = exp.DataType.build(family[1] + "[]", dialect=DIALECT)
        value = exp.Any(this=exp.Paren(this=exp.Cast(this=inner.copy(), to=array)))
    else:
        value = _value_copy(other, family, op, root)
        if value is None:
            return None
    return exp.Operator(this=_bare(name), operator=f"pg_catalog.{op}", expression=value)


def _in_copy(cond: exp.In, hit: _Hit, block: _Block, root: exp.Expression, ctx: _Ctx) -> exp.Expression | None:
    """``col IN (c1, c2)`` -> ``(col OPERATOR(pg_catalog.=) c1 OR col OPERATOR(pg_catalog.=) c2)``.

    Not ``= ANY(ARRAY[...])``: an array of untyped literals is text[], which a date column cannot compare to.
    """
    if set(k for k, v in cond.args.items() if v) != {"this", "expressions"} or not isinstance(cond.this, exp.Column):
        return None
    items = list(cond.expressions)
    if not items or len(items) > _MAX_IN_LIST:
        return None
    name = _own_column(cond.this, hit, block, ctx)
    family = _family(hit.rel, name) if name is not None else None
    if name is None or family is None:
        return None
    ors: list[exp.Expression] = []
    for item in items:
        value = _value_copy(item, family, "=", root)
        if value is None:
            return None
        ors.append(exp.Operator(this=_bare(name), operator="pg_catalog.=", expression=value))
    return ors[0] if len(ors) == 1 else exp.Paren(this=exp.or_(*ors, dialect=DIALECT))


def _bare(name: str) -> exp.Column:
    return exp.Column(this=exp.to_identifier(name, quoted=True))


def _own_column(col: exp.Column, hit: _Hit, block: _Block, ctx: _Ctx) -> str | None:
    """The catalog name of the hit's CLEAR column ``col`` unambiguously refers to, else None."""
    ident = col.this
    if not isinstance(ident, exp.Identifier) or col.args.get("db") or col.args.get("catalog"):
        return None
    name = normalise_identifier(ident.this, bool(ident.args.get("quoted")))
    if name not in hit.rel.column_names:
        return None
    rule = hit.grant.columns.get(name)
    if rule is not None and rule.treatment != Treatment.CLEAR:
        return None  # masked or hidden: a predicate on the real value inside the fence is an oracle
    qual = col.args.get("table")
    if qual is not None:
        if not isinstance(qual, exp.Identifier):
            return None
        return name if normalise_identifier(qual.this, bool(qual.args.get("quoted"))) == _refname(hit.node) else None
    for i, src in enumerate(block.sources):
        if i != block.pos:
            cols = _source_columns(src, ctx)
            if cols is None or name in cols:
                return None  # another FROM item has (or may have) a column of that name
    return name


def _refname(node: exp.Table) -> str:
    """The name the block knows the table by: its alias, else its own (unqualified) name."""
    alias = node.args.get("alias")
    ident = alias.this if isinstance(alias, exp.TableAlias) and isinstance(alias.this, exp.Identifier) else node.this
    return normalise_identifier(ident.this, bool(ident.args.get("quoted")))


def _source_columns(src: exp.Expression, ctx: _Ctx) -> frozenset[str] | None:
    """Column names a FROM item contributes, if it is a catalogued relation; None if unknown."""
    if not isinstance(src, exp.Table) or not isinstance(src.this, exp.Identifier):
        return None
    alias = src.args.get("alias")
    if isinstance(alias, exp.TableAlias) and alias.columns:
        return None
    if any(v for k, v in src.args.items() if k not in _TABLE_ARGS) or _is_cte_reference(src):
        return None
    rel = ctx.catalog.resolve(_name_parts(src), ctx.search_path)
    return frozenset(rel.column_names) if rel is not None else None


def _family(rel: Relation, name: str) -> tuple[str, str] | None:
    """(type family, type a parameter is pinned to) of a column of a built-in type we push for, else None."""
    column = next((c for c in rel.columns if c.name == name), None)
    if column is None or column.type_oid >= _BUILTIN_TYPE_OID_LIMIT:
        return None
    family = next((fam for pat, fam in _PUSH_TYPES if pat.match(column.type_name)), None)
    if family is None:
        return None
    if family == "int":
        return family, column.type_name
    if column.type_name.startswith("character varying"):
        return family, "varchar"  # without its modifier: no truncation; the type a bare $n was inferred as
    return family, _PARAM_TYPES[family]


def _value_copy(node: exp.Expression, fam: tuple[str, str], op: str, root: exp.Expression) -> exp.Expression | None:
    """The pushed right-hand side for a column of family ``fam``: a checked literal, or a pinned parameter."""
    family, param_type = fam
    if type(node) is exp.Cast:
        to = node.args.get("to")
        if set(k for k, v in node.args.items() if v is not None) - {"this", "to"}:
            return None
        if not isinstance(to, exp.DataType) or to.expressions or _CAST_FAMILIES.get(to.this) != family:
            return None
        inner = node.this
        if _param_once(inner, root) or _plain_literal(inner):
            return node.copy()  # the user's own cast of a literal/parameter: same value above and below
        return None
    if _param_once(node, root):
        if op != "=":
            return None  # pinning may round the value: only an equality stays as wide as the original
        return exp.Cast(this=node.copy(), to=exp.DataType.build(param_type, dialect=DIALECT))
    if isinstance(node, exp.Literal) and node.is_string:
        return node.copy()  # untyped: resolved as the column's own type
    if family == "int" and _int_literal(node):
        return node.copy()
    if family == "bool" and isinstance(node, exp.Boolean):
        return node.copy()
    return None


def _int_literal(node: exp.Expression) -> bool:
    """An integer literal PostgreSQL types as int4/int8 (not numeric), optionally negated."""
    if isinstance(node, exp.Neg):
        node = node.this
    return (isinstance(node, exp.Literal) and not node.is_string and bool(_DIGITS.match(str(node.this)))
            and int(node.this) <= _INT8_MAX)


def _plain_literal(node: exp.Expression) -> bool:
    if isinstance(node, exp.Neg):
        node = node.this
        return isinstance(node, exp.Literal) and not node.is_string
    return isinstance(node, (exp.Literal, exp.Boolean))


def _param_once(node: exp.Expression, root: exp.Expression) -> bool:
    """``$n`` that occurs exactly once in the statement (so the copy cannot change its inferred type)."""
    if not isinstance(node, exp.Parameter) or not isinstance(node.this, exp.Literal) \
            or not _PARAM.match(str(node.this.this)):
        return False
    text = node.sql(dialect=DIALECT)
    return sum(1 for p in root.find_all(exp.Parameter) if p.sql(dialect=DIALECT) == text) == 1


# ---------------------------------------------------------------------------
# verification of the regenerated text
# ---------------------------------------------------------------------------


def _verify(text: str, ctx: _Ctx, shape) -> None:  # noqa: ANN001 - predicate on the re-parsed tree
    """Re-parse SQL'; with our fences opaque, nothing protected may remain, and the checks must pass."""
    try:
        trees = [t for t in _DIALECT.parse(text) if t is not None]
    except SqlglotError:
        raise Refused("pgwarden: rewritten statement failed verification", reason="re-parse failed") from None
    if len(trees) != 1 or not shape(trees[0]):
        raise Refused("pgwarden: rewritten statement failed verification", reason="statement shape changed")
    tree = trees[0]
    ctx.sent_relations |= _relations_of(tree, ctx)
    opaque = {id(s) for s in tree.find_all(exp.Subquery)
              if (k := _body_key(s)) and (k in ctx.fences or k in ctx.filter_bodies)}
    try:
        leftover = _analyze(tree, ctx, opaque=opaque, skip=_dml_target_ids(tree))
    except Refused as r:
        raise Refused("pgwarden: rewritten statement failed verification", reason=r.message) from None
    if leftover:
        raise Refused("pgwarden: rewritten statement failed verification",
                      reason=f"unfenced {leftover[0].rel.qualified_name}")


def _dml_target_ids(tree: exp.Expression) -> set[int]:
    if isinstance(tree, (exp.Insert, exp.Update, exp.Delete)):
        target = _dml_target(tree)
        return {id(target)} if target is not None else set()
    return set()


# ---------------------------------------------------------------------------
# INSERT / UPDATE / DELETE
# ---------------------------------------------------------------------------


def _dml_target(tree: exp.Expression) -> exp.Table | None:
    target = tree.this
    if isinstance(target, exp.Schema):
        target = target.this
    return target if isinstance(target, exp.Table) else None


def _dml_statement(tree: exp.Insert | exp.Update | exp.Delete, ctx: _Ctx) -> tuple[bool, str]:
    """DML only where the table grant has the kind, and only on rows the role's row filter admits.

    UPDATE/DELETE: the filter decides which rows are touched *before* the user's predicate sees
    them (see :func:`_guard_where`); an UPDATE may not change the columns the filter reads.
    INSERT: every new row must satisfy the filter (a WITH CHECK, see :func:`_check_insert`).
    RETURNING gives masked columns masked and hidden ones as NULL, like a SELECT would.
    """
    kind = {exp.Insert: StatementKind.INSERT, exp.Update: StatementKind.UPDATE,
            exp.Delete: StatementKind.DELETE}[type(tree)]
    target = _dml_target(tree)
    if target is None or not isinstance(target.this, exp.Identifier):
        raise Refused(f"{NOT_UNDERSTOOD} ({kind.value.upper()} target)")
    rel = ctx.catalog.resolve(_name_parts(target), ctx.search_path)
    if rel is None:
        raise Refused(f"pgwarden: relation {'.'.join(_name_parts(target))} is unknown to pgwarden's catalog; refused")
    grant = ctx.grants.tables.get(ctx.catalog.root_of(rel).qualified_name) or ctx.grants.tables.get(rel.qualified_name)
    if grant is None or kind not in grant.kinds or kind not in ctx.grants.kinds or rel.is_view:
        raise Refused(f"pgwarden: role {ctx.role} may not {kind.value.upper()} table {rel.qualified_name}")
    if tree.args.get("conflict") is not None:
        raise Refused(f"pgwarden: role {ctx.role} may not use ON CONFLICT; refused")
    ctx.client_relations |= _relations_of(tree, ctx)
    ctx.targets.add(rel.qualified_name)
    ctx.read = None  # a write's use of columns is not followed: its event lists every masked column
    masked_returning = _check_dml_columns(tree, target, rel, grant, ctx)
    hits = _analyze(tree, ctx, skip={id(target)})
    _fence_all(tree, hits, ctx)
    if grant.row_filter is not None:
        if not _filter_columns_ok(rel, grant.row_filter):
            raise Refused(f"pgwarden: the row filter for {rel.qualified_name} names a column it does not have; "
                          "refused")
        if isinstance(tree, exp.Insert):
            _check_insert(tree, rel, grant, ctx)
        else:
            if isinstance(tree, exp.Update):
                _check_set_columns(tree, rel, grant, ctx)
            _guard_where(tree, target, grant, ctx)
    _mask_returning(tree, target, rel, grant, masked_returning)
    ctx.tables.append(rel.qualified_name)
    text = _generate(tree)
    _verify(text, ctx, lambda t: type(t) is type(tree))
    return True, text


def _target_qualifier(target: exp.Table) -> exp.Identifier:
    alias = target.args.get("alias")
    qual = alias.this if isinstance(alias, exp.TableAlias) and alias.this else target.this
    return qual.copy()


def _column_name(col: exp.Column) -> str | None:
    ident = col.this
    if not isinstance(ident, exp.Identifier):
        return None
    return normalise_identifier(ident.this, bool(ident.args.get("quoted")))


def _returning_column(item: exp.Expression, target: exp.Table) -> tuple[exp.Column, exp.Identifier | None] | None:
    """A RETURNING item that is just a column of the target (optionally aliased), else None."""
    alias = item.args.get("alias") if isinstance(item, exp.Alias) else None
    col = item.this if isinstance(item, exp.Alias) else item
    if not isinstance(col, exp.Column) or col.args.get("db") or col.args.get("catalog"):
        return None
    if col.table and normalise_identifier(col.table, False) != _target_qualifier(target).name \
            and col.table != _target_qualifier(target).name:
        return None
    return col, alias


def _check_dml_columns(tree: exp.Expression, target: exp.Table, rel: Relation, grant: TableGrant,
                       ctx: _Ctx) -> set[int]:
    """In DML the target's columns are raw: naming a masked/hidden one (WHERE, SET) is an oracle.

    The exception is a RETURNING item that is nothing but such a column: it comes back masked
    (:func:`_mask_returning`). Returns the ids of those items.
    """
    protected = {c: f"{rel.qualified_name}.{c}" for c, r in grant.columns.items()
                 if r.treatment != Treatment.CLEAR}
    returning = tree.args.get("returning")
    ok: set[int] = set()
    if returning is not None:
        for item in returning.expressions:
            if isinstance(item, exp.Star) or (isinstance(item, exp.Column) and isinstance(item.this, exp.Star)):
                if protected and (tree.args.get("from_") is not None or tree.args.get("using")):
                    raise Refused(f"pgwarden: role {ctx.role} may not use RETURNING * with FROM/USING on "
                                  f"{rel.qualified_name}; name the columns")
                ok.add(id(item))
                continue
            found = _returning_column(item, target)
            if found is not None:
                ok.add(id(found[0]))
    if not protected:
        return ok
    qual = normalise_identifier(_target_qualifier(target).name, False)
    # An INSERT's source (and WITH) cannot see the new row: their columns are other tables' (fenced).
    elsewhere = {id(c) for part in (tree.args.get("expression"), tree.args.get("with"))
                 if isinstance(tree, exp.Insert) and part is not None for c in part.find_all(exp.Column)}
    for col in tree.find_all(exp.Column):
        n = _column_name(col)
        if n not in protected or id(col) in ok or id(col) in elsewhere:
            continue
        # Inside a subquery too: `(SELECT phone)` is a correlated reference to the raw target row.
        # Only a column qualified with another table's name is surely not the target's.
        if col.table and normalise_identifier(col.table, False) != qual and _inside_subquery(col, tree):
            continue
        raise Refused(f"pgwarden: role {ctx.role} may not use column {protected[n]} in "
                      f"{type(tree).__name__.upper()}" + (" (qualify a column of another table with its name)"
                                                          if _inside_subquery(col, tree) else ""))
    return ok


def _mask_returning(tree: exp.Expression, target: exp.Table, rel: Relation, grant: TableGrant,
                    items: set[int]) -> None:
    """RETURNING shows what a SELECT of the row would: masked values, NULL for hidden columns."""
    returning = tree.args.get("returning")
    if returning is None or not items:
        return
    qual = _target_qualifier(target)
    out: list[exp.Expression] = []
    for item in returning.expressions:
        if id(item) in items and (isinstance(item, exp.Star) or isinstance(item.this, exp.Star)):
            for c in rel.columns:
                out.append(_masked_column(rel, grant, c.name, qual, None))
            continue
        found = _returning_column(item, target)
        if found is not None and id(found[0]) in items:
            col, alias = found
            name = _column_name(col)
            if name is not None and rel.column(name) is not None:
                out.append(_masked_column(rel, grant, name, qual, alias))
                continue
        out.append(item)
    returning.set("expressions", out)


def _masked_column(rel: Relation, grant: TableGrant, name: str, qual: exp.Identifier,
                   alias: exp.Identifier | None) -> exp.Expression:
    col = rel.column(name)
    assert col is not None
    ident = exp.to_identifier(name, quoted=True)
    ref = exp.Column(this=ident.copy(), table=qual.copy())
    rule = grant.columns.get(name)
    treatment = rule.treatment if rule is not None else Treatment.CLEAR
    if treatment == Treatment.CLEAR:
        return exp.Alias(this=ref, alias=alias.copy()) if alias is not None else ref
    value = _mask_expr(rule.mask if rule else None, ref, col.type_name) if treatment == Treatment.MASK \
        else _null_of(col.type_name, ref)
    return exp.Alias(this=value, alias=(alias or ident).copy())


def _filter_column_names(flt: exp.Expression) -> set[str]:
    return {n for c in flt.find_all(exp.Column) if not _inside_subquery(c, flt) and (n := _column_name(c))}


def _check_set_columns(tree: exp.Update, rel: Relation, grant: TableGrant, ctx: _Ctx) -> None:
    """An UPDATE may not move a row out of (or into) what the role may see: the filter's columns stay."""
    assert grant.row_filter is not None
    decided_by = _filter_column_names(grant.row_filter)
    for assignment in tree.expressions:
        lhs = assignment.this if isinstance(assignment, exp.EQ) else None
        if not isinstance(lhs, exp.Column):
            raise Refused(f"{NOT_UNDERSTOOD} (UPDATE SET)")
        n = _column_name(lhs)
        if n is None or n in decided_by:
            raise Refused(f"pgwarden: role {ctx.role} may not change column {rel.qualified_name}.{n}: "
                          "the role's row filter reads it")


def _qualified_filter(grant: TableGrant, qual: exp.Identifier) -> exp.Expression:
    assert grant.row_filter is not None
    flt = grant.row_filter.copy()
    for col in list(flt.find_all(exp.Column)):
        if not _inside_subquery(col, flt) and not col.table:
            col.set("table", qual.copy())
    return flt


def _guard_where(tree: exp.Update | exp.Delete, target: exp.Table, grant: TableGrant, ctx: _Ctx) -> None:
    """WHERE <filter> AND CASE WHEN <filter> THEN (<user predicate>) ELSE FALSE END.

    ANDing the filter alone is not a fence: PostgreSQL orders quals by cost, so a user's
    ``content::int = 1`` could run on rows the filter drops and echo them in an error. CASE
    evaluates its THEN only where the WHEN held; the plain conjunct lets the filter use an index.
    """
    qual = _target_qualifier(target)
    where = tree.args.get("where")
    flt = _qualified_filter(grant, qual)
    ctx.filter_bodies.update(k for sub in flt.find_all(exp.Subquery) if (k := _body_key(sub)))
    if where is None:
        tree.set("where", exp.Where(this=flt))
        return
    guarded = exp.Case(ifs=[exp.If(this=exp.Paren(this=_qualified_filter(grant, qual)),
                                   true=exp.Paren(this=where.this))], default=exp.false())
    tree.set("where", exp.Where(this=exp.and_(exp.Paren(this=flt), guarded)))


ROW_CHECK_MARKER = "pgwarden-row-check-failed:"
# A new row outside the role's row filter makes this cast fail, so PostgreSQL refuses the whole
# INSERT (nothing is written) and the proxy swaps the error for its own 42501. The argument is
# not constant (statement_timestamp() is stable), so the planner cannot fold the cast early.
_CHECK_FAILED = ("CAST(pg_catalog.concat('" + ROW_CHECK_MARKER + "', pg_catalog.statement_timestamp()) "
                 "AS pg_catalog.int4) IS NULL")

#: Column defaults the check may evaluate itself: they give the same value here as in the row.
_SAFE_DEFAULTS = (exp.Literal, exp.Boolean, exp.Null, exp.CurrentTimestamp, exp.CurrentDate, exp.Cast,
                  exp.DataType, exp.Neg, exp.Paren)
_SAFE_DEFAULT_FUNCS = frozenset({"now", "statement_timestamp", "transaction_timestamp"})


def _default_value(col: Column, rel: Relation, ctx: _Ctx) -> exp.Expression:
    """What PostgreSQL stores in a column the INSERT leaves out, for the check to read."""
    why = f"pgwarden: role {ctx.role} must give column {rel.qualified_name}.{col.name} in the INSERT " \
          "(the role's row filter checks it)"
    if col.computed:
        raise Refused(why)
    if col.default is None:
        return exp.Null()
    try:
        value = sqlglot.parse_one(col.default, read=DIALECT)
    except SqlglotError:
        raise Refused(why) from None
    for node in value.walk():
        if isinstance(node, exp.Anonymous) and node.name.lower() in _SAFE_DEFAULT_FUNCS and not node.expressions:
            continue
        if not isinstance(node, _SAFE_DEFAULTS):
            raise Refused(why)
    return value


def _check_insert(tree: exp.Insert, rel: Relation, grant: TableGrant, ctx: _Ctx) -> None:
    """INSERT ... <source> becomes INSERT ... SELECT new rows FROM (<source>) WHERE <check>.

    Values are cast to the column types (without typmod, so length checks still happen on
    assignment) before the check reads them: the check compares what will be stored.
    """
    assert grant.row_filter is not None
    source = tree.args.get("expression")
    if tree.args.get("default") or source is None:
        raise Refused(f"pgwarden: role {ctx.role} must name the columns of an INSERT into {rel.qualified_name} "
                      "(DEFAULT VALUES cannot be checked against the role's row filter)")
    target = tree.this
    if isinstance(target, exp.Schema):
        names = [_column_name(exp.Column(this=i)) if isinstance(i, exp.Identifier) else None
                 for i in target.expressions]
    else:
        if _is_query(source) and not isinstance(source, exp.Values) \
                and any(isinstance(e, exp.Star) or isinstance(e.this, exp.Star) for e in source.selects):
            raise Refused(f"pgwarden: role {ctx.role} must name the columns of an INSERT ... SELECT * into "
                          f"{rel.qualified_name} (its rows are checked against the role's row filter)")
        width = len(source.expressions[0].expressions) if isinstance(source, exp.Values) and source.expressions \
            and isinstance(source.expressions[0], exp.Tuple) else len(source.selects) if _is_query(source) else 0
        names = [c.name for c in rel.columns[:width]]
    cols: list[Column] = []
    for n in names:
        c = rel.column(n) if n is not None else None
        if c is None:
            raise Refused(f"{NOT_UNDERSTOOD} (INSERT column list)")
        cols.append(c)
    if not cols or len({c.name for c in cols}) != len(cols):
        raise Refused(f"{NOT_UNDERSTOOD} (INSERT column list)")
    types = []
    for c in cols:
        try:
            types.append(parse_pg_type(c.type_name).node())
        except MaskTypeError:
            raise Refused(f"pgwarden: cannot check an INSERT into {rel.qualified_name}.{c.name} "
                          f"(type {c.type_name}); refused") from None
    aliases = [exp.to_identifier(f"pgwarden_c{i}") for i in range(1, len(cols) + 1)]
    new = exp.to_identifier("pgwarden_new")
    if isinstance(source, exp.Values):
        for row in source.expressions:
            if not isinstance(row, exp.Tuple) or len(row.expressions) != len(cols):
                raise Refused(f"{NOT_UNDERSTOOD} (INSERT VALUES)")
            for cell, t in zip(list(row.expressions), types):
                if isinstance(cell, exp.Var) and cell.name.upper() == "DEFAULT":
                    raise Refused(f"pgwarden: role {ctx.role} may not use DEFAULT in VALUES of an INSERT into "
                                  f"{rel.qualified_name}; leave the column out instead")
                cell.replace(exp.Cast(this=cell.copy(), to=t.copy()))
        rows: exp.Expression = exp.Subquery(this=source.copy(), alias=exp.TableAlias(
            this=new.copy(), columns=[a.copy() for a in aliases]))
    elif _is_query(source):
        src = exp.to_identifier("pgwarden_src")
        inner = exp.Select(
            expressions=[exp.Alias(this=exp.Cast(this=exp.Column(this=a.copy(), table=src.copy()), to=t.copy()),
                                   alias=a.copy()) for a, t in zip(aliases, types)],
            from_=exp.From(this=exp.Subquery(this=source.copy(), alias=exp.TableAlias(
                this=src.copy(), columns=[a.copy() for a in aliases]))))
        rows = exp.Subquery(this=inner, alias=exp.TableAlias(this=new.copy()))
    else:
        raise Refused(f"{NOT_UNDERSTOOD} (INSERT source)")
    supplied = {c.name: a for c, a in zip(cols, aliases)}
    check = grant.row_filter.copy()
    for col in list(check.find_all(exp.Column)):
        if _inside_subquery(col, check):
            continue
        n = _column_name(col)
        c = rel.column(n) if n is not None else None
        if c is None:
            raise Refused(f"pgwarden: the row filter for {rel.qualified_name} names a column it does not have; "
                          "refused")
        col.replace(exp.Column(this=supplied[n].copy(), table=new.copy()) if n in supplied
                    else exp.Paren(this=_default_value(c, rel, ctx)))
    ctx.filter_bodies.update(k for sub in check.find_all(exp.Subquery) if (k := _body_key(sub)))
    when = exp.Case(ifs=[exp.If(this=exp.Paren(this=check), true=exp.true())],
                    default=sqlglot.parse_one(_CHECK_FAILED, read=DIALECT))
    select = exp.Select(expressions=[exp.Column(this=a.copy(), table=new.copy()) for a in aliases],
                        from_=exp.From(this=rows), where=exp.Where(this=when))
    if not isinstance(target, exp.Schema):
        tree.set("this", exp.Schema(this=target, expressions=[exp.to_identifier(c.name, quoted=True)
                                                              for c in cols]))
    tree.set("expression", select)


# ---------------------------------------------------------------------------
# COPY ... TO STDOUT
# ---------------------------------------------------------------------------

_COPY_PARAMS = frozenset({"FORMAT", "HEADER", "DELIMITER", "NULL", "QUOTE", "ESCAPE", "ENCODING",
                          "FORCE_QUOTE", "CSV", "BINARY"})


def _copy_statement(tree: exp.Copy, ctx: _Ctx) -> tuple[bool, str]:
    """COPY (query) / COPY table TO STDOUT, with the export right; the query is rewritten like a SELECT."""
    if tree.args.get("kind"):
        raise Refused(f"pgwarden: role {ctx.role} may not COPY ... FROM; refused")
    files = tree.args.get("files") or []
    if len(files) != 1 or not isinstance(files[0], exp.Identifier) or files[0].args.get("quoted") \
            or files[0].name.upper() != "STDOUT":
        raise Refused(f"pgwarden: role {ctx.role} may only COPY ... TO STDOUT; refused")
    if StatementKind.COPY_TO not in ctx.grants.kinds or not ctx.grants.export:
        raise Refused(f"pgwarden: role {ctx.role} may not export data (COPY ... TO)")
    for p in tree.args.get("params") or []:
        if not isinstance(p, exp.CopyParameter) or p.name.upper() not in _COPY_PARAMS:
            raise Refused(f"{NOT_UNDERSTOOD} (COPY option)")
    source = tree.this
    if isinstance(source, (exp.Table, exp.Schema)):
        table = source.this if isinstance(source, exp.Schema) else source
        cols = [exp.Column(this=i.copy()) for i in source.expressions] if isinstance(source, exp.Schema) else []
        query = exp.Select(expressions=cols or [exp.Star()], from_=exp.From(this=table.copy()))
        source = exp.Subquery(this=query)
        tree.set("this", source)
    if not isinstance(source, exp.Subquery) or not _is_query(source.this):
        raise Refused(f"{NOT_UNDERSTOOD} (COPY source)")
    ctx.client_relations |= _relations_of(source.this, ctx)
    hits = _analyze(source.this, ctx)
    _records(source.this, hits, ctx)
    _fence_all(tree, hits, ctx)
    text = _generate(tree)
    _verify(text, ctx, lambda t: isinstance(t, exp.Copy) and isinstance(t.this, exp.Subquery))
    return True, text  # always regenerated: COPY table TO became COPY (query) TO
