"""masking against a real PostgreSQL: SQL result == Python twin, same type, never an error.

Every mask kind runs over a table of tricky inputs (Chinese, emoji, combining
marks, empty, NULL, very long, short, quotes/backslashes, float and calendar
edges) through psycopg; each SQL result must equal ``mask_value`` of the value
PostgreSQL actually stored, and ``pg_typeof`` must not change. Values Python
cannot represent (infinity dates, 4714 BC, year 294276) are checked as text.
A hostile search_path (functions and operators named like the ones the masks
use) must change nothing.

Self-contained: its own module-scoped cluster, no proxy.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from sqlglot import exp

from masking import MaskSpec, can_mask, mask_sql, mask_value, parse_mask
from proxy.demo.pgcluster import PgCluster


SALT = "pgwarden-test-salt"
TZ = "Asia/Shanghai"


@pytest.fixture(scope="module")
def cluster() -> Iterator[PgCluster]:
    with PgCluster() as c:
        yield c


@pytest.fixture(scope="module")
def conn(cluster: PgCluster) -> Iterator[Any]:
    with psycopg.connect(cluster.dsn(cluster.superuser, cluster.superuser_password), autocommit=True) as c:
        c.execute(f"SET TimeZone = '{TZ}'")
        c.execute("CREATE TYPE public.mood AS ENUM ('sad', 'ok', 'happy')")
        c.execute("CREATE DOMAIN public.short_code AS text CHECK (length(VALUE) < 5)")
        yield c


# -- inputs -------------------------------------------------------------------

TEXT_INPUTS: list[str | None] = [
    None, "", " ", "a", "张", "张三", "张三丰", "欧阳娜娜", "John Smith",
    "12345", "1234567", "12345678", "11010119900307", "110101900307777", "110101199003077777",
    "11010119900307777X", "11010119900307777x", "１１０１０１１９９００３０７７７７７",
    "6222021234567890", "6222021234567890123", "6222 0212 3456 7890 123", "622202123456", "62220212345",
    "13812341234", "+86 138 1234 1234", "１３８１２３４１２３４", "1381234123",
    "zhang.san@example.com", "a@b.cn", "ab@c", "@example.com", "no-at-sign", "x@", "@", "@@",
    'we"ird@"at"@例子.中国', "first@second@host.cn", "用户@例子.中国",
    "北京市朝阳区建国路88号SOHO现代城", "上海", "上海市", "北京市朝阳区建国路",
    "😀", "😀😁😂🤣😃😄😅😆", "a😀b@😀.cn", "👨‍👩‍👧‍👦 family", "e\u0301cole", "Z\u0351\u0352algo",
    "O'Brien \\ back\\slash", "tab\tnew\nline\r", "%s %(x)s {0}", "trailing spaces   ", "   leading",
    "客人身份证110101199003077777，电话13812341234，房间 1203", "mixed 123４５６ end", "a1b22c333d4444e55555f666666",
    "\x0112345", "\x01\x01", "\x01", "*12345", "\ue000123456", "x" * 100_000, "1" * 100_000, "客人电话13812341234，" * 5_000,
]
TEXT_TYPES = ["text", "character varying", "character(24)", "public.short_code"]

INT_INPUTS: dict[str, list[str | None]] = {
    "smallint": [None, "0", "1", "-1", "49", "50", "-50", "149", "150", "12345", "32767", "-32768", "32749"],
    "integer": [None, "0", "1", "-1", "50", "-50", "1250", "-1250", "2147483647", "-2147483648", "2147483600"],
    "bigint": [None, "0", "-1", "50", "9223372036854775807", "-9223372036854775808", "9223372036854775750",
               "123456789012"],
}
NUMERIC_INPUTS: list[str | None] = [
    None, "0", "12.345", "-12.345", "0.005", "-0.005", "2.5", "-2.5", "99999999.99", "1e20", "0.0000001",
    "123456789012345678901234567890.123456789", "-0.001", "NaN", "Infinity", "-Infinity",
]
FLOAT8_INPUTS: list[str | None] = [
    None, "0", "-0", "1.5", "2.5", "-2.5", "0.1", "2.675", "1234.5678", "0.30000000000000004", "1e300", "-1e-300",
    "1.7976931348623157e308", "-1.7976931348623157e308", "5e-324", "123456789.123456789", "NaN", "Infinity",
    "-Infinity",
]
FLOAT4_INPUTS: list[str | None] = [
    None, "0", "1.5", "2.5", "0.1", "123456.789", "3.4028235e38", "-3.4028235e38", "1e-45", "1.17549435e-38",
    "16777217", "NaN", "Infinity", "-Infinity",
]
DATE_INPUTS: list[str | None] = [None, "2024-05-06", "2024-01-01", "2000-02-29", "1999-12-31", "0001-01-01",
                                 "9999-12-31"]
TS_INPUTS: list[str | None] = [None, "2024-05-06 12:34:56.789", "2024-01-01 00:00:00", "1999-12-31 23:59:59.999999",
                               "1900-06-15 00:00:00", "0002-03-04 05:06:07"]
TSTZ_INPUTS: list[str | None] = [
    None, "2024-05-06 12:34:56+08", "2023-12-31 20:00:00+00",  # 2024-01-01 04:00 in Shanghai: year 2024
    "2024-01-01 00:30:00+08", "1990-07-01 12:00:00+08",  # China had DST in 1986-1991
    "1950-06-01 00:00:00-05", "2038-01-19 03:14:08+00",
]

TEXT_SPECS = [parse_mask(k) for k in
              ("resident_id", "bank_card", "mobile", "name", "email", "address", "redact_text")]
TEXT_SPECS += [parse_mask({"redact_text": 4}), parse_mask({"hash": SALT}), parse_mask({"hash": "it's a \\ salt"}),
               parse_mask({"constant": "***"}), parse_mask({"constant": ""}), parse_mask("null")]
ROUNDS = [parse_mask({"round": d}) for d in (-3, -2, -1, 0, 1, 2, 5)]


def _id(s: MaskSpec) -> str:
    return repr(s).replace(" ", "")


def run(conn: Any, spec: MaskSpec, pg_type: str, inputs: Sequence[str | None],
        as_text: bool = False) -> list[tuple[Any, Any, str, str]]:
    """Mask ``inputs`` (text, cast to ``pg_type``) in one statement: [(value, masked, type in, type out)]."""
    masked = mask_sql(spec, exp.column("v", "t"), pg_type).sql(dialect="postgres").replace("%", "%%")
    if as_text:
        out = f"CAST({masked} AS pg_catalog.text)"
        value = "CAST(t.v AS pg_catalog.text)"
    else:
        out, value = masked, "t.v"
    sql = (
        f"SELECT {value}, {out}, CAST(pg_catalog.pg_typeof(t.v) AS pg_catalog.text), "
        f"CAST(pg_catalog.pg_typeof({masked}) AS pg_catalog.text) "
        f"FROM (SELECT CAST(u.x AS {pg_type}) AS v, u.i "
        "FROM pg_catalog.unnest(CAST(%s AS pg_catalog.text[])) WITH ORDINALITY AS u(x, i)) AS t ORDER BY t.i"
    )
    return conn.execute(sql, [list(inputs)]).fetchall()


def same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, Decimal) and isinstance(b, Decimal) and a.is_nan() and b.is_nan():
        return True
    return type(a) is type(b) and a == b


def check(conn: Any, spec: MaskSpec, pg_type: str, inputs: Sequence[str | None]) -> None:
    rows = run(conn, spec, pg_type, inputs)
    assert len(rows) == len(inputs)
    for value, got, type_in, type_out in rows:
        assert type_out == type_in, (spec, pg_type)
        expected = mask_value(spec, value, pg_type)
        short = repr(value)[:60]
        assert same(got, expected), f"{spec} on {pg_type} {short}: SQL {got!r:.80} != Python {expected!r:.80}"


# -- SQL == Python -----------------------------------------------------------------


@pytest.mark.parametrize("pg_type", TEXT_TYPES)
@pytest.mark.parametrize("spec", TEXT_SPECS, ids=_id)
def test_text_kinds(conn: Any, spec: MaskSpec, pg_type: str) -> None:
    if pg_type == "public.short_code" and spec.kind.value not in ("null", "constant"):
        assert not can_mask(spec, pg_type)  # a domain is "other": only null/constant
        return
    inputs = TEXT_INPUTS
    if pg_type == "public.short_code":
        inputs = [v for v in TEXT_INPUTS if v is None or len(v) < 5]
    check(conn, spec, pg_type, inputs)


@pytest.mark.parametrize("pg_type", list(INT_INPUTS))
@pytest.mark.parametrize("spec", [*ROUNDS, parse_mask({"hash": SALT}), parse_mask({"constant": "-7"}),
                                  parse_mask("null")], ids=_id)
def test_integers(conn: Any, spec: MaskSpec, pg_type: str) -> None:
    check(conn, spec, pg_type, INT_INPUTS[pg_type])


@pytest.mark.parametrize("pg_type,inputs", [("numeric", NUMERIC_INPUTS), ("numeric(40,10)", NUMERIC_INPUTS[:-3]),
                                            ("double precision", FLOAT8_INPUTS), ("real", FLOAT4_INPUTS)])
@pytest.mark.parametrize("spec", [*ROUNDS, parse_mask({"round": 20}), parse_mask({"round": -30}),
                                  parse_mask({"constant": "0.5"}), parse_mask("null")], ids=_id)
def test_numbers(conn: Any, spec: MaskSpec, pg_type: str, inputs: list[str | None]) -> None:
    check(conn, spec, pg_type, inputs)


@pytest.mark.parametrize("pg_type,inputs", [
    ("date", DATE_INPUTS),
    ("timestamp without time zone", TS_INPUTS),
    ("timestamp(3) without time zone", TS_INPUTS),
    ("timestamp with time zone", TSTZ_INPUTS),
])
@pytest.mark.parametrize("spec", [parse_mask("date_to_year"), parse_mask("null")], ids=_id)
def test_dates(conn: Any, spec: MaskSpec, pg_type: str, inputs: list[str | None]) -> None:
    check(conn, spec, pg_type, inputs)


@pytest.mark.parametrize("pg_type,constant", [("date", "1970-01-01"), ("timestamp", "1970-01-01 00:00:00"),
                                              ("timestamp with time zone", "1970-01-01 00:00:00+00")])
def test_date_constants(conn: Any, pg_type: str, constant: str) -> None:
    check(conn, parse_mask({"constant": constant}), pg_type, DATE_INPUTS[:3])


@pytest.mark.parametrize("pg_type,inputs", [
    ("jsonb", [None, '{"a": 1}']), ("uuid", [None, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"]),
    ("boolean", [None, "true"]), ("bytea", [None, "\\x00ff"]), ("inet", [None, "10.0.0.1"]),
    ("text[]", [None, "{a,b}"]), ("integer[]", [None, "{1,2}"]), ("public.mood", [None, "happy"]),
    ("public.mood[]", [None, "{sad,ok}"]), ("public.short_code", [None, "ab"]),
])
def test_null_on_other_types(conn: Any, pg_type: str, inputs: list[str | None]) -> None:
    rows = run(conn, parse_mask("null"), pg_type, inputs)
    assert [r[1] for r in rows] == [None] * len(inputs)
    assert all(r[2] == r[3] for r in rows)


@pytest.mark.parametrize("pg_type,constant", [("jsonb", '{"masked": true}'), ("public.mood", "ok"),
                                              ("text[]", "{}"), ("boolean", "false")])
def test_constant_on_other_types(conn: Any, pg_type: str, constant: str) -> None:
    rows = run(conn, parse_mask({"constant": constant}), pg_type, [None, None], as_text=True)
    expected = conn.execute(f"SELECT CAST(CAST(%s AS {pg_type}) AS text)", [constant]).fetchone()[0]
    assert [r[1] for r in rows] == [expected, expected]
    assert all(r[2] == r[3] for r in rows)


# -- values Python cannot hold: as text, and never an error ---------------------------------


@pytest.mark.parametrize("pg_type,value,expected", [
    ("date", "infinity", "infinity"),
    ("date", "-infinity", "-infinity"),
    ("date", "4714-11-24 BC", "4713-01-01 BC"),  # no 1 January in 4714 BC: the earliest one
    ("date", "4714-12-31 BC", "4713-01-01 BC"),
    ("date", "4713-06-01 BC", "4713-01-01 BC"),
    ("date", "0044-03-15 BC", "0044-01-01 BC"),
    ("date", "5874897-12-31", "5874897-01-01"),
    ("date", "294277-06-01", "294277-01-01"),
    ("timestamp", "infinity", "infinity"),
    ("timestamp", "-infinity", "-infinity"),
    ("timestamp", "4714-11-24 00:00:00 BC", "4713-01-01 00:00:00 BC"),
    ("timestamp", "0044-03-15 12:00:00 BC", "0044-01-01 00:00:00 BC"),
    ("timestamp", "294276-12-31 23:59:59.999999", "294276-01-01 00:00:00"),
    ("timestamptz", "infinity", "infinity"),
    ("timestamptz", "-infinity", "-infinity"),
])
def test_date_edges_as_text(conn: Any, pg_type: str, value: str, expected: str) -> None:
    rows = run(conn, parse_mask("date_to_year"), pg_type, [value], as_text=True)
    assert rows[0][1] == expected and rows[0][2] == rows[0][3]


@pytest.mark.parametrize("zone", ["UTC", "Asia/Shanghai", "America/Los_Angeles", "Pacific/Kiritimati",
                                  "Etc/GMT+12", "Asia/Kathmandu"])
def test_timestamptz_edges_in_any_time_zone(conn: Any, zone: str) -> None:
    edges = ["4714-11-24 00:00:00+00 BC", "4714-12-31 23:59:59+00 BC", "4713-01-01 12:00:00+00 BC",
             "294276-12-31 23:59:59.999999+00", "2023-12-31 23:30:00+00", "2024-01-01 00:30:00+14"]
    conn.execute(f"SET TimeZone = '{zone}'")
    try:
        rows = run(conn, parse_mask("date_to_year"), "timestamptz", edges, as_text=True)
        for value, got, t_in, t_out in rows:
            assert t_in == t_out == "timestamp with time zone"
            # 1 January 00:00 local of the value's local year (or of the earliest year that has one)
            local_year = conn.execute("SELECT pg_catalog.to_char(CAST(%s AS timestamptz), 'YYYY BC')",
                                      [value]).fetchone()[0]
            year, era = local_year.split()
            year = "4713" if (year, era) == ("4714", "BC") else year
            assert got.startswith(f"{year}-01-01 00:00:00"), (zone, value, got)
            assert got.endswith(" BC") == (era == "BC"), (zone, value, got)
    finally:
        conn.execute(f"SET TimeZone = '{TZ}'")


def test_no_mask_raises_for_any_input(conn: Any) -> None:
    """Every kind x every type it can mask x every input (incl. edges Python cannot load): no error."""
    texts = TEXT_INPUTS + ["\\", "'", "\u2028", "\U0010fffd"]
    by_type: dict[str, list[str | None]] = {
        "text": texts, "character varying(10)": texts, "character(3)": texts,
        **INT_INPUTS, "numeric": NUMERIC_INPUTS, "numeric(5,2)": [None, "999.99", "-999.99", "0.01"],
        "double precision": FLOAT8_INPUTS + ["4.9e-324", "2.2250738585072014e-308"],
        "real": FLOAT4_INPUTS + ["1.4e-45", "3.40282346e38"],
        "date": DATE_INPUTS + ["infinity", "-infinity", "4714-11-24 BC", "5874897-12-31"],
        "timestamp": TS_INPUTS + ["infinity", "-infinity", "4714-11-24 00:00:00 BC", "294276-12-31 23:59:59"],
        "timestamptz": TSTZ_INPUTS + ["infinity", "-infinity", "4714-11-24 00:00:00+00 BC",
                                      "294276-12-31 23:59:59+00"],
    }
    specs = TEXT_SPECS + ROUNDS + [parse_mask({"round": 30}), parse_mask({"round": -30}),
                                   parse_mask("date_to_year"), parse_mask({"constant": "1"})]
    ran = 0
    for pg_type, inputs in by_type.items():
        for spec in specs:
            if can_mask(spec, pg_type):
                rows = run(conn, spec, pg_type, inputs, as_text=True)
                assert len(rows) == len(inputs)
                assert all(r[2] == r[3] for r in rows), (spec, pg_type)
                nulls_in = [r[0] is None for r in rows]
                nulls_out = [r[1] is None for r in rows]
                if spec.kind.value != "constant":
                    assert nulls_in == nulls_out if spec.kind.value != "null" else all(nulls_out)
                ran += 1
    assert ran > 100


# -- the masks in their real setting ---------------------------------------------------


def test_in_a_fenced_derived_table_with_typmod_columns(conn: Any) -> None:
    """The rewriter's shape: masked columns of a real table keep names and types (not typmods)."""
    conn.execute(
        "CREATE TABLE public.guests_m (id integer, name varchar(20), id_number char(18), phone varchar(11), "
        "email text, card varchar(19), address varchar(100), note text, amount numeric(10,2), "
        "born date, seen timestamp(3) with time zone)"
    )
    conn.execute(
        "INSERT INTO public.guests_m VALUES "
        "(1, '张三丰', '110101199003077777', '13812341234', 'zhang.san@example.com', '6222021234567890123', "
        "'北京市朝阳区建国路88号', '身份证110101199003077777', 12345.67, '1990-03-07', '2024-05-06 12:34:56.789+08'),"
        "(2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)"
    )
    masks = {
        "id": ({"hash": SALT}, "integer"), "name": ("name", "character varying(20)"),
        "id_number": ("resident_id", "character(18)"), "phone": ("mobile", "character varying(11)"),
        "email": ("email", "text"), "card": ("bank_card", "character varying(19)"),
        "address": ("address", "character varying(100)"), "note": ("redact_text", "text"),
        "amount": ({"round": -2}, "numeric(10,2)"), "born": ("date_to_year", "date"),
        "seen": ("date_to_year", "timestamp(3) with time zone"),
    }
    cols = ", ".join(
        f"{mask_sql(parse_mask(m), exp.column(c), t).sql(dialect='postgres')} AS {c}" for c, (m, t) in masks.items()
    )
    try:
        raw = conn.execute("SELECT * FROM public.guests_m ORDER BY id").fetchall()
        cur = conn.execute(f"SELECT * FROM (SELECT {cols} FROM public.guests_m OFFSET 0) AS g ORDER BY g.id")
        masked = cur.fetchall()
        assert [d.name for d in cur.description] == list(masks)
        types = conn.execute(
            "SELECT atttypid FROM pg_catalog.pg_attribute "
            "WHERE attrelid = 'public.guests_m'::regclass AND attnum > 0 ORDER BY attnum").fetchall()
        assert [d.type_code for d in cur.description] == [t for (t,) in types]
        expected = sorted(
            (tuple(mask_value(parse_mask(m), v, t) for v, (m, t) in zip(row, masks.values())) for row in raw),
            key=lambda r: (r[0] is None, r[0]),
        )
        assert sorted(masked, key=lambda r: (r[0] is None, r[0])) == expected
        assert ("张**", "110***********7777", "138****1234") in [r[1:4] for r in masked]
    finally:
        conn.execute("DROP TABLE public.guests_m")


HOSTILE_SETUP = """
CREATE SCHEMA evil;
CREATE FUNCTION evil.length(text) RETURNS integer LANGUAGE sql AS 'SELECT 1000';
CREATE FUNCTION evil.left(text, integer) RETURNS text LANGUAGE sql AS 'SELECT $1';
CREATE FUNCTION evil.right(text, integer) RETURNS text LANGUAGE sql AS 'SELECT $1';
CREATE FUNCTION evil.repeat(text, integer) RETURNS text LANGUAGE sql AS 'SELECT ''''';
CREATE FUNCTION evil.textcat(text, text) RETURNS text LANGUAGE sql AS 'SELECT $1 || ''LEAK'' || $2';
CREATE FUNCTION evil.regexp_replace(text, text, text, text) RETURNS text LANGUAGE sql AS 'SELECT $1';
CREATE FUNCTION evil.translate(text, text, text) RETURNS text LANGUAGE sql AS 'SELECT $1';
CREATE FUNCTION evil.round(numeric, integer) RETURNS numeric LANGUAGE sql AS 'SELECT $1';
CREATE FUNCTION evil.sha256(bytea) RETURNS bytea LANGUAGE sql AS 'SELECT $1';
CREATE FUNCTION evil.make_date(integer, integer, integer) RETURNS date LANGUAGE sql AS 'SELECT DATE ''2000-06-06''';
CREATE FUNCTION evil.always(integer, integer) RETURNS boolean LANGUAGE sql AS 'SELECT true';
CREATE OPERATOR evil.>= (LEFTARG = integer, RIGHTARG = integer, FUNCTION = evil.always);
CREATE OPERATOR evil.= (LEFTARG = integer, RIGHTARG = integer, FUNCTION = evil.always);
CREATE FUNCTION evil.minus(integer, integer) RETURNS integer LANGUAGE sql AS 'SELECT 0';
CREATE OPERATOR evil.- (LEFTARG = integer, RIGHTARG = integer, FUNCTION = evil.minus);
CREATE TYPE evil.text AS (a int);
CREATE TYPE evil.int4 AS (a int);
"""


def test_hostile_search_path_changes_nothing(conn: Any) -> None:
    conn.execute(HOSTILE_SETUP)
    try:
        conn.execute("SET search_path = evil, pg_catalog, public")
        # the hostile objects are live: unqualified names now resolve to them
        assert conn.execute("SELECT length(CAST('ab' AS pg_catalog.text))").fetchone()[0] == 1000
        assert conn.execute("SELECT 1 >= 2").fetchone()[0] is True
        inputs = [None, "", "张三丰", "110101199003077777", "13812341234", "a@b.cn", "zhang.san@example.com",
                  "北京市朝阳区建国路88号", "身份证110101199003077777"]
        # (the test's own casts name pg_catalog types: evil.text and evil.int4 exist too)
        for spec in TEXT_SPECS:
            check(conn, spec, "pg_catalog.text", inputs)
        for spec in ROUNDS + [parse_mask({"hash": SALT})]:
            check(conn, spec, "pg_catalog.int4", INT_INPUTS["integer"])
        check(conn, parse_mask("date_to_year"), "pg_catalog.date", DATE_INPUTS)
        check(conn, parse_mask({"round": 1}), "pg_catalog.numeric", NUMERIC_INPUTS)
    finally:
        conn.execute("RESET search_path")
        conn.execute("DROP SCHEMA evil CASCADE")
