"""rules.lookups: which guests a statement looks up, and which shapes are refused as uncountable."""

from __future__ import annotations

import pytest

from rules.grants import StatementGrants, StatementKind, TableGrant
from rules.lookups import Lookup, UnclearLookup, find_lookups
from tests.unit.test_rewrite_fixtures import hotel_catalog

CAT = hotel_catalog()
G = StatementGrants(tables={
    "public.cs_records": TableGrant("public.cs_records", None, subject_key="guest_id", record_key="id",
                                    personal=frozenset({"guest_name", "phone", "id_number", "bank_card", "content"})),
    "public.guests": TableGrant("public.guests", None, subject_key="id",
                                personal=frozenset({"name", "id_number", "phone", "email", "bank_card"})),
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
    # a constant is a constant, however it is brought in (once refused as unclear, now counted)
    ("SELECT * FROM cs_records WHERE guest_id IN (SELECT 3)", lits("cs_records", "3")),
    ("SELECT * FROM cs_records WHERE guest_id = (SELECT 3)", lits("cs_records", "3")),
    ("SELECT * FROM cs_records c JOIN (VALUES (3)) v(x) ON c.guest_id = v.x", lits("cs_records", "3")),
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
    "SELECT count(*) FILTER (WHERE guest_id = 3) FROM cs_records",
    "SELECT * FROM cs_records ORDER BY guest_id = 3 DESC LIMIT 3",
    "SELECT guest_id FROM cs_records GROUP BY guest_id HAVING guest_id = 3",
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


# ---------------------------------------------------------------------------
# issue 13: lookups by meaning (the bypasses seen, and what an attacker tries next)
# ---------------------------------------------------------------------------

G3635 = lits("cs_records", "3635")


@pytest.mark.parametrize("sql, want", [
    # the four bypasses of the issue
    ("SELECT c.* FROM cs_records c JOIN (SELECT 3635 AS guest_id) v USING (guest_id)", G3635),
    ("SELECT * FROM cs_records NATURAL JOIN (SELECT 3635::bigint AS guest_id) v", G3635),
    ("SELECT * FROM (SELECT guest_id AS g, content FROM cs_records) t WHERE g = 3635", G3635),
    ("SELECT * FROM cs_records AS c(x1, x2, x3, x4) WHERE x2 = 3635", G3635),
    # renames through more layers: CTE column lists, nested derived tables, set operations, LATERAL
    ("WITH r(a, b) AS (SELECT id, guest_id FROM cs_records) SELECT * FROM r WHERE b = 3635", G3635),
    ("SELECT * FROM (SELECT * FROM (SELECT guest_id AS k FROM cs_records) a) b WHERE b.k = 3635", G3635),
    ("SELECT * FROM (SELECT guest_id AS k FROM cs_records UNION ALL SELECT id FROM guests) u WHERE k = 3635", G3635),
    ("SELECT * FROM cs_records c, LATERAL (SELECT c.guest_id AS k) l WHERE l.k = 3635", G3635),
    ("SELECT * FROM cs_records c WHERE (c).guest_id = 3635", G3635),
    # constants brought in by joins, VALUES, CTEs, IN and EXISTS subqueries
    ("SELECT * FROM cs_records c JOIN (VALUES (3635), (3636)) v(guest_id) USING (guest_id)",
     lits("cs_records", "3635", "3636")),
    ("WITH v(k) AS (VALUES (3635)) SELECT * FROM cs_records WHERE guest_id IN (SELECT k FROM v)", G3635),
    ("SELECT * FROM cs_records c WHERE EXISTS (SELECT 1 FROM (SELECT 3635 AS k) v WHERE v.k = c.guest_id)", G3635),
    ("SELECT * FROM cs_records WHERE guest_id IN (SELECT 3635 UNION SELECT 3636)",
     lits("cs_records", "3635", "3636")),
    ("SELECT * FROM cs_records c JOIN (SELECT '3635'::bigint AS g) v ON v.g = c.guest_id", G3635),
    # equality chains and row comparisons
    ("SELECT * FROM cs_records a JOIN cs_records b ON a.guest_id = b.guest_id WHERE b.guest_id = 5",
     lits("cs_records", "5")),
    ("SELECT * FROM cs_records a, guests g, cs_records b WHERE a.guest_id = g.id AND g.id = b.guest_id "
     "AND b.guest_id = 7", lits("cs_records", "7")),
    ("SELECT * FROM cs_records WHERE (guest_id, category) = (3635, 'complaint')", G3635),
    ("SELECT * FROM cs_records WHERE guest_id IS NOT DISTINCT FROM 3635", G3635),
    ("SELECT * FROM cs_records WHERE guest_id = 3635::text::bigint", G3635),
    # parameters stay parameters (counted at Bind)
    ("SELECT * FROM (SELECT guest_id AS g FROM cs_records) t WHERE t.g = $1", {(None, 1)}),
    ("SELECT c.* FROM cs_records c JOIN (SELECT $2::bigint AS guest_id) v USING (guest_id)", {(None, 2)}),
    # a record picked by id or personal data together with its guest: counted for the guest
    ("SELECT * FROM cs_records WHERE id = 12345 AND guest_id = 3635", G3635),
    ("SELECT * FROM guests WHERE name = '张三' AND id = 3635", lits("guests", "3635")),
    # output computed from the key filters nothing
    ("SELECT guest_id + 0, row_to_json(c) FROM cs_records c", set()),
    # joining on the record key, or showing and sorting by it, picks nobody
    ("SELECT c.id FROM cs_records c JOIN cs_records d ON d.id = c.id ORDER BY c.id", set()),
    ("SELECT * FROM cs_records WHERE id IN (SELECT id FROM cs_records WHERE guest_id = 9) AND id > 100",
     lits("cs_records", "9")),
    ("SELECT * FROM cs_records WHERE guest_id = 9 AND id BETWEEN 100 AND 200 AND guest_name LIKE '张%'",
     lits("cs_records", "9")),
    # paging through a table by its record key picks nobody
    ("SELECT * FROM cs_records WHERE id > $1 ORDER BY id LIMIT 50", set()),
    ("SELECT * FROM cs_records WHERE id >= 100 AND id < 200", set()),
    ("SELECT * FROM cs_records WHERE id BETWEEN 100 AND 200", set()),
])
def test_lookups_by_meaning(sql: str, want: set[tuple[str | None, int | None]]) -> None:
    assert {(lk.value, lk.param) for lk in find_lookups(sql, G, CAT, ("public",))} == want


@pytest.mark.parametrize("sql", [
    # guests named by something pgwarden cannot read: functions of rows, catalog columns, computed constants
    "SELECT * FROM cs_records c JOIN generate_series(3635, 3635) g(x) ON c.guest_id = g.x",
    "SELECT * FROM cs_records c NATURAL JOIN generate_series(3635, 3635) AS guest_id",
    "SELECT * FROM cs_records c JOIN (SELECT 3634 + 1 AS x) v ON c.guest_id = v.x",
    "SELECT * FROM cs_records c JOIN pg_class p ON c.guest_id = p.oid",
    "SELECT * FROM cs_records c WHERE c.guest_id IN (SELECT oid FROM pg_class)",
    "SELECT * FROM cs_records WHERE guest_id = (SELECT max(guest_id) FROM cs_records)",
    "SELECT * FROM cs_records c JOIN jsonb_to_record('{\"guest_id\": 3635}') AS v(guest_id bigint) USING (guest_id)",
    # a key hidden in a computed or whole-row value, then filtered
    "SELECT * FROM (SELECT guest_id + 0 AS g FROM cs_records) t WHERE g = 3635",
    "SELECT * FROM (SELECT guest_id::text AS g FROM cs_records) t WHERE g = '3635'",
    "SELECT * FROM cs_records c WHERE row_to_json(c)::text LIKE '%\"guest_id\":3635,%'",
    "SELECT * FROM (SELECT guest_id = 3635 AS hit, * FROM cs_records) t WHERE hit",
    "SELECT * FROM cs_records WHERE guest_id = ANY(ARRAY[3635])",
    "SELECT * FROM cs_records WHERE NOT (guest_id <> 3635)",
    "SELECT * FROM cs_records WHERE (guest_id = 3635) IS TRUE",
    "SELECT * FROM cs_records WHERE guest_id IN (3635) OR false",
    "SELECT * FROM (SELECT guest_id AS g FROM cs_records) t ORDER BY g = 3635 DESC LIMIT 3",
    "WITH RECURSIVE r(k) AS (SELECT 3635 UNION SELECT k FROM r) SELECT * FROM cs_records WHERE guest_id IN (SELECT k FROM r)",
    # a record picked by its id or by personal data, without its guest
    "SELECT * FROM cs_records WHERE id = 12345",
    "SELECT * FROM cs_records WHERE id IN (12345, 12346)",
    "SELECT * FROM cs_records WHERE guest_name = '张三'",
    "SELECT * FROM cs_records WHERE phone = $1",
    "SELECT c.* FROM cs_records c JOIN guests g ON g.id = c.guest_id WHERE g.name = '张三'",
    "SELECT * FROM (SELECT id AS rid, * FROM cs_records) t WHERE rid = 12345",
    # ... whatever the shape of the condition on the identity column
    "SELECT * FROM cs_records WHERE id BETWEEN 12345 AND 12345",
    "SELECT * FROM cs_records WHERE id >= 12345 AND id <= 12345",
    "SELECT * FROM cs_records WHERE id BETWEEN $1 AND $1",
    "SELECT * FROM cs_records WHERE id = ANY($1)",
    "SELECT * FROM cs_records WHERE id + 0 = 12345",
    "SELECT * FROM cs_records WHERE guest_name LIKE '张三'",
    "SELECT * FROM cs_records WHERE lower(guest_name) = '张三'",
    "SELECT * FROM cs_records WHERE guest_name ~ '^张三$'",
])
def test_lookup_bypasses_are_refused(sql: str) -> None:
    with pytest.raises(UnclearLookup):
        find_lookups(sql, G, CAT, ("public",))


def test_identity_pin_says_how_to_count_it() -> None:
    with pytest.raises(UnclearLookup) as ei:
        find_lookups("SELECT * FROM cs_records WHERE id = 12345", G, CAT, ("public",))
    assert "cs_records.id" in str(ei.value) and "guest_id = <the guest>" in ei.value.hint


def test_masked_personal_data_is_not_an_identity() -> None:
    """A condition on a masked column compares masked values ('139****5678'): it names no one for sure."""
    from rules.grants import ColumnRule, Treatment

    masked = {c: ColumnRule(Treatment.MASK, None) for c in ("guest_name", "phone", "id_number", "bank_card")}
    g = StatementGrants(tables={"public.cs_records": TableGrant(
        "public.cs_records", None, columns=masked, subject_key="guest_id", record_key="id",
        personal=frozenset(masked))}, kinds=frozenset({StatementKind.SELECT}), guest_lookups=3, role="front_desk")
    for sql in ["SELECT * FROM cs_records WHERE phone = '139****5678'",
                "SELECT * FROM cs_records WHERE guest_name LIKE '张%' AND phone::text = '139****5678'"]:
        assert find_lookups(sql, g, CAT, ("public",)) == ()
    with pytest.raises(UnclearLookup):
        find_lookups("SELECT * FROM cs_records WHERE id = 5", g, CAT, ("public",))
