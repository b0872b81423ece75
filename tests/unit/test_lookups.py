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


def lits(table: str, *values: str) -> set[Lookup]:
    return {Lookup(f"public.{table}", v) for v in values}


@pytest.mark.parametrize("sql, want", [
    ("SELECT * FROM cs_records WHERE guest_id = 42", lits("cs_records", "42")),
    ("SELECT * FROM cs_records WHERE 42 = guest_id AND category = 'x'", lits("cs_records", "42")),
    ("SELECT * FROM cs_records c WHERE c.guest_id IN (1, 2, '0003')", lits("cs_records", "1", "2", "3")),
    ("SELECT * FROM cs_records WHERE guest_id = 1 OR guest_id = 2", lits("cs_records", "1", "2")),
    ("SELECT * FROM cs_records WHERE guest_id = CAST('7' AS bigint)", lits("cs_records", "7")),
    ("SELECT * FROM cs_records WHERE guest_id = $2", {Lookup("public.cs_records", None, 2)}),
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
    ("SELECT * FROM cs_records WHERE guest_id IS NOT NULL", set()),
    ("SELECT * FROM sys_params WHERE name = 'x'", set()),
])
def test_lookups_found(sql: str, want: set[Lookup]) -> None:
    assert set(find_lookups(sql, G, CAT, ("public",))) == want


@pytest.mark.parametrize("sql", [
    "SELECT * FROM cs_records WHERE guest_id + 0 = 42",
    "SELECT * FROM cs_records WHERE guest_id::text = '42'",
    "SELECT * FROM cs_records WHERE guest_id BETWEEN 42 AND 42",
    "SELECT * FROM cs_records WHERE guest_id >= 42 AND guest_id <= 42",
    "SELECT * FROM cs_records WHERE guest_id = ANY($1)",
    "SELECT * FROM cs_records WHERE guest_id = 1 OR category = 'x'",
    "SELECT * FROM cs_records c WHERE abs(c.guest_id) = 42",
    "SELECT * FROM guests WHERE id <> 4",
])
def test_uncountable_shapes_are_unclear(sql: str) -> None:
    with pytest.raises(UnclearLookup):
        find_lookups(sql, G, CAT, ("public",))


def test_no_quota_tables_means_nothing_to_find() -> None:
    g = StatementGrants(tables={"public.cs_records": TableGrant("public.cs_records", None)},
                        kinds=frozenset({StatementKind.SELECT}))
    assert find_lookups("SELECT * FROM cs_records WHERE guest_id + 0 = 1", g, CAT) == ()
