"""rules.catalog.load_catalog against a real PostgreSQL with the hotel sample and extra objects.

Self-contained (its own module-scoped cluster). Besides checking the loaded
snapshot, it compares Catalog.resolve with what PostgreSQL itself resolves
(to_regclass under the same search_path), so the pure resolver and the server
cannot silently disagree.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import asyncpg
import pytest

from proxy.demo.pgcluster import PgCluster
from proxy.demo.sampledata import load_sample_sync, partition_bounds
from rules.catalog import Catalog, catalog_from_dict, catalog_to_dict, load_catalog, qualify


EXTRA_SQL = """
CREATE VIEW public.cs_view AS SELECT id, department, created_at FROM public.cs_records;
CREATE VIEW public.cs_view2 AS SELECT id FROM public.cs_view WHERE department = 'FO';
CREATE MATERIALIZED VIEW public.guest_regions AS SELECT region, count(*) AS n FROM public.guests GROUP BY region;
CREATE TABLE public.animals (id int NOT NULL, name text);
CREATE TABLE public.dogs (breed text) INHERITS (public.animals);
CREATE TABLE public.events (id int, at date NOT NULL, kind text) PARTITION BY RANGE (at);
CREATE TABLE public.events_2024 PARTITION OF public.events
    FOR VALUES FROM ('2024-01-01') TO ('2025-01-01') PARTITION BY LIST (kind);
CREATE TABLE public.events_2024_a PARTITION OF public.events_2024 FOR VALUES IN ('a');
CREATE TABLE public."Guests" (x numeric(10,2));
CREATE TABLE public.pg_class (evil text);
CREATE SCHEMA other;
CREATE TABLE other.guests (id int, nick varchar(20));
GRANT USAGE ON SCHEMA other TO pgwarden_svc;
CREATE SCHEMA hidden;   -- no USAGE for the service login: PostgreSQL skips it in search_path
CREATE TABLE hidden.guests (id int);
CREATE FUNCTION public.guest_count() RETURNS bigint LANGUAGE sql STABLE SECURITY DEFINER
    AS 'SELECT count(*) FROM public.guests';
CREATE FUNCTION public.fmt(integer) RETURNS text LANGUAGE sql IMMUTABLE AS 'SELECT $1::text';
CREATE FUNCTION public.fmt(text, VARIADIC text[]) RETURNS text LANGUAGE sql IMMUTABLE AS 'SELECT $1';
CREATE VIEW public.fn_view AS SELECT public.guest_count() AS n;
CREATE VIEW other.over_fn_view AS SELECT n FROM public.fn_view;
CREATE VIEW public.stats_view AS SELECT tablename FROM pg_catalog.pg_stats;
CREATE VIEW public.class_view AS SELECT relname FROM pg_catalog.pg_class;
"""

GUESTS_COLUMNS = [
    ("id", "bigint", True), ("name", "text", True), ("id_number", "text", True), ("phone", "text", True),
    ("email", "text", False), ("bank_card", "text", False), ("account_manager", "text", True),
    ("region", "text", True), ("vip", "boolean", True), ("keycard_consent", "boolean", True),
]
CS_RECORDS_COLUMNS = [
    ("id", "bigint", True), ("guest_id", "bigint", True), ("department", "text", True),
    ("category", "text", True), ("severity", "text", True), ("channel", "text", True), ("agent", "text", True),
    ("guest_name", "text", False), ("phone", "text", False), ("id_number", "text", False),
    ("bank_card", "text", False), ("content", "text", True), ("legal_hold", "boolean", True),
    ("created_at", "timestamp with time zone", True),
]


@pytest.fixture(scope="module")
def pg() -> Iterator[PgCluster]:
    c = PgCluster()
    c.start()
    try:
        load_sample_sync(c.dsn(c.superuser, c.superuser_password), cs_records=5000, guests=500)
        c.psql(EXTRA_SQL)
        yield c
    finally:
        c.stop()


async def svc_connect(pg: PgCluster) -> asyncpg.Connection:
    return await asyncpg.connect(pg.dsn(pg.service_user, pg.service_password))


@pytest.fixture(scope="module")
def cat(pg: PgCluster) -> Catalog:
    async def load() -> Catalog:
        conn = await svc_connect(pg)
        try:
            return await load_catalog(conn)
        finally:
            await conn.close()
    return asyncio.run(load())


def cols(cat: Catalog, key: str) -> list[tuple[str, str, bool]]:
    return [(c.name, c.type_name, c.not_null) for c in cat.relations[key].columns]


async def test_load_time_under_one_second(pg: PgCluster) -> None:
    conn = await svc_connect(pg)
    try:
        await load_catalog(conn)  # warm-up: first use of each statement
        t0 = time.perf_counter()
        cat = await load_catalog(conn)
        elapsed = time.perf_counter() - t0
    finally:
        await conn.close()
    assert elapsed < 1.0, f"load_catalog took {elapsed:.3f}s"
    assert len(cat.relations) > 100 and len(cat.functions) > 1000


def test_snapshot_metadata(cat: Catalog, pg: PgCluster) -> None:
    assert cat.database == "hotel"
    assert cat.user == pg.service_user
    assert cat.server_version_num >= 100000
    assert cat.search_path == ("pg_catalog", "public")  # "$user" has no schema: dropped, as PostgreSQL does
    assert cat.schemas["other"].usable and not cat.schemas["hidden"].usable
    assert all(s.loaded for s in cat.schemas.values())
    assert not any(k.startswith(("pg_toast", "pg_temp")) for k in cat.schemas)


def test_every_partition_resolves_to_root(cat: Catalog) -> None:
    names = [name for name, _lo, _hi in partition_bounds()]
    assert len(names) >= 37
    root = cat.relations["public.cs_records"]
    assert root.kind == "partitioned_table" and root.root is None
    for name in names:
        rel = cat.resolve([name])
        assert rel is not None, name
        assert rel.kind == "table" and rel.is_partition and rel.parent == "public.cs_records"
        assert cat.root_of(rel) is root
        assert cat.protected_dependencies(rel, {"public.cs_records"}) == {"public.cs_records"}
    assert cat.descendants(root) == {f"public.{n}" for n in names}


def test_multilevel_partitions_and_inheritance(cat: Catalog) -> None:
    leaf = cat.resolve(["events_2024_a"])
    assert leaf is not None and leaf.parent == "public.events_2024" and leaf.root == "public.events"
    assert cat.root_of(leaf).qualified_name == "public.events"
    assert cat.relations["public.events_2024"].kind == "partitioned_table"
    dogs = cat.relations["public.dogs"]
    assert dogs.kind == "table" and not dogs.is_partition and dogs.parent == "public.animals"
    assert cat.root_of(dogs).qualified_name == "public.animals"
    assert [c.name for c in dogs.columns] == ["id", "name", "breed"]
    assert cat.protected_dependencies(cat.relations["public.animals"], {"public.dogs"}) == {"public.dogs"}


def test_view_dependencies(cat: Catalog) -> None:
    v1, v2 = cat.relations["public.cs_view"], cat.relations["public.cs_view2"]
    assert v1.kind == "view" and v2.kind == "view"
    assert v1.depends_on == {"public.cs_records"}
    assert v2.direct_depends_on == {"public.cs_view"}
    assert v2.depends_on == {"public.cs_view", "public.cs_records"}
    protected = {"public.cs_records", "public.guests"}
    assert cat.protected_dependencies(v1, protected) == {"public.cs_records"}
    assert cat.protected_dependencies(v2, protected) == {"public.cs_records"}
    mv = cat.relations["public.guest_regions"]
    assert mv.kind == "matview" and mv.depends_on == {"public.guests"}
    assert cat.protected_dependencies(mv, protected) == {"public.guests"}
    assert [(c.name, c.type_name) for c in mv.columns] == [("region", "text"), ("n", "bigint")]


def test_views_calling_user_functions(cat: Catalog) -> None:
    # pg_depend cannot see inside a SQL function body: the view must at least say it calls one.
    assert cat.relations["public.fn_view"].calls == {"public.guest_count"}
    over = cat.relations["other.over_fn_view"]
    assert over.depends_on == {"public.fn_view"} and over.calls == {"public.guest_count"}
    assert cat.relations["public.cs_view"].calls == frozenset()  # built-ins are not listed


def test_views_over_system_views(cat: Catalog) -> None:
    stats = cat.resolve(["pg_stats"])
    assert stats is not None and stats.qualified_name == "pg_catalog.pg_stats" and stats.kind == "view"
    # A user view over a system view records the dependency ...
    assert cat.relations["public.stats_view"].depends_on == {"pg_catalog.pg_stats"}
    # ... but PostgreSQL records no dependency on *pinned* objects (initdb-time catalog objects: the
    # catalog tables, built-in functions): pg_stats -> pg_statistic and a view over pg_class are blank.
    # The engine must know catalog relations by name (deny-list), not through depends_on.
    assert "pg_catalog.pg_statistic" not in stats.depends_on
    assert cat.relations["public.class_view"].depends_on == frozenset()


def test_search_path_resolution(cat: Catalog) -> None:
    assert cat.resolve(["guests"], ["public"]) is cat.relations["public.guests"]
    assert cat.resolve(["guests"], ["other", "public"]) is cat.relations["other.guests"]
    assert cat.resolve(["guests"]) is cat.relations["public.guests"]
    assert cat.resolve(["guests"], ["hidden", "public"]) is cat.relations["public.guests"]
    assert cat.resolve(["hotel", "other", "guests"]) is cat.relations["other.guests"]
    assert cat.resolve(["postgres", "public", "guests"]) is None
    assert cat.resolve(["Guests"]) is cat.relations['public."Guests"']
    assert cols(cat, 'public."Guests"') == [("x", "numeric(10,2)", False)]
    assert cols(cat, "other.guests") == [("id", "integer", False), ("nick", "character varying(20)", False)]
    assert cat.resolve(["pg_class"]) is cat.relations["pg_catalog.pg_class"]
    assert cat.resolve(["pg_class"], ["public", "pg_catalog"]) is cat.relations["public.pg_class"]


async def test_resolve_agrees_with_postgresql(cat: Catalog, pg: PgCluster) -> None:
    """Differential: Catalog.resolve vs PostgreSQL's own lookup (to_regclass) under the same search_path."""
    paths = [["public"], ["other", "public"], ["hidden", "public"], ["public", "pg_catalog"],
             ["other"], [], ["missing", "other", "public"], ["public", "other"]]
    names = ["guests", "Guests", "pg_class", "cs_records", "cs_view2", "dogs", "over_fn_view", "pg_stats",
             "nope"]
    conn = await svc_connect(pg)
    try:
        for path in paths:
            await conn.execute("SELECT set_config('search_path', $1, false)",
                               ", ".join('"' + s + '"' for s in path) if path else "")
            for name in names:
                want = await conn.fetchval("SELECT to_regclass($1)::oid", '"' + name + '"')
                got = cat.resolve([name], path)
                assert (got.oid if got else None) == want, (path, name)
    finally:
        await conn.close()


def test_column_types_match_schema_sql(cat: Catalog) -> None:
    assert cols(cat, "public.guests") == GUESTS_COLUMNS
    assert cols(cat, "public.cs_records") == CS_RECORDS_COLUMNS
    # partitions carry the same columns
    first = partition_bounds()[0][0]
    assert cols(cat, qualify("public", first)) == CS_RECORDS_COLUMNS
    guests = cat.relations["public.guests"]
    assert [c.position for c in guests.columns] == list(range(1, 11))
    assert guests.column("vip").type_oid == 16  # type: ignore[union-attr]
    assert guests.owner == "postgres" and guests.kind == "table"


def test_functions(cat: Catalog) -> None:
    (gc,) = cat.resolve_function(["guest_count"])
    assert (gc.schema, gc.arg_types, gc.return_type, gc.language) == ("public", (), "bigint", "sql")
    assert gc.security_definer and gc.volatility == "stable" and not gc.is_builtin and not gc.leakproof
    fmts = cat.resolve_function(["public", "fmt"])
    assert sorted(f.arg_types for f in fmts) == [("integer",), ("text", "text[]")]
    assert [f.variadic for f in sorted(fmts, key=lambda f: f.arg_types)] == [False, True]
    lower = cat.resolve_function(["lower"])
    assert lower and all(f.is_builtin and f.schema == "pg_catalog" for f in lower)
    assert ("text",) in [f.arg_types for f in lower]
    (eq,) = [f for f in cat.resolve_function(["texteq"]) if f.arg_types == ("text", "text")]
    assert eq.leakproof and eq.volatility == "immutable" and eq.language == "internal"
    assert any(f.kind == "aggregate" for f in cat.resolve_function(["count"]))
    assert any(f.returns_set for f in cat.resolve_function(["generate_series"]))


async def test_temp_tables_and_session_search_path(pg: PgCluster) -> None:
    conn = await svc_connect(pg)
    try:
        await conn.execute("CREATE TEMP TABLE guests (x int); SET search_path = other, public")
        cat = await load_catalog(conn)
    finally:
        await conn.close()
    assert cat.search_path == ("pg_catalog", "other", "public")  # the temp schema is dropped
    assert not any(r.schema.startswith("pg_temp") for r in cat.relations.values())
    assert cat.resolve(["guests"]) is cat.relations["other.guests"]


async def test_schema_filter(pg: PgCluster) -> None:
    conn = await svc_connect(pg)
    try:
        await conn.execute("BEGIN")  # inside a caller's transaction: no nested transaction is opened
        cat = await load_catalog(conn, schemas=["public"])
        await conn.execute("ROLLBACK")
    finally:
        await conn.close()
    assert {r.schema for r in cat.relations.values()} == {"pg_catalog", "information_schema", "public"}
    assert not cat.schemas["other"].loaded
    # "other" exists but was not loaded: an unqualified name searched there first cannot be decided
    assert cat.resolve(["guests"], ["other", "public"]) is None
    assert cat.resolve(["guests"], ["public", "other"]) is cat.relations["public.guests"]
    # edges through unloaded schemas are still complete
    assert cat.relations["public.fn_view"].calls == {"public.guest_count"}


def test_json_snapshot_roundtrip(cat: Catalog) -> None:
    back = catalog_from_dict(json.loads(json.dumps(catalog_to_dict(cat))))
    assert back == cat and back.fingerprint == cat.fingerprint
    assert back.resolve(["guests"], ["other", "public"]) == cat.relations["other.guests"]
    assert back.snapshot_time == cat.snapshot_time
