"""rules.catalog without a server: hand-built catalogs, name resolution, partitions, view dependencies."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from rules.catalog import (
    Catalog,
    Column,
    Function,
    Relation,
    Schema,
    catalog_from_dict,
    catalog_to_dict,
    normalise_identifier,
    parse_search_path,
    qualify,
    quote_ident,
    split_qualified,
)

_oid = iter(range(16384, 100000))


def table(schema: str, name: str, kind: str = "table", *cols: str, parent: str | None = None,
          parents: tuple[str, ...] = (), reads: tuple[str, ...] = (), calls: tuple[str, ...] = (),
          is_partition: bool = False) -> Relation:
    columns = tuple(Column(c, "text", 25, False, i) for i, c in enumerate(cols or ("id",), start=1))
    return Relation(oid=next(_oid), schema=schema, name=name, kind=kind, columns=columns, parent=parent,
                    parents=parents, direct_depends_on=frozenset(reads), direct_calls=frozenset(calls),
                    is_partition=is_partition, owner="postgres")


def fn(schema: str, name: str, *args: str, **kw: object) -> Function:
    return Function(oid=next(_oid), schema=schema, name=name, arg_types=tuple(args), return_type="text",
                    language="sql" if schema != "pg_catalog" else "internal",
                    is_builtin=schema in ("pg_catalog", "information_schema"), **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def cat() -> Catalog:
    rels = [
        table("pg_catalog", "pg_class", "table", "oid", "relname"),
        table("pg_catalog", "pg_statistic", "table", "starelid"),
        table("pg_catalog", "pg_stats", "view", "tablename", reads=("pg_catalog.pg_statistic",)),
        table("public", "pg_class", "table", "evil"),
        table("public", "guests", "table", "id", "name", "phone"),
        table("public", "Guests", "table", "x"),
        table("other", "guests", "table", "id", "nick"),
        table("nousage", "guests", "table", "id"),
        table("nousage", "lonely", "table", "id"),
        # two-level partitioning: cs_records -> cs_records_2024 -> cs_records_2024_01
        table("public", "cs_records", "partitioned_table", "id", "content"),
        table("public", "cs_records_2024", "partitioned_table", "id", "content",
              parent="public.cs_records", is_partition=True),
        table("public", "cs_records_2024_01", "table", "id", "content",
              parent="public.cs_records_2024", is_partition=True),
        table("public", "cs_records_2025_01", "table", "id", "content",
              parent="public.cs_records", is_partition=True),
        # inheritance, including a multiple-inheritance child
        table("public", "animals", "table", "id"),
        table("public", "dogs", "table", "id", "breed", parent="public.animals"),
        table("public", "tagged", "table", "tag"),
        table("public", "puppies", "table", "id", "breed", "tag",
              parents=("public.dogs", "public.tagged")),
        # view -> view -> table, a matview, a view over a partition, a view calling a user function
        table("public", "cs_view", "view", "id", reads=("public.cs_records",)),
        table("public", "cs_view2", "view", "id", reads=("public.cs_view",)),
        table("public", "guest_regions", "matview", "region", reads=("public.guests",)),
        table("public", "jan_view", "view", "id", reads=("public.cs_records_2024_01",)),
        table("public", "animal_view", "view", "id", reads=("public.animals",)),
        table("public", "fn_view", "view", "n", calls=("public.guest_count",)),
        table("public", "fn_view2", "view", "n", reads=("public.fn_view", "public.animals")),
        table("public", "plain", "table", "id"),
    ]
    funcs = [
        fn("pg_catalog", "lower", "text"),
        fn("pg_catalog", "length", "text", leakproof=True),
        fn("pg_catalog", "length", "bytea"),
        fn("public", "length", "text"),      # hidden by pg_catalog.length(text)
        fn("public", "length", "integer"),   # a new overload: a candidate
        fn("public", "fmt", "integer"),
        fn("public", "fmt", "text"),
        fn("other", "fmt", "integer"),       # hidden by public.fmt(integer) when public is first
        fn("public", "guest_count", security_definer=True),
    ]
    schemas = [Schema("pg_catalog"), Schema("public"), Schema("other"), Schema("nousage", usable=False),
               Schema("empty")]
    return Catalog.build(rels, funcs, database="hotel", user="svc", search_path=("pg_catalog", "public"),
                         schemas=schemas, server_version_num=150000,
                         snapshot_time=datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC))


def q(rel: Relation | None) -> str | None:
    return None if rel is None else rel.qualified_name


# -- identifiers ----------------------------------------------------------------------------


def test_normalise_identifier_folds_ascii_only() -> None:
    assert normalise_identifier("Guests", False) == "guests"
    assert normalise_identifier("Guests", True) == "Guests"
    assert normalise_identifier("ÄBC", False) == "Äbc"  # PostgreSQL (UTF-8) leaves non-ASCII alone
    assert normalise_identifier("İX", False) == "İx"    # str.lower would turn İ into 'i̇'


def test_normalise_identifier_truncates_to_63_bytes() -> None:
    assert normalise_identifier("a" * 70, False) == "a" * 63
    assert normalise_identifier("B" * 70, True) == "B" * 63
    # 2-byte characters: clipped at a character boundary (31 chars = 62 bytes)
    assert normalise_identifier("é" * 40, True) == "é" * 31


def test_qualify_and_split_roundtrip() -> None:
    assert qualify("public", "guests") == "public.guests"
    assert qualify("public", "Guests") == 'public."Guests"'
    assert qualify("a.b", "c") != qualify("a", "b.c")
    assert quote_ident('we"ird') == '"we""ird"'
    for schema, name in [("public", "guests"), ("public", "Guests"), ("a.b", "c"), ("x", 'we"ird'), ("s", "1x")]:
        assert split_qualified(qualify(schema, name)) == (schema, name)
    assert split_qualified('Hotel . Public."Guests"') == ("hotel", "public", "Guests")
    for bad in ["", "a.", ".a", 'a."b', 'a.""', "a b"]:
        with pytest.raises(ValueError):
            split_qualified(bad)


def test_parse_search_path() -> None:
    assert parse_search_path('"$user", public', "svc") == ("svc", "public")
    assert parse_search_path('Other, "My Schema",pg_temp', "svc") == ("other", "My Schema", "pg_temp")
    assert parse_search_path('""', "svc") == ()
    with pytest.raises(ValueError):
        parse_search_path("a,,b", "svc")


# -- relation resolution ------------------------------------------------------------------------


def test_search_path_order(cat: Catalog) -> None:
    assert q(cat.resolve(["guests"])) == "public.guests"
    assert q(cat.resolve(["guests"], ["public"])) == "public.guests"
    assert q(cat.resolve(["guests"], ["other", "public"])) == "other.guests"
    assert q(cat.resolve(["guests"], ["public", "other"])) == "public.guests"
    assert q(cat.resolve(["nick_only"], ["other", "public"])) is None
    assert cat.resolve(["guests"], []) is None  # only pg_catalog is searched
    assert q(cat.resolve(["guests"], ["missing", "empty", "other"])) == "other.guests"  # nonexistent skipped


def test_search_path_skips_schemas_without_usage(cat: Catalog) -> None:
    # PostgreSQL skips a search_path schema the user lacks USAGE on: so must we,
    # or the engine would think "guests" is nousage.guests while PostgreSQL reads public.guests.
    assert q(cat.resolve(["guests"], ["nousage", "public"])) == "public.guests"
    assert cat.resolve(["lonely"], ["nousage"]) is None
    # explicitly qualified: resolves (PostgreSQL will raise permission denied itself)
    assert q(cat.resolve(["nousage", "lonely"])) == "nousage.lonely"


def test_user_placeholder_and_temp_schemas_in_path(cat: Catalog) -> None:
    c2 = Catalog.build([table("svc", "mine"), table("public", "mine")], database="hotel", user="svc")
    assert q(c2.resolve(["mine"], ["$user", "public"])) == "svc.mine"
    assert q(c2.resolve(["mine"], ["pg_temp", "public"])) == "public.mine"
    assert q(cat.resolve(["guests"], ["pg_temp_3", "public"])) == "public.guests"


def test_schema_qualified(cat: Catalog) -> None:
    assert q(cat.resolve(["other", "guests"])) == "other.guests"
    assert q(cat.resolve(["public", "guests"], ["other"])) == "public.guests"
    assert cat.resolve(["missing", "guests"]) is None
    assert cat.resolve(["other", "plain"]) is None


def test_catalog_qualified(cat: Catalog) -> None:
    assert q(cat.resolve(["hotel", "public", "guests"])) == "public.guests"
    assert q(cat.resolve(["hotel", "other", "guests"])) == "other.guests"
    assert cat.resolve(["postgres", "public", "guests"]) is None
    assert cat.resolve(["Hotel", "public", "guests"]) is None  # quoted "Hotel" is another database
    assert cat.resolve(["x", "hotel", "public", "guests"]) is None
    assert cat.resolve([]) is None
    with pytest.raises(TypeError):
        cat.resolve("guests")  # a string is not a list of parts


def test_quoted_vs_unquoted_case(cat: Catalog) -> None:
    # SELECT * FROM Guests  -> guests;  SELECT * FROM "Guests" -> another table
    assert q(cat.resolve([normalise_identifier("Guests", False)])) == "public.guests"
    assert q(cat.resolve([normalise_identifier("Guests", True)])) == 'public."Guests"'
    assert cat.resolve(["GUESTS"]) is None
    assert q(cat.resolve(["public", "Guests"])) == 'public."Guests"'
    assert cat.relations['public."Guests"'].column_names == ("x",)


def test_pg_catalog_precedence(cat: Catalog) -> None:
    # pg_catalog is searched first unless the path lists it elsewhere
    assert q(cat.resolve(["pg_class"])) == "pg_catalog.pg_class"
    assert q(cat.resolve(["pg_class"], ["public"])) == "pg_catalog.pg_class"
    assert q(cat.resolve(["pg_class"], ["public", "pg_catalog"])) == "public.pg_class"
    assert q(cat.resolve(["pg_class"], ["pg_catalog", "public"])) == "pg_catalog.pg_class"
    assert q(cat.resolve(["public", "pg_class"])) == "public.pg_class"
    assert cat.effective_search_path(["public"]) == ("pg_catalog", "public")
    assert cat.effective_search_path(["public", "pg_catalog"]) == ("public", "pg_catalog")


def test_unloaded_schema_fails_closed() -> None:
    # The snapshot did not load "other": an unqualified name searched there first cannot be decided.
    c2 = Catalog.build([table("public", "guests")], database="hotel",
                       schemas=[Schema("pg_catalog"), Schema("public"), Schema("other", loaded=False)])
    assert c2.resolve(["guests"], ["other", "public"]) is None
    assert q(c2.resolve(["guests"], ["public", "other"])) == "public.guests"
    assert c2.resolve_function(["f"], ["other", "public"]) == ()


def test_candidates_and_lookups(cat: Catalog) -> None:
    assert {r.qualified_name for r in cat.candidates("guests")} == {"public.guests", "other.guests",
                                                                     "nousage.guests"}
    g = cat.get("public", "guests")
    assert g is not None and cat.by_oid(g.oid) is g
    assert g.column("phone") == Column("phone", "text", 25, False, 3)
    assert g.column("nope") is None


# -- partitions and inheritance -----------------------------------------------------------------


def test_partitions_resolve_to_root(cat: Catalog) -> None:
    for name in ["cs_records_2024", "cs_records_2024_01", "cs_records_2025_01", "cs_records"]:
        rel = cat.resolve([name])
        assert rel is not None
        assert cat.root_of(rel).qualified_name == "public.cs_records"
    leaf = cat.relations["public.cs_records_2024_01"]
    assert leaf.parent == "public.cs_records_2024"
    assert leaf.root == "public.cs_records"
    assert leaf.ancestors == {"public.cs_records_2024", "public.cs_records"}
    assert cat.relations["public.cs_records"].root is None
    assert cat.root_of(cat.relations["public.plain"]).qualified_name == "public.plain"
    assert cat.descendants("public.cs_records") == {"public.cs_records_2024", "public.cs_records_2024_01",
                                                    "public.cs_records_2025_01"}


def test_inheritance_children(cat: Catalog) -> None:
    dogs = cat.relations["public.dogs"]
    assert cat.root_of(dogs).qualified_name == "public.animals"
    puppies = cat.relations["public.puppies"]
    assert puppies.parents == ("public.dogs", "public.tagged") and puppies.parent == "public.dogs"
    assert cat.root_of(puppies).qualified_name == "public.animals"
    assert puppies.ancestors == {"public.dogs", "public.animals", "public.tagged"}


def test_protected_dependencies_partitions_and_inheritance(cat: Catalog) -> None:
    protected = {"public.cs_records", "public.guests", "public.tagged"}
    # a partition carries its root's rules
    assert cat.protected_dependencies(cat.relations["public.cs_records_2024_01"], protected) == {"public.cs_records"}
    # multiple inheritance: protected through the second parent
    assert cat.protected_dependencies(cat.relations["public.puppies"], protected) == {"public.tagged"}
    # a parent scan reads its children's rows: protecting only a child protects the parent too
    assert cat.protected_dependencies(cat.relations["public.animals"], {"public.puppies"}) == {"public.puppies"}
    assert cat.protected_dependencies(cat.relations["public.plain"], protected) == set()
    # the relation itself counts
    assert cat.protected_dependencies(cat.relations["public.guests"], protected) == {"public.guests"}


# -- views ------------------------------------------------------------------------------------------


def test_view_dependencies_transitive(cat: Catalog) -> None:
    v1, v2 = cat.relations["public.cs_view"], cat.relations["public.cs_view2"]
    assert v1.depends_on == {"public.cs_records"}
    assert v2.direct_depends_on == {"public.cs_view"}
    assert v2.depends_on == {"public.cs_view", "public.cs_records"}
    protected = {"public.cs_records", "public.guests"}
    assert cat.protected_dependencies(v2, protected) == {"public.cs_records"}
    assert cat.protected_dependencies(cat.relations["public.guest_regions"], protected) == {"public.guests"}
    # a view over one partition reads the protected root's data
    assert cat.protected_dependencies(cat.relations["public.jan_view"], protected) == {"public.cs_records"}
    # a view over an inheritance parent reads a protected child's rows
    assert cat.protected_dependencies(cat.relations["public.animal_view"], {"public.dogs"}) == {"public.dogs"}
    assert cat.protected_dependencies(cat.relations["pg_catalog.pg_stats"],
                                      {"pg_catalog.pg_statistic"}) == {"pg_catalog.pg_statistic"}


def test_view_function_calls_transitive(cat: Catalog) -> None:
    assert cat.relations["public.fn_view"].calls == {"public.guest_count"}
    v = cat.relations["public.fn_view2"]
    assert v.calls == {"public.guest_count"} and v.direct_calls == frozenset()
    assert v.depends_on == {"public.fn_view", "public.animals"}


def test_view_cycle_does_not_hang() -> None:
    c2 = Catalog.build([table("public", "a", "view", reads=("public.b",)),
                        table("public", "b", "view", reads=("public.a", "public.t")),
                        table("public", "t")])
    assert c2.relations["public.a"].depends_on == {"public.b", "public.t"}


# -- functions --------------------------------------------------------------------------------------


def sigs(funcs: tuple[Function, ...]) -> list[tuple[str, tuple[str, ...]]]:
    return [(f.schema, f.arg_types) for f in funcs]


def test_resolve_function_overloads(cat: Catalog) -> None:
    assert sigs(cat.resolve_function(["fmt"])) == [("public", ("integer",)), ("public", ("text",))]
    assert sigs(cat.resolve_function(["fmt"], ["other", "public"])) == [
        ("other", ("integer",)), ("public", ("text",))]
    assert sigs(cat.resolve_function(["other", "fmt"])) == [("other", ("integer",))]
    assert sigs(cat.resolve_function(["hotel", "public", "fmt"])) == [("public", ("integer",)), ("public", ("text",))]
    assert cat.resolve_function(["postgres", "public", "fmt"]) == ()
    assert cat.resolve_function(["nope"]) == ()


def test_resolve_function_pg_catalog_first(cat: Catalog) -> None:
    found = cat.resolve_function(["length"], ["public"])
    assert sigs(found) == [("pg_catalog", ("text",)), ("pg_catalog", ("bytea",)), ("public", ("integer",))]
    assert found[0].is_builtin and found[0].leakproof and not found[2].is_builtin
    found = cat.resolve_function(["length"], ["public", "pg_catalog"])
    assert sigs(found) == [("public", ("text",)), ("public", ("integer",)), ("pg_catalog", ("bytea",))]
    gc = cat.resolve_function(["guest_count"])
    assert len(gc) == 1 and gc[0].security_definer and gc[0].volatile


# -- snapshots --------------------------------------------------------------------------------------


def test_json_roundtrip(cat: Catalog) -> None:
    d = catalog_to_dict(cat)
    text = json.dumps(d)
    back = catalog_from_dict(json.loads(text))
    assert back == cat
    assert back.fingerprint == cat.fingerprint and hash(back) == hash(cat)
    assert back.snapshot_time == cat.snapshot_time
    assert back.schemas["nousage"].usable is False
    assert q(back.resolve(["guests"], ["nousage", "other"])) == "other.guests"
    assert back.relations["public.cs_view2"].depends_on == {"public.cs_view", "public.cs_records"}
    with pytest.raises(ValueError):
        catalog_from_dict({**d, "format": 99})


def test_catalog_is_immutable(cat: Catalog) -> None:
    with pytest.raises(AttributeError):
        cat.database = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        cat.relations["public.x"] = table("public", "x")  # type: ignore[index]
    assert isinstance(hash(cat.relations["public.guests"]), int)
    with pytest.raises(ValueError):
        Catalog(relations={"public.wrong": table("public", "right")}, functions={}, search_path=(),
                server_version_num=0, snapshot_time=datetime.now(UTC), database="d")
