"""Row caps and row budgets count records of protected tables, not result rows (issue 13, R3.2, R3.3).

Sales (gina) is given a cap of 20 records per statement; every route by which a record can reach
the result is tried as an attacker would, through a real pgwarden with a state store, and checked
against the exact rows PostgreSQL holds: a result that carries more than 20 records is refused
with 42501, one that carries exactly 20 comes back whole, and the budget is charged in records.

The sessions run with ``jit = off`` (a setting clients may change): PostgreSQL's JIT compiles every
mask expression of every fence of every subquery, which for the packed statements takes a minute
before the cap refuses them in milliseconds.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from proxy.demo.pgcluster import PgCluster
from tests.conftest import Proxy, start_proxy, state_config
from tests.integration.test_guards import hotel_with, schema, sqlstate, used_rows, wait_until  # noqa: F401
from tests.integration.test_policy_e2e import direct

CAP = 20
SALES = "  sales:                           # 销售部: consultations, never complaints\n"
VISIBLE = "SELECT id FROM cs_records WHERE category = 'consultation' AND NOT legal_hold ORDER BY id"


#: Every statement below bounds its fences with ``id <= TOP`` (pushed into the fence, so an index is used):
#: the shapes are the attacker's, the tables they scan small enough for a test.
TOP = "{top}"


def packed(last: int, k: int = 10, top: int = 10**12) -> str:
    """The issue's bypass: k correlated scalar subqueries, each one whole record as JSON, per row."""
    cols = ", ".join(f"(SELECT row_to_json(c)::text FROM cs_records c WHERE c.id <= {top} "
                     f"ORDER BY c.id OFFSET n.i*{k}+{j} LIMIT 1)" for j in range(k))
    return f"SELECT n.i, {cols} FROM generate_series(0, {last}) n(i)"


def attempt(p: Proxy, user: str, sql: str) -> list[tuple] | psycopg.Error:
    try:
        with psycopg.connect(p.dsn(user, options="-cjit=off"), autocommit=True) as c:
            return c.execute(sql).fetchall()
    except psycopg.Error as e:
        return e


def sales_proxy(cluster: PgCluster, tmp: Path, state_schema: str, budget: str) -> Proxy:
    # Refusals follow each other here on purpose: the lockout (R3.5) is not what is tested.
    rules = hotel_with(tmp, (SALES, f"  sales:\n    row_cap: {CAP}\n    row_budget: {budget}\n"),
                       ("  lockout: {after: 3, for: 30m}\n", "  lockout: {after: 1000, for: 30m}\n"))
    return start_proxy(cluster, str(tmp), rules=str(rules), state=state_config(cluster, state_schema))


@pytest.fixture(scope="module")
def capped(cluster: PgCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """Sales with a cap of 20 and a budget too large to matter here."""
    name = f"pgwarden_t{secrets.token_hex(4)}"
    p = sales_proxy(cluster, tmp_path_factory.mktemp("caps"), name, "{hour: 1000000}")
    try:
        yield p
    finally:
        p.thread.stop()
        cluster.psql(f"DROP SCHEMA IF EXISTS {name} CASCADE", user=cluster.superuser)


@pytest.fixture(scope="module")
def ids(cluster: PgCluster) -> list[int]:
    got = [i for (i,) in direct(cluster, VISIBLE + " LIMIT 100")]
    assert len(got) == 100
    return got


def test_packed_scalar_subqueries_count_every_record(capped: Proxy, ids: list[int]) -> None:
    # 200 rows of 10 records each: 2,000 records against a cap of 20.
    top = ids[-1]
    err = attempt(capped, "gina", packed(199, top=top))
    assert sqlstate(err) == "42501", err
    assert "more than 20 records (each of its rows carries 10 records" in str(err)
    # 2 rows carry exactly 20 records: they come back, every one the record asked for.
    rows = attempt(capped, "gina", packed(1, top=top))
    assert isinstance(rows, list) and [r[0] for r in rows] == [0, 1]
    assert [[json.loads(v)["id"] for v in r[1:]] for r in rows] == [ids[0:10], ids[10:20]]
    assert all(json.loads(v)["category"] == "consultation" for r in rows for v in r[1:])
    # 3 rows would carry 30.
    assert sqlstate(attempt(capped, "gina", packed(2, top=top))) == "42501"
    # Twenty subqueries in one row: 20 records, fine; twenty-one: refused.
    assert len(attempt(capped, "gina", packed(0, k=20, top=top))) == 1  # type: ignore[arg-type]
    assert sqlstate(attempt(capped, "gina", packed(0, k=21, top=top))) == "42501"


ROUTES = [
    # (route, statement returning ids in its first column, records per row)
    ("self-join", "SELECT a.id, b.id FROM cs_records a JOIN cs_records b ON b.id = a.id "
                  "WHERE a.id <= {top} AND b.id <= {top} ORDER BY a.id LIMIT {n}", 2),
    ("LATERAL", "SELECT c.id, l.id FROM cs_records c, LATERAL (SELECT d.id FROM cs_records d WHERE d.id > c.id "
                "AND d.id <= {top} ORDER BY d.id LIMIT 1) l WHERE c.id <= {top} ORDER BY c.id LIMIT {n}", 2),
    ("scalar subquery", "SELECT c.id, (SELECT d.guest_id FROM cs_records d WHERE d.id > c.id AND d.id <= {top} "
                        "ORDER BY d.id LIMIT 1) FROM cs_records c WHERE c.id <= {top} ORDER BY c.id LIMIT {n}", 2),
    ("windows", "SELECT id, lag(id) OVER w, lag(id, 2) OVER w, lead(content) OVER w FROM cs_records "
                "WHERE id <= {top} WINDOW w AS (ORDER BY id) ORDER BY id LIMIT {n}", 4),
    ("whole rows", "SELECT a.id, row_to_json(a)::text, row_to_json(b)::text FROM cs_records a "
                   "JOIN cs_records b ON b.id = a.id WHERE a.id <= {top} AND b.id <= {top} ORDER BY a.id LIMIT {n}", 2),
    ("row constructor", "SELECT a.id, (a.content, b.content)::text FROM cs_records a JOIN cs_records b "
                        "ON b.id = a.id WHERE a.id <= {top} AND b.id <= {top} ORDER BY a.id LIMIT {n}", 2),
    ("a CTE read twice", "WITH x AS (SELECT id FROM cs_records WHERE id <= {top}) "
                         "SELECT a.id, b.id FROM x a JOIN x b ON b.id = a.id ORDER BY a.id LIMIT {n}", 2),
    ("derived tables", "SELECT t.i, t.j FROM (SELECT a.id AS i, b.agent AS j FROM cs_records a "
                       "JOIN cs_records b ON b.id = a.id WHERE a.id <= {top} AND b.id <= {top}) t "
                       "ORDER BY t.i LIMIT {n}", 2),
    ("EXISTS is a condition", "SELECT c.id FROM cs_records c WHERE c.id <= {top} AND EXISTS "
                              "(SELECT 1 FROM cs_records d WHERE d.id = c.id AND d.id <= {top}) "
                              "ORDER BY c.id LIMIT {n}", 1),
    ("a count per row is not a record", "SELECT c.id, (SELECT count(*) FROM cs_records d WHERE d.agent = c.agent "
                                        "AND d.id <= {top}) FROM cs_records c WHERE c.id <= {top} "
                                        "ORDER BY c.id LIMIT {n}", 1),
]


@pytest.mark.parametrize("route, sql, weight", ROUTES, ids=[r[0] for r in ROUTES])
def test_every_route_counts_its_records(capped: Proxy, ids: list[int], route: str, sql: str, weight: int) -> None:
    n = CAP // weight
    rows = attempt(capped, "gina", sql.format(n=n, top=ids[-1]))
    assert isinstance(rows, list), (route, rows)
    assert [r[0] for r in rows] == ids[:n]  # all of them, the right ones
    err = attempt(capped, "gina", sql.format(n=n + 1, top=ids[-1]))
    assert sqlstate(err) == "42501", (route, err)
    if weight > 1:
        assert f"each of its rows carries {weight} records" in str(err)


def test_a_pivot_counts_each_picked_value(capped: Proxy, cluster: PgCluster) -> None:
    # max(CASE ...) picks one record per column: a group key and 4 picks are 5 records a row.
    sql = ("SELECT id / 4, max(CASE WHEN id % 4 = 0 THEN content END), max(CASE WHEN id % 4 = 1 THEN content END), "
           "max(CASE WHEN id % 4 = 2 THEN content END), max(CASE WHEN id % 4 = 3 THEN content END) "
           "FROM cs_records GROUP BY 1 ORDER BY 1 LIMIT {n}")
    want = direct(cluster, f"SELECT id / 4 FROM ({VISIBLE}) v GROUP BY 1 ORDER BY 1 LIMIT 4")
    rows = attempt(capped, "gina", sql.format(n=4))
    assert isinstance(rows, list) and [(r[0],) for r in rows] == want
    assert sqlstate(attempt(capped, "gina", sql.format(n=5))) == "42501"


def test_statistics_stay_allowed(capped: Proxy, cluster: PgCluster) -> None:
    want = direct(cluster, "SELECT count(*), sum(id), min(id), max(id) FROM cs_records "
                           "WHERE category = 'consultation' AND NOT legal_hold")
    assert want[0][0] > CAP * 100  # thousands of records go into these, none comes out
    assert attempt(capped, "gina", "SELECT count(*), sum(id), min(id), max(id) FROM cs_records") == want
    assert attempt(capped, "gina", "SELECT count(*) FROM (SELECT * FROM cs_records) s") == [(want[0][0],)]
    by_channel = direct(cluster, "SELECT channel, count(*) FROM cs_records WHERE category = 'consultation' "
                                 "AND NOT legal_hold GROUP BY 1 ORDER BY 1")
    assert attempt(capped, "gina", "SELECT channel, count(*) FROM cs_records GROUP BY 1 ORDER BY 1") == by_channel


@pytest.mark.parametrize("sql", [
    "SELECT string_agg(content, ',') FROM cs_records",
    "SELECT array_agg(c) FROM cs_records c",
    "SELECT json_agg(row_to_json(c)) FROM cs_records c",
    "SELECT ARRAY(SELECT id FROM cs_records)",
    "SELECT jsonb_agg(c) OVER () FROM cs_records c LIMIT 1",
    "SELECT (SELECT string_agg(content, ',') FROM cs_records)",
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 2) SELECT * FROM r, cs_records LIMIT 1",
])
def test_values_that_carry_any_number_of_records_are_refused(capped: Proxy, sql: str) -> None:
    err = attempt(capped, "gina", sql)
    assert sqlstate(err) == "42501" and "row cap" in str(err), (sql, err)


def test_the_budget_is_charged_in_records(cluster: PgCluster, schema: str, tmp_path: Path) -> None:  # noqa: F811
    p = sales_proxy(cluster, tmp_path, schema, "{hour: 60}")
    try:
        pair = "SELECT a.id, b.id FROM cs_records a JOIN cs_records b ON b.id = a.id ORDER BY a.id LIMIT {n}"
        assert len(attempt(p, "gina", pair.format(n=5))) == 5  # type: ignore[arg-type]
        wait_until(lambda: used_rows(cluster, schema, "gina") == 10)  # 5 rows x 2 records
        assert len(attempt(p, "gina", packed(1, top=10**6))) == 2  # type: ignore[arg-type]
        wait_until(lambda: used_rows(cluster, schema, "gina") == 30)  # 2 rows x 10 records
        with psycopg.connect(p.dsn("gina", options="-cjit=off")) as c:
            c.execute("DECLARE cur CURSOR FOR " + pair.format(n=10))
            assert len(c.execute("FETCH 3 FROM cur").fetchall()) == 3
            wait_until(lambda: used_rows(cluster, schema, "gina") == 36)
            assert len(c.execute("FETCH 7 FROM cur").fetchall()) == 7
            wait_until(lambda: used_rows(cluster, schema, "gina") == 50)
            c.rollback()
        # 10 records are left: 10 rows of 2 are refused (decided again with 10 as the cap) ...
        err = attempt(p, "gina", pair.format(n=10))
        assert sqlstate(err) == "42501" and "each of its rows carries 2 records" in str(err), err
        assert "(or than is left of the row budget)" in str(err)
        # ... 5 rows of 2 fit exactly.
        assert len(attempt(p, "gina", pair.format(n=5))) == 5  # type: ignore[arg-type]
        wait_until(lambda: used_rows(cluster, schema, "gina") == 60)
        err = attempt(p, "gina", "SELECT id FROM cs_records LIMIT 1")
        assert sqlstate(err) == "42501" and "0 rows left" in str(err)
    finally:
        p.thread.stop()
