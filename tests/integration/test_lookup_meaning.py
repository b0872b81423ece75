"""The guest lookup quota counts lookups by meaning, whatever the key is called (issue 13, R3.4).

A supervisor (bob, 3 lookups per guest per month) through two real pgwarden replicas sharing one
state store: every spelling of "the records of guest G" the issue found uncounted is counted (or,
where pgwarden cannot tell which guest, refused), with the exact rows and SQLSTATEs.
"""

from __future__ import annotations

import psycopg
import pytest

from proxy.demo.pgcluster import PgCluster
from tests.conftest import Proxy
from tests.integration.test_guards import attempt, pair, schema, sqlstate, visible_guests  # noqa: F401
from tests.integration.test_policy_e2e import direct

BOB_SEES = ("department = 'FO' AND NOT legal_hold AND created_at >= statement_timestamp() - interval '72 hours'")


def records_of(cluster: PgCluster, g: int) -> list[tuple]:
    return direct(cluster, f"SELECT id FROM cs_records WHERE guest_id = {g} AND {BOB_SEES} ORDER BY id")


def lookups(cluster: PgCluster, schema: str) -> dict[str, int]:  # noqa: F811
    return dict(direct(cluster, f"SELECT guest, lookups FROM {schema}.guest_lookups WHERE user_name = 'bob'"))


def test_the_issues_bypasses_are_counted(pair: tuple[Proxy, Proxy], cluster: PgCluster,  # noqa: F811
                                         schema: str) -> None:  # noqa: F811
    a, b = pair
    (g,) = visible_guests(cluster, 1)
    want = records_of(cluster, g)
    assert want
    # Three spellings the issue found uncounted: each returns the guest's records, each is counted.
    spellings = [
        (a, f"SELECT c.id FROM cs_records c JOIN (SELECT {g} AS guest_id) v USING (guest_id) ORDER BY c.id"),
        (b, f"SELECT id FROM cs_records NATURAL JOIN (SELECT {g}::bigint AS guest_id) v ORDER BY id"),
        (a, f"SELECT id FROM (SELECT id, guest_id AS gg, content FROM cs_records) t WHERE gg = {g} ORDER BY id"),
    ]
    for n, (p, sql) in enumerate(spellings, start=1):
        assert attempt(p, "bob", sql) == want, sql
        assert lookups(cluster, schema) == {str(g): n}
    # The fourth, by the fourth spelling (a column alias list), and the plain one, are refused.
    for p, sql in [(b, f"SELECT x1 FROM cs_records AS c(x1, x2, x3, x4) WHERE x2 = {g}"),
                   (a, f"SELECT id FROM cs_records WHERE guest_id = {g}")]:
        err = attempt(p, "bob", sql)
        assert sqlstate(err) == "42501" and f"looked up guest {g} 3 times this month" in str(err), (sql, err)
    assert lookups(cluster, schema) == {str(g): 3}


@pytest.mark.parametrize("sql", [
    "SELECT x1 FROM cs_records AS c(x1, x2) WHERE x2 = {g}",
    "WITH r(a, b) AS (SELECT id, guest_id FROM cs_records) SELECT a FROM r WHERE b = {g}",
    "SELECT c.id FROM cs_records c JOIN (VALUES ({g})) v(k) ON v.k = c.guest_id",
    "SELECT c.id FROM cs_records c WHERE EXISTS (SELECT 1 FROM (SELECT {g} AS k) v WHERE v.k = c.guest_id)",
    "SELECT a.id FROM cs_records a JOIN cs_records b ON a.guest_id = b.guest_id AND b.id = a.id "
    "WHERE b.guest_id = {g}",
    "SELECT id FROM cs_records WHERE (guest_id, legal_hold) = ({g}, false)",
    "SELECT id FROM cs_records WHERE guest_id IN (SELECT {g})",
])
def test_more_spellings_are_one_lookup_each(pair: tuple[Proxy, Proxy], cluster: PgCluster,  # noqa: F811
                                            schema: str, sql: str) -> None:  # noqa: F811
    a, _ = pair
    (g,) = visible_guests(cluster, 1)
    got = attempt(a, "bob", sql.format(g=g) + " ORDER BY 1")
    assert got == records_of(cluster, g), got
    assert lookups(cluster, schema) == {str(g): 1}


def test_a_renamed_key_bound_as_a_parameter_is_counted_at_bind(pair: tuple[Proxy, Proxy],  # noqa: F811
                                                               cluster: PgCluster, schema: str) -> None:  # noqa: F811
    a, b = pair
    (g,) = visible_guests(cluster, 1)
    sql = "SELECT id FROM (SELECT id, guest_id AS gg FROM cs_records) t WHERE t.gg = %s ORDER BY id"
    for p in (a, b, a):
        assert attempt(p, "bob", sql, (g,)) == records_of(cluster, g)
    err = attempt(b, "bob", sql, (g,))
    assert sqlstate(err) == "42501" and "3 times this month" in str(err)
    assert lookups(cluster, schema) == {str(g): 3}


@pytest.mark.parametrize("sql, why", [
    # a guest named by something pgwarden cannot read
    ("SELECT c.id FROM cs_records c JOIN generate_series({g}, {g}) s(x) ON c.guest_id = s.x", "cannot be counted"),
    ("SELECT c.id FROM cs_records c JOIN (SELECT {g} + 0 AS x) v ON c.guest_id = v.x", "cannot be counted"),
    ("SELECT c.id FROM cs_records c JOIN pg_class p ON c.guest_id = p.oid::bigint", "cannot be counted"),
    ("SELECT id FROM (SELECT id, guest_id + 0 AS gg FROM cs_records) t WHERE gg = {g}", "cannot be counted"),
    ("SELECT id FROM cs_records c WHERE row_to_json(c)::text LIKE '%\"guest_id\":{g},%'", "cannot be counted"),
    # a record picked by its id, or by personal data the role sees in clear, without its guest
    ("SELECT guest_id FROM cs_records WHERE id = {rid}", "guest_id = <the guest>"),
    ("SELECT guest_id FROM cs_records WHERE id BETWEEN {rid} AND {rid}", "guest_id = <the guest>"),
    ("SELECT guest_id FROM cs_records WHERE guest_name LIKE (SELECT guest_name FROM cs_records WHERE guest_id = {g} "
     "LIMIT 1)", "cannot be counted"),
    ("SELECT guest_id FROM cs_records WHERE guest_name = (SELECT guest_name FROM cs_records WHERE id = {rid})",
     "cannot be counted"),
])
def test_lookups_pgwarden_cannot_count_are_refused(pair: tuple[Proxy, Proxy], cluster: PgCluster,  # noqa: F811
                                                   schema: str, sql: str, why: str) -> None:  # noqa: F811
    a, _ = pair
    (g,) = visible_guests(cluster, 1)
    (rid,), = direct(cluster, f"SELECT min(id) FROM cs_records WHERE guest_id = {g} AND {BOB_SEES}")
    err = attempt(a, "bob", sql.format(g=g, rid=rid))
    assert sqlstate(err) == "42501" and why in str(err), err
    assert lookups(cluster, schema) == {}


def test_a_record_by_id_with_its_guest_is_counted(pair: tuple[Proxy, Proxy], cluster: PgCluster,  # noqa: F811
                                                  schema: str) -> None:  # noqa: F811
    a, _ = pair
    (g,) = visible_guests(cluster, 1)
    (rid,), = direct(cluster, f"SELECT min(id) FROM cs_records WHERE guest_id = {g} AND {BOB_SEES}")
    assert attempt(a, "bob", f"SELECT id FROM cs_records WHERE id = {rid} AND guest_id = {g}") == [(rid,)]
    assert lookups(cluster, schema) == {str(g): 1}
    # Scans, and searches of data the supervisor sees masked, look nobody up.
    with psycopg.connect(a.dsn("bob"), autocommit=True) as c:
        assert c.execute("SELECT count(*) FROM cs_records WHERE category = 'complaint'").fetchone() is not None
        c.execute("SELECT id FROM cs_records WHERE phone LIKE '139%' ORDER BY id LIMIT 5").fetchall()
        c.execute("SELECT c.id FROM cs_records c JOIN disputes d ON d.cs_record_id = c.id").fetchall()
    assert lookups(cluster, schema) == {str(g): 1}
