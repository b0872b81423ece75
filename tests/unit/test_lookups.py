"""rules.lookups: which guests a statement looks up, and which shapes are refused as uncountable."""

from __future__ import annotations

import pytest

from rules.grants import StatementGrants, StatementKind, TableGrant
from rules.lookups import Lookup, UnclearLookup, find_lookups
from tests.unit.test_rewrite_fixtures import hotel_catalog

CAT = hotel_catalog()
G = StatementGrants(tables={
    "public.cs_records": TableGrant("public.cs_records", None, subject_key="guest_id"),
    "public.guests": TableGrant("public.guests", None, subject_key="id"),
    "public.sys_params": TableGrant("public.sys_params", None),
}, kinds=frozenset({StatementKind.SELECT}), guest_lookups=3, role="front_desk")


def lits(_table: str, *values: str) -> set[tuple[str | None, int | None]]:
    return {(v, None) for v in values}


@pytest.mark.parametrize("sql, want", [
    ("SELECT * FROM cs_records WHERE guest_id = 42", lits("cs_records", "42")),
    ("SELECT * FROM cs_records WHERE 42 = guest_id AND category = 'x'", lits("cs_records", "42")),
    ("SELECT * FROM cs_records c WHERE c.guest_id IN (1, 2, '0003')", lits("cs_records", "1", "2", "3")),
    ("SELECT * FROM cs_records WHERE guest_id = 1 OR guest_id = 2", lits("cs_records", "1", "2")),
    ("SELECT * FROM cs_records WHERE guest_id = CAST('7' AS bigint)", lits("cs_records", "7")),
    ("SELECT * FROM cs_records WHERE guest_id = $2", {(None, 2)}),
    # through a join: the guest is pinned on the other side
    ("SELECT c.content FROM cs_records c JOIN guests g ON g.id = c.guest_id WHERE g.id = 9",
     lits("cs_records", "9") | lits("guests", "9")),
    ("SELECT * FROM cs_records WHERE id IN (SELECT id FROM cs_records WHERE guest_id = 5)", lits("cs_records", "5")),
    ("WITH x AS (SELECT * FROM guests WHERE id = 8) SELECT * FROM x", lits("guests", "8")),
    ("SELECT * FROM cs_records_2026_11 WHERE guest_id = 4", lits("cs_records", "4")),
    # not lookups: scans, other columns, a key compared with a subquery or IS NULL
    ("SELECT count(*) FROM cs_records", set()),
    ("SELECT * FROM cs_records WHERE category = 'complaint'", set()),
    ("SELECT * FROM cs_records WHERE guest_id IN (SELECT id FROM guests WHERE vip)", set()),
    # spellings PostgreSQL reads as the same guest are one guest
    ("SELECT * FROM cs_records WHERE guest_id IN (3.0, '+3', 3e0, ' 03 ')", lits("cs_records", "3")),
    # through a derived table, a CTE or USING: still counted
    ("SELECT * FROM (SELECT * FROM cs_records) s WHERE s.guest_id = 3", lits("cs_records", "3")),
    ("WITH s AS (SELECT * FROM cs_records) SELECT * FROM s WHERE guest_id = 3", lits("cs_records", "3")),
    ("SELECT * FROM cs_records a JOIN cs_records b USING (guest_id) WHERE guest_id = 3", lits("cs_records", "3")),
    ("DECLARE c CURSOR WITH HOLD FOR SELECT * FROM cs_records WHERE guest_id = 6", lits("cs_records", "6")),
    # a key pinned from a nested scope (an outer reference) is counted there
    ("SELECT * FROM cs_records c, LATERAL (SELECT 1 WHERE c.guest_id = 3) l", lits("cs_records", "3")),
    ("SELECT * FROM cs_records c WHERE EXISTS (SELECT 1 WHERE c.guest_id = 3)", lits("cs_records", "3")),
    # merely shown, grouped or sorted: nobody looked up
    ("SELECT guest_id, count(*) FROM cs_records GROUP BY guest_id ORDER BY guest_id", set()),
    ("SELECT * FROM cs_records WHERE guest_id IS NOT NULL", set()),
    ("SELECT * FROM sys_params WHERE name = 'x'", set()),
])
def test_lookups_found(sql: str, want: set[tuple[str | None, int | None]]) -> None:
    assert {(lk.value, lk.param) for lk in find_lookups(sql, G, CAT, ("public",))} == want


@pytest.mark.parametrize("sql", [
    "SELECT * FROM cs_records WHERE guest_id + 0 = 42",
    "SELECT * FROM cs_records WHERE guest_id::text = '42'",
    "SELECT * FROM cs_records WHERE guest_id BETWEEN 42 AND 42",
    "SELECT * FROM cs_records WHERE guest_id >= 42 AND guest_id <= 42",
    "SELECT * FROM cs_records WHERE guest_id = ANY($1)",
    "SELECT * FROM cs_records WHERE guest_id = 1 OR category = 'x'",
    "SELECT * FROM cs_records c WHERE abs(c.guest_id) = 42",
    "SELECT * FROM guests WHERE id <> 4",
    # shapes a review found pinning a guest without being counted
    "SELECT * FROM cs_records WHERE guest_id IN (SELECT 3)",
    "SELECT * FROM cs_records WHERE guest_id = (SELECT 3)",
    "SELECT count(*) FILTER (WHERE guest_id = 3) FROM cs_records",
    "SELECT * FROM cs_records ORDER BY guest_id = 3 DESC LIMIT 3",
    "SELECT guest_id FROM cs_records GROUP BY guest_id HAVING guest_id = 3",
    "SELECT * FROM cs_records c JOIN (VALUES (3)) v(x) ON c.guest_id = v.x",
    "SELECT sum(CASE WHEN guest_id = 3 THEN 1 END) FROM cs_records",
    "SELECT * FROM cs_records WHERE array_position(ARRAY[3], guest_id) IS NOT NULL",
    "SELECT * FROM cs_records WHERE guest_id = '3.7'::int",
    "PREPARE q AS SELECT * FROM cs_records WHERE guest_id = 3",
])
def test_uncountable_shapes_are_unclear(sql: str) -> None:
    with pytest.raises(UnclearLookup):
        find_lookups(sql, G, CAT, ("public",))


def test_no_quota_tables_means_nothing_to_find() -> None:
    g = StatementGrants(tables={"public.cs_records": TableGrant("public.cs_records", None)},
                        kinds=frozenset({StatementKind.SELECT}))
    assert find_lookups("SELECT * FROM cs_records WHERE guest_id + 0 = 1", g, CAT) == ()
