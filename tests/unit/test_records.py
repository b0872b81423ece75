"""rules.records: the most protected records one result row can carry (W), from lineage (issue 13)."""

from __future__ import annotations

import pytest
import sqlglot

from rules.lineage import Lineage
from rules.records import Unbounded, columns_read, records_per_row
from tests.unit.test_rewrite_fixtures import hotel_catalog

CAT = hotel_catalog()


def lineage(sql: str) -> Lineage:
    tree = sqlglot.parse_one(sql, read="postgres")
    return Lineage(tree, CAT, ("public",), protected=lambda _n, r: r is not None and r.name in ("cs_records", "guests"))


@pytest.mark.parametrize("sql, w", [
    ("SELECT count(*) FROM cs_records", 1),
    ("SELECT * FROM cs_records", 1),
    ("SELECT a.id, b.id FROM cs_records a, cs_records b", 2),
    ("SELECT a.id FROM cs_records a, cs_records b WHERE a.id = b.id", 1),  # b only filters
    ("SELECT n FROM generate_series(1, 3) n, cs_records", 1),
    # subqueries: one record each, also when they read only the outer row
    ("SELECT (SELECT phone FROM cs_records LIMIT 1), (SELECT phone FROM cs_records OFFSET 1 LIMIT 1)", 2),
    ("SELECT c.id, (SELECT c.phone), (SELECT c.guest_name) FROM cs_records c", 3),
    ("SELECT (SELECT count(*) FROM cs_records)", 1),
    ("SELECT EXISTS (SELECT 1 FROM cs_records) FROM cs_records", 1),
    # aggregates and windows bring other rows' values in: one record per call
    ("SELECT count(*), sum(id), avg(id), max(phone) FROM cs_records", 3),
    ("SELECT max(CASE WHEN id = 1 THEN phone END), max(CASE WHEN id = 2 THEN phone END) FROM cs_records", 2),
    ("SELECT id, lag(phone) OVER (ORDER BY id), row_number() OVER () FROM cs_records", 2),
    ("SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY id) FROM cs_records", 1),
    # through derived tables, CTEs, set operations, LATERAL
    ("SELECT t.x FROM (SELECT a.id AS x, b.id AS y FROM cs_records a, cs_records b) t", 1),
    ("WITH x AS (SELECT id FROM cs_records) SELECT a.id, b.id, c.id FROM x a, x b, x c", 3),
    ("SELECT id FROM cs_records UNION ALL SELECT a.id + b.id FROM cs_records a, cs_records b", 2),
    ("SELECT c.id, l.id FROM cs_records c, LATERAL (SELECT d.id FROM cs_records d LIMIT 1) l", 2),
    ("SELECT row_to_json(c), c FROM cs_records c", 1),
    ("SELECT c.id, g.name FROM cs_records c JOIN guests g ON g.id = c.guest_id", 2),
    ("VALUES ((SELECT phone FROM cs_records LIMIT 1)), (1)", 1),
])
def test_records_per_row(sql: str, w: int) -> None:
    assert records_per_row(lineage(sql)) == w


@pytest.mark.parametrize("sql", [
    "SELECT string_agg(phone, ',') FROM cs_records",
    "SELECT (SELECT array_agg(c) FROM cs_records c)",
    "SELECT ARRAY(SELECT id FROM cs_records)",
    "SELECT jsonb_agg(c) OVER () FROM cs_records c",
])
def test_packing_is_unbounded(sql: str) -> None:
    with pytest.raises(Unbounded):
        records_per_row(lineage(sql))


@pytest.mark.parametrize("sql, cols", [
    ("SELECT count(*) FROM cs_records", set()),
    ("SELECT count(*) FROM (SELECT * FROM cs_records) s", set()),
    ("SELECT phone FROM cs_records", {"phone"}),
    ("SELECT id FROM cs_records WHERE content LIKE '%x%'", {"id", "content"}),
    ("SELECT p FROM (SELECT phone AS p, id_number AS i FROM cs_records) t", {"phone"}),
    ("SELECT x2 FROM cs_records AS c(x1, x2)", {"guest_id"}),
    ("SELECT a.id FROM cs_records a JOIN cs_records b USING (guest_id)", {"id", "guest_id"}),
])
def test_columns_read(sql: str, cols: set[str]) -> None:
    assert {c for _, c in columns_read(lineage(sql))} == cols
    assert {c for _, c in columns_read(lineage("SELECT * FROM cs_records"))} == {c.name for c in
                                                                               CAT.relations["public.cs_records"].columns}
