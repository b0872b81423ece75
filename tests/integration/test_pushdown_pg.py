"""Leakproof pushdown through the OFFSET 0 fence, checked on a real PostgreSQL with the hotel sample.

The rewriter copies a user's conjunct inside the fence only when it is provably
leakproof (rules/rewrite.py, "leakproof pushdown"). Here PostgreSQL itself shows:

* the copy reaches an index (EXPLAIN: an index node whose Index Cond is the user's
  predicate), which the fence alone prevents;
* the rewritten statement returns exactly the rows of an independent query with the
  row filter written by hand;
* leaky predicates are not copied (a division by zero on a filtered row never fires);
* every form the rewriter emits parses and resolves, and in PostgreSQL's own parse tree
  the column is touched only by operators marked leakproof, whatever type a client
  declares for a parameter (nothing casts the column).
"""

from __future__ import annotations

import dataclasses

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
import sqlglot
from sqlglot import exp

import rules.rewrite as rw
from rules.principal import Principal
from proxy.demo.pgcluster import PgCluster
from rules.catalog import Catalog, load_catalog
from rules.grants import StatementGrants, StatementKind, TableGrant
from rules.model import grants_for, load_rules
from rules.rewrite import rewrite

HOTEL = Path(__file__).resolve().parents[2] / "deploy" / "rules" / "hotel.yaml"
RULES = load_rules(HOTEL)
#: bob's row filter (supervisor, FO), written by hand: the independent oracle for the rows.
BOB_FILTER = ("department = 'FO' AND NOT legal_hold "
              "AND created_at >= statement_timestamp() - interval '72 hours'")
INDEX_NODES = ("Index Scan", "Index Only Scan", "Bitmap Index Scan")


# ---------------------------------------------------------------------------- fixtures and helpers


async def _load_catalog(c: PgCluster) -> Catalog:
    conn = await asyncpg.connect(c.dsn(c.service_user, c.service_password))
    try:
        return await load_catalog(conn)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def catalog(cluster: PgCluster) -> Catalog:
    return asyncio.run(_load_catalog(cluster))


@pytest.fixture(scope="module")
def bob() -> StatementGrants:
    grants, why = grants_for(RULES, Principal(user="bob", role="supervisor", department="FO"))
    assert grants is not None, why
    # Without the row-cap wrapper, so the rewritten text ends with the user's own WHERE.
    return dataclasses.replace(grants, row_cap=None)


def row_filter(grants: StatementGrants) -> str:
    """The fence's WHERE when nothing is pushed: the row filter alone."""
    f = grants.tables["public.cs_records"].row_filter
    assert f is not None
    return f.sql(dialect="postgres")


def rewritten(sql: str, grants: StatementGrants, catalog: Catalog) -> str:
    d = rewrite(sql, grants, catalog)
    assert d.action == "rewrite", d
    assert d.sql is not None
    return d.sql


def fence_where(sql: str) -> list[str]:
    """The WHERE of every fence in ``sql`` (the policy derived tables: ... OFFSET 0)."""
    tree = sqlglot.parse_one(sql, read="postgres")
    out = []
    for sub in tree.find_all(exp.Subquery):
        body = sub.this
        if isinstance(body, exp.Select) and body.args.get("offset") is not None and body.args.get("where"):
            out.append(body.args["where"].this.sql(dialect="postgres"))
    return out


def direct(c: PgCluster, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(c.dsn(c.superuser, c.superuser_password), autocommit=True) as conn:
        return conn.execute(sql).fetchall()


def plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from plan_nodes(child)


def explain(c: PgCluster, sql: str) -> list[dict[str, Any]]:
    """EXPLAIN (FORMAT JSON) as the superuser, directly on the cluster: every plan node."""
    (row,) = direct(c, "EXPLAIN (FORMAT JSON) " + sql)
    doc = row[0] if not isinstance(row[0], str) else json.loads(row[0])
    return list(plan_nodes(doc[0]["Plan"]))


def explain_text(c: PgCluster, sql: str) -> str:
    return "\n".join(r[0] for r in direct(c, "EXPLAIN " + sql))


def index_conds(nodes: list[dict[str, Any]], column: str) -> list[tuple[str, str, str]]:
    """(node type, index, Index Cond) of the index nodes on cs_records partitions that test ``column``."""
    return [(n["Node Type"], n.get("Index Name", ""), n.get("Index Cond", "")) for n in nodes
            if n["Node Type"] in INDEX_NODES and n.get("Index Name", "").startswith("cs_records_")
            and re.search(rf"\b{column} = ", n.get("Index Cond", ""))]


@pytest.fixture(scope="module")
def samples(cluster: PgCluster) -> dict[str, Any]:
    """A record bob may see (its guest, its category), and a recent record of another department he may not."""
    seen = direct(cluster, f"SELECT id, guest_id, category FROM cs_records WHERE {BOB_FILTER} ORDER BY id LIMIT 1")
    other = direct(cluster, "SELECT id FROM cs_records WHERE department <> 'FO' "
                            "AND created_at >= statement_timestamp() - interval '72 hours' ORDER BY id LIMIT 1")
    assert seen and other, "the sample has recent records of FO and of another department"
    return {"visible_id": seen[0][0], "visible_guest": seen[0][1], "visible_category": seen[0][2],
            "hidden_id": other[0][0]}


# ---------------------------------------------------------------------------- index use, same rows


@pytest.mark.parametrize("where, column", [
    ("id = 4242", "id"),
    ("guest_id = 17", "guest_id"),
    ("id = {visible_id}", "id"),
    ("guest_id = {visible_guest}", "guest_id"),
    ("cs_records.id = {hidden_id}", "id"),
])
def test_selective_lookup_uses_an_index_and_returns_the_same_rows(
        where: str, column: str, cluster: PgCluster, catalog: Catalog, bob: StatementGrants,
        samples: dict[str, Any]) -> None:
    template, where = where, where.format(**samples)
    value = where.split("=")[1].strip()
    sql = rewritten(f"SELECT id, category FROM cs_records WHERE {where}", bob, catalog)
    (inside,) = fence_where(sql)
    assert inside == f'({row_filter(bob)}) AND "{column}" OPERATOR(pg_catalog.=) {value}', inside
    assert sql.endswith(f"OFFSET 0) AS cs_records WHERE {where}")  # the original stays above the fence

    hits = index_conds(explain(cluster, sql), column)
    assert hits, explain_text(cluster, sql)
    assert all(f"{column} = '{value}'" in cond or f"{column} = {value}" in cond for _, _, cond in hits), hits

    got = sorted(direct(cluster, sql))
    want = sorted(direct(cluster, f"SELECT id, category FROM cs_records WHERE {BOB_FILTER} AND {where}"))
    assert got == want
    if "{visible" in template:
        assert got, "the visible sample row comes back"
    if "{hidden" in template:  # another department's record: it exists, and bob does not get it
        assert got == [] and direct(cluster, f"SELECT count(*) FROM cs_records WHERE id = {value}")[0][0] == 1


def test_without_pushdown_the_fence_hides_the_index(cluster: PgCluster, catalog: Catalog, bob: StatementGrants,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The baseline the pushdown fixes: the same statement, nothing pushed, has no index condition on id."""
    monkeypatch.setattr(rw, "_pushdown", lambda hit, root, ctx: [])
    sql = rewritten("SELECT id, category FROM cs_records WHERE id = 4242", bob, catalog)
    assert fence_where(sql) == [row_filter(bob)]
    assert index_conds(explain(cluster, sql), "id") == []


def test_parameters_are_pushed_pinned_to_the_column_type(cluster: PgCluster, catalog: Catalog,
                                                         bob: StatementGrants, samples: dict[str, Any]) -> None:
    category = samples["visible_category"]
    sql = rewritten(f"SELECT c.id, c.category FROM cs_records c WHERE c.id = $1 AND c.category = '{category}'",
                    bob, catalog)
    (inside,) = fence_where(sql)
    assert inside == (f"""({row_filter(bob)}) AND "id" OPERATOR(pg_catalog.=) CAST($1 AS BIGINT) """
                      f"""AND "category" OPERATOR(pg_catalog.=) '{category}'"""), inside
    any_sql = rewritten("SELECT id FROM cs_records WHERE id = ANY($1)", bob, catalog)
    (inside_any,) = fence_where(any_sql)
    assert inside_any.endswith('AND "id" OPERATOR(pg_catalog.=) ANY(CAST($1 AS BIGINT[]))'), inside_any
    ids = [samples["visible_id"], samples["hidden_id"], 4242]

    async def run() -> tuple[list[Any], list[Any], list[Any], str]:
        conn = await asyncpg.connect(cluster.dsn(cluster.superuser, cluster.superuser_password))
        try:
            one = [tuple(r) for r in await conn.fetch(sql, samples["visible_id"])]
            many = sorted(r[0] for r in await conn.fetch(any_sql, ids))
            # a client may declare another type for $1: the copy pins it, the result is unchanged
            await conn.execute(f"PREPARE q (numeric) AS {sql}")
            declared = [tuple(r) for r in await conn.fetch(f"EXECUTE q ({samples['visible_id']})")]
            await conn.execute("DEALLOCATE q")
            plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + any_sql, ids))
            return one, many, declared, plan
        finally:
            await conn.close()

    one, many, declared, plan = asyncio.run(run())
    want_one = direct(cluster, f"SELECT id, category FROM cs_records WHERE {BOB_FILTER} "
                               f"AND id = {samples['visible_id']} AND category = '{category}'")
    assert sorted(one) == sorted(want_one) == sorted(declared) and len(one) == 1
    want_many = direct(cluster, f"SELECT id FROM cs_records WHERE {BOB_FILTER} AND id IN ({', '.join(map(str, ids))}) "
                                "ORDER BY id")
    assert many == [r[0] for r in want_many] and samples["visible_id"] in many
    assert re.search(r"Index Scan using cs_records_\w+_pkey .*\n\s+Index Cond: \(+id = ANY", plan), plan


# ---------------------------------------------------------------------------- leaky predicates stay outside


def test_division_oracle_is_not_pushed_and_never_fires(cluster: PgCluster, catalog: Catalog,
                                                       bob: StatementGrants) -> None:
    leak = "1/(CASE WHEN department='FO' THEN 1 ELSE 0 END) = 1"
    sql = rewritten(f"SELECT count(*) FROM cs_records WHERE {leak}", bob, catalog)
    assert fence_where(sql) == [row_filter(bob)]  # nothing pushed
    assert direct(cluster, sql) == direct(cluster, f"SELECT count(*) FROM cs_records WHERE {BOB_FILTER}")
    assert direct(cluster, sql)[0][0] > 0
    # the predicate really is an oracle: on the unfenced table it fails on other departments' rows
    with pytest.raises(psycopg.errors.DivisionByZero):
        direct(cluster, f"SELECT count(*) FROM cs_records WHERE {leak}")


@pytest.mark.parametrize("where", [
    "content::int = 1",                       # a cast of the column fails on some rows
    "lower(category) = 'complaint'",          # a function of the column
    "id = 4242 OR id = 17",                   # OR: not a top-level conjunct
    "phone = '13800000000'",                  # masked for supervisors: the real value would be an oracle
    "id = (SELECT 4242)",                     # a subquery
    "id = 4242.0",                            # numeric: numeric_eq is not leakproof
    "created_at > DATE '2026-01-01'",         # timestamptz vs date: a cross-type operator, not leakproof
])
def test_leaky_or_unprovable_conjuncts_stay_above_the_fence(where: str, cluster: PgCluster, catalog: Catalog,
                                                            bob: StatementGrants) -> None:
    sql = rewritten(f"SELECT id FROM cs_records WHERE {where}", bob, catalog)
    assert fence_where(sql) == [row_filter(bob)], sql
    if "content" not in where:
        assert sorted(direct(cluster, sql)) == sorted(direct(
            cluster, f"SELECT id FROM cs_records WHERE {BOB_FILTER} AND ({where})"))


# ---------------------------------------------------------------------------- every emitted form, in PostgreSQL

PROBE_COLUMNS = {
    "c_int2": "smallint", "c_int4": "integer", "c_int8": "bigint", "c_text": "text", "c_vc": "varchar(10)",
    "c_char": "char(5)", "c_bool": "boolean", "c_date": "date", "c_ts": "timestamp", "c_tstz": "timestamptz",
    "c_time": "time", "c_uuid": "uuid",
}
INT_FORMS = ["{c} = 42", "{c} < -7", "42 >= {c}", "{c} <> '5'", "{c} = CAST(7 AS BIGINT)", "{c} = '7'::int",
             "{c} IN (1, 2, -3)", "{c} IS NULL", "{c} IS NOT NULL", "{c} = $1", "{c} = ANY($1)", "{c} > $1::int"]
STRING_FORMS = ["{c} = 'x'", "{c} < 'm'", "'m' <= {c}", "{c} IN ('a', 'b')", "{c} = $1", "{c} = ANY($1)",
                "{c} <> 'q'", "NOT {c} IS NULL"]
PROBE_FORMS: dict[str, list[str]] = {
    "c_int2": INT_FORMS, "c_int4": INT_FORMS, "c_int8": [*INT_FORMS, "{c} = 4242424242", "{c} > $1::bigint"],
    "c_text": [*STRING_FORMS, "{c} = 'x'::text", "{c} = CAST('x' AS VARCHAR)", "{c} != $1::text"],
    "c_vc": [*STRING_FORMS, "{c} = 'x'::text", "{c} = 'x'::varchar"],
    "c_char": STRING_FORMS,
    "c_bool": ["{c} = true", "{c} <> FALSE", "{c} = 'f'", "{c} = $1", "{c} IS NULL", "{c} = ANY($1)"],
    "c_date": ["{c} = '2026-01-01'", "{c} > '2026-01-01'::date", "{c} >= DATE '2026-01-01'", "{c} = $1",
               "{c} IN ('2026-01-01', '2026-01-02')"],
    "c_ts": ["{c} = '2026-01-01 10:00'", "{c} < CAST('2026-01-01' AS TIMESTAMP)", "{c} = $1", "{c} = ANY($1)"],
    "c_tstz": ["{c} >= '2026-01-01 10:00+08'", "{c} < '2026-01-01'::timestamptz",
               "{c} > '2026-01-01'::timestamp with time zone", "{c} = $1"],
    "c_time": ["{c} = '10:00'", "{c} < '10:00'::time", "{c} = $1"],
    "c_uuid": ["{c} = '00000000-0000-0000-0000-000000000001'", "{c} = $1", "{c} = ANY($1)",
               "{c} = '00000000-0000-0000-0000-000000000001'::uuid"],
}
#: format_type of each probe column's type without its modifier (the type a client would declare).
PROBE_DECLARED = {
    "c_int2": "smallint", "c_int4": "integer", "c_int8": "bigint", "c_text": "text", "c_vc": "character varying",
    "c_char": "character", "c_bool": "boolean", "c_date": "date", "c_ts": "timestamp without time zone",
    "c_tstz": "timestamp with time zone", "c_time": "time without time zone", "c_uuid": "uuid",
}
#: Nodes that may take the column as an argument: comparison operators (checked leakproof), binary
#: relabelling, IS [NOT] NULL, AND/OR. Anything else over a Var (a cast function, an I/O conversion) fails.
ALLOWED_OVER_VAR = {"OPEXPR", "SCALARARRAYOPEXPR", "RELABELTYPE", "NULLTEST", "BOOLEXPR"}


@pytest.fixture(scope="module")
def probe(cluster: PgCluster) -> Iterator[tuple[Catalog, StatementGrants, list[str]]]:
    """pgw_probe.probe with a column of each type pushed for; a catalog that knows it; a clear grant."""
    cols = ", ".join(f"{c} {t}" for c, t in PROBE_COLUMNS.items())
    cluster.psql(f"CREATE SCHEMA pgw_probe; CREATE TABLE pgw_probe.probe ({cols}); "
                 f"GRANT USAGE ON SCHEMA pgw_probe TO {cluster.service_user}; "
                 f"GRANT SELECT ON pgw_probe.probe TO {cluster.service_user};")
    try:
        # every built-in scalar type a client could declare for $1, and its array type (for = ANY($1))
        types = [t for r in direct(cluster, """
            SELECT format_type(oid, NULL), format_type(typarray, NULL) FROM pg_type
             WHERE typnamespace = 'pg_catalog'::regnamespace AND typtype IN ('b', 'r', 'm') AND typisdefined
               AND typname !~ '^(_|pg_)' AND typelem = 0 AND typarray <> 0 ORDER BY 1""") for t in r]
        grants = StatementGrants(tables={"pgw_probe.probe": TableGrant("pgw_probe.probe", None)},
                                 kinds=frozenset({StatementKind.SELECT}), role="probe")
        yield asyncio.run(_load_catalog(cluster)), grants, types
    finally:
        cluster.psql("DROP SCHEMA pgw_probe CASCADE;")


def _spans(tree: str) -> Iterator[tuple[str, str]]:
    """(node name, node text) of every ``{NODE ...}`` in a pg_node_tree dump."""
    for m in re.finditer(r"\{([A-Z_]+)", tree):
        depth = 0
        for i in range(m.start(), len(tree)):
            depth += {"{": 1, "}": -1}.get(tree[i], 0)
            if depth == 0:
                yield m.group(1), tree[m.start():i + 1]
                break


def column_problems(conn: psycopg.Connection, tree: str) -> list[str]:
    """What in a stored parse tree touches a column (Var) other than a leakproof operator or relabelling."""
    problems = []
    for name, text in _spans(tree):
        if "{VAR " not in text[1:] or name in ("QUERY", "RANGETBLENTRY", "TARGETENTRY", "FROMEXPR", "AGGREF",
                                                "RANGETBLREF", "SUBLINK", "ALIAS"):
            continue
        if name not in ALLOWED_OVER_VAR:
            problems.append(f"{name} over a column")
        elif name in ("OPEXPR", "SCALARARRAYOPEXPR"):
            fid = int(re.search(r":opfuncid (\d+)", text).group(1))  # type: ignore[union-attr]
            proname, leakproof = conn.execute("SELECT proname, proleakproof FROM pg_proc WHERE oid = %s",
                                              (fid,)).fetchone()
            if not leakproof:
                problems.append(f"{proname} is not leakproof")
    return problems


def test_every_pushed_form_resolves_and_is_leakproof_in_postgres(
        cluster: PgCluster, probe: tuple[Catalog, StatementGrants, list[str]]) -> None:
    cat, grants, types = probe
    checked = declared_checked = 0
    with psycopg.connect(cluster.dsn(cluster.superuser, cluster.superuser_password), autocommit=True) as conn:
        for column, forms in PROBE_FORMS.items():
            for form in forms:
                cond = form.format(c=column)
                sql = rewritten(f"SELECT count(*) FROM pgw_probe.probe WHERE {cond}", grants, cat)
                tree = sqlglot.parse_one(sql, read="postgres")
                fence = tree.find(exp.Subquery)
                assert fence is not None and fence.this.args.get("where") is not None, (cond, sql)
                pushed = fence.this.args["where"].this.sql(dialect="postgres")
                assert f'"{column}"' in pushed and "." not in pushed.replace("pg_catalog.", ""), (cond, pushed)
                body = f"SELECT count(*) FROM ({fence.this.sql(dialect='postgres')}) AS s"
                # without parameters: the statement itself must parse and run (unknown literals resolve)
                decls = types if "$1" in body else [None]
                created: list[str | None] = []
                for decl in decls:
                    args = f"p {decl}" if decl else ""
                    try:
                        with conn.transaction():
                            conn.execute(f"CREATE FUNCTION pgw_probe.f({args}) RETURNS bigint LANGUAGE sql "
                                         f"BEGIN ATOMIC {body}; END")
                            stored = conn.execute("SELECT prosqlbody::text FROM pg_proc "
                                                  "WHERE oid = 'pgw_probe.f'::regproc").fetchone()[0]
                            assert column_problems(conn, stored) == [], (cond, decl, pushed)
                            created.append(decl)
                            raise psycopg.Rollback()
                    except psycopg.Error:
                        if decl is None:
                            raise
                        # a declared type that cannot be cast (or compared) at all: the statement fails
                        # at parse time, before any row is read
                    if decl is None:
                        assert created == [None], (cond, pushed)
                        assert direct(cluster, sql) == [(0,)]
                if decl is not None:
                    own = PROBE_DECLARED[column] + ("[]" if "ANY" in cond else "")
                    assert own in created and len(created) >= 2, (cond, created)
                    declared_checked += len(created)
                checked += 1
    assert checked == sum(len(f) for f in PROBE_FORMS.values())
    assert declared_checked > 500


@pytest.mark.parametrize("decl, where, problem", [
    ("p oid", "c_int8 OPERATOR(pg_catalog.=) $1", "FUNCEXPR over a column"),  # int8 -> oid: "OID out of range"
    ("", "c_int8 = 4.5", "numeric_eq is not leakproof"),
    ("", "c_tstz > DATE '2026-01-01'", "timestamptz_gt_date is not leakproof"),
    ("", "c_text::int = 1", "COERCEVIAIO over a column"),
])
def test_the_leakproof_check_sees_what_the_rewriter_avoids(
        decl: str, where: str, problem: str, cluster: PgCluster,
        probe: tuple[Catalog, StatementGrants, list[str]]) -> None:
    """Negative controls: the parse-tree check above is not vacuous; and none of these is pushed."""
    cat, grants, _ = probe
    with psycopg.connect(cluster.dsn(cluster.superuser, cluster.superuser_password), autocommit=True) as conn:
        with conn.transaction():
            conn.execute(f"CREATE FUNCTION pgw_probe.f({decl}) RETURNS bigint LANGUAGE sql "
                         f"BEGIN ATOMIC SELECT count(*) FROM pgw_probe.probe WHERE {where}; END")
            stored = conn.execute("SELECT prosqlbody::text FROM pg_proc WHERE oid = 'pgw_probe.f'::regproc").fetchone()
            assert problem in column_problems(conn, stored[0])
            raise psycopg.Rollback()
    if "OPERATOR" not in where:
        sql = rewritten(f"SELECT count(*) FROM pgw_probe.probe WHERE {where}", grants, cat)
        fence = sqlglot.parse_one(sql, read="postgres").find(exp.Subquery)
        assert fence is not None and fence.this.args.get("where") is None, sql


def test_row_capped_lookup_still_uses_the_index(cluster: PgCluster, catalog: Catalog) -> None:
    # With the role's row cap the statement is wrapped (materialised CTE + a probe of cap+1 rows);
    # the pushed predicate inside the fence must still reach the index.
    grants, _ = grants_for(RULES, Principal(user="bob", role="supervisor", department="FO"))
    assert grants is not None and grants.row_cap
    d = rewrite("SELECT id, category FROM cs_records WHERE id = 4242", grants, catalog, None)
    assert d.action == "rewrite" and d.sql and d.sql.startswith("WITH pgwarden_capped AS MATERIALIZED")
    assert index_conds(explain(cluster, d.sql), "id"), explain_text(cluster, d.sql)
