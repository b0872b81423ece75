"""masking: YAML forms, exact masked values, and the shape of the generated SQL.

The SQL itself is checked value for value against a real PostgreSQL in
tests/integration/test_masking_pg.py; here we pin the rules (what stays
visible, what short values give) and the security properties of the SQL text:
only pg_catalog functions, operators and types, and a stable sqlglot round trip.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
import sqlglot
from sqlglot import exp

from masking import (
    MaskKind,
    MaskSpec,
    MaskTypeError,
    can_mask,
    mask_sql,
    mask_value,
    parse_mask,
    parse_pg_type,
)

SALT = "s3cret-salt"
K = MaskKind


def spec(value):  # noqa: ANN001, ANN201 - shorthand
    return parse_mask(value)


# -- parse_mask -------------------------------------------------------------------


class TestParseMask:
    @pytest.mark.parametrize(
        "value,kind,params",
        [
            ("resident_id", K.RESIDENT_ID, {}),
            ("bank_card", K.BANK_CARD, {}),
            ("mobile", K.MOBILE, {}),
            ("name", K.NAME, {}),
            ("email", K.EMAIL, {}),
            ("address", K.ADDRESS, {}),
            ("redact_text", K.REDACT_TEXT, {"min_digits": 6}),
            ("null", K.NULL, {}),
            ("date_to_year", K.DATE_TO_YEAR, {}),
            ("  Resident_ID ", K.RESIDENT_ID, {}),
            ({"name": None}, K.NAME, {}),
            ({"email": {}}, K.EMAIL, {}),
            ({"hash": {"salt": SALT}}, K.HASH, {"salt": SALT}),
            ({"hash": SALT}, K.HASH, {"salt": SALT}),
            ({"constant": "***"}, K.CONSTANT, {"value": "***"}),
            ({"constant": {"value": "n/a"}}, K.CONSTANT, {"value": "n/a"}),
            ({"constant": 0}, K.CONSTANT, {"value": "0"}),
            ({"constant": 1.5}, K.CONSTANT, {"value": "1.5"}),
            ({"constant": True}, K.CONSTANT, {"value": "true"}),
            ({"constant": ""}, K.CONSTANT, {"value": ""}),
            ({"round": 2}, K.ROUND_NUMBER, {"digits": 2}),
            ({"round": -2}, K.ROUND_NUMBER, {"digits": -2}),
            ({"round_number": {"digits": 0}}, K.ROUND_NUMBER, {"digits": 0}),
            ({"round_number": 30}, K.ROUND_NUMBER, {"digits": 30}),
            ({"redact_text": {"min_digits": 8}}, K.REDACT_TEXT, {"min_digits": 8}),
            ({"redact_text": 4}, K.REDACT_TEXT, {"min_digits": 4}),
        ],
    )
    def test_forms(self, value, kind, params) -> None:  # noqa: ANN001
        s = parse_mask(value)
        assert s.kind is kind
        assert dict(s.params) == params

    @pytest.mark.parametrize(
        "value,message",
        [
            ("passport", "unknown mask kind 'passport'"),
            ({"sha1": {"salt": SALT}}, "unknown mask kind 'sha1'"),
            (None, "quote it"),
            (42, "kind name or a one-key mapping"),
            ({}, "exactly one key"),
            ({"round": 2, "name": None}, "exactly one key"),
            ("hash", "needs a parameter"),
            ("constant", "needs a parameter"),
            ("round", "needs a parameter"),
            ({"hash": {}}, "salt must be a secret string"),
            ({"hash": "short"}, "at least 8 characters"),
            ({"hash": {"salt": 12345678}}, "salt must be a secret string"),
            ({"hash": {"salt": SALT, "algo": "md5"}}, "unknown parameter(s) algo (expected salt)"),
            ({"constant": None}, "needs a value"),
            ({"constant": ["a"]}, "must be a string or a number"),
            ({"constant": "a\x00b"}, "NUL"),
            ({"round": "2"}, "digits must be an integer"),
            ({"round": True}, "digits must be an integer"),
            ({"round": 2.5}, "digits must be an integer"),
            ({"round": 31}, "between -30 and 30"),
            ({"round": -31}, "between -30 and 30"),
            ({"round_number": {"places": 2}}, "unknown parameter(s) places"),
            ({"redact_text": {"min_digits": 3}}, "between 4 and 32"),
            ({"redact_text": {"patterns": ["x"]}}, "unknown parameter(s) patterns"),
            ({"name": {"keep": 2}}, "unknown parameter(s) keep (expected no parameters)"),
            ({"resident_id": 3}, "takes no parameters"),
        ],
    )
    def test_errors(self, value, message) -> None:  # noqa: ANN001
        with pytest.raises(ValueError) as info:
            parse_mask(value)
        assert message in str(info.value)

    def test_spec_is_frozen_hashable_and_keeps_the_salt_out_of_repr(self) -> None:
        a, b = parse_mask({"hash": SALT}), MaskSpec(K.HASH, {"salt": SALT})
        assert a == b and hash(a) == hash(b) and len({a, b}) == 1
        assert a != parse_mask({"hash": SALT + "x"})
        assert SALT not in repr(a) and "<secret>" in repr(a)
        with pytest.raises(TypeError):
            a.params["salt"] = "x"  # type: ignore[index]
        with pytest.raises(AttributeError):
            a.kind = K.NAME  # type: ignore[misc]

    def test_direct_construction_is_validated_too(self) -> None:
        with pytest.raises(ValueError, match="salt"):
            MaskSpec(K.HASH, {"salt": "x"})
        assert MaskSpec(K.REDACT_TEXT).params["min_digits"] == 6

    def test_a_spec_passes_through(self) -> None:
        s = parse_mask("name")
        assert parse_mask(s) is s

    def test_the_functions_take_the_yaml_form_too(self) -> None:
        col = exp.column("c")
        assert mask_sql("mobile", col, "text") == mask_sql(parse_mask("mobile"), col, "text")
        assert mask_value({"round": -2}, 1250) == 1300
        assert can_mask("date_to_year", "date") and not can_mask("date_to_year", "text")
        with pytest.raises(ValueError, match="unknown mask kind"):
            mask_sql("passport", col, "text")


# -- mask_value: exact strings ------------------------------------------------------


TEXT_CASES = {
    "resident_id": [
        ("110101199003077777", "110***********7777"),
        ("11010119900307777X", "110***********777X"),
        ("11010119900307777x", "110***********777x"),
        ("110101900307777", "110********7777"),  # 15-char legacy ID
        ("11010119900307", "**************"),  # 14: not an ID shape, nothing shown
        ("12345", "*****"),
        ("1234567", "*******"),
        ("", ""),
        ("１１０１０１１９９００３０７７７７７", "１１０***********７７７７"),
    ],
    "bank_card": [
        ("6222021234567890", "************7890"),
        ("6222021234567890123", "***************0123"),
        ("6222 0212 3456 7890", "***************7890"),
        ("622202123456", "********3456"),  # 12: shortest with last 4 shown
        ("62220212345", "***********"),
        ("1234", "****"),
        ("", ""),
    ],
    "mobile": [
        ("13812341234", "138****1234"),
        ("+8613812341234", "+86*******1234"),
        ("1381234123", "**********"),
        ("", ""),
    ],
    "name": [
        ("张三丰", "张**"),
        ("张三", "张*"),
        ("张", "*"),
        ("欧阳娜娜", "欧***"),
        ("John Smith", "J*********"),
        ("😀x", "😀*"),
        ("", ""),
    ],
    "email": [
        ("zhang.san@example.com", "z***@example.com"),
        ("ab@c.cn", "a***@c.cn"),
        ("a@b.cn", "***@b.cn"),  # a 1-char local part is not shown at all
        ("@example.com", "***@example.com"),
        ("x@", "***@"),
        ("first@second@host.cn", "f***@host.cn"),  # domain is after the last '@'
        ("用户@例子.中国", "用***@例子.中国"),
        ("no-at-sign", "**********"),
        ("", ""),
    ],
    "address": [
        ("北京市朝阳区建国路88号SOHO现代城", "北京市朝阳区****"),
        ("北京市朝阳区建国路", "北京市朝****"),  # 9 chars: at most half shown
        ("上海", "上****"),
        ("上", "****"),
        ("", ""),
    ],
    "redact_text": [
        ("客人身份证110101199003077777，电话13812341234，房间 1203",
         "客人身份证******************，电话***********，房间 1203"),
        ("card 6222021234567890 exp 12/27", "card **************** exp 12/27"),
        ("12345 123456 1234567", "12345 ****** *******"),
        ("全角１３８１２３４１２３４号", "全角***********号"),
        ("mixed 123４５６ end", "mixed ****** end"),
        ("no digits", "no digits"),
        ("", ""),
        ("\x0112345 ab", "****** ab"),  # the internal mark (chr(1)) in the text: masked with what follows
    ],
}


class TestMaskValueText:
    @pytest.mark.parametrize(
        "kind,value,expected",
        [(k, v, e) for k, cases in TEXT_CASES.items() for v, e in cases],
    )
    def test_exact(self, kind: str, value: str, expected: str) -> None:
        assert mask_value(parse_mask(kind), value) == expected
        # masking keeps the length where the rule says so
        if kind in ("resident_id", "bank_card", "mobile", "name", "redact_text"):
            assert len(expected) == len(value)

    @pytest.mark.parametrize("kind", list(TEXT_CASES))
    def test_null_is_null(self, kind: str) -> None:
        assert mask_value(parse_mask(kind), None) is None
        assert mask_value(parse_mask(kind), None, "text") is None

    def test_redact_text_min_digits(self) -> None:
        s = parse_mask({"redact_text": 8})
        assert mask_value(s, "1234567 12345678") == "1234567 ********"

    def test_char_n_ignores_trailing_blanks_as_postgres_does(self) -> None:
        assert mask_value(parse_mask("name"), "张三    ", "character(8)") == "张*"
        assert mask_value(parse_mask("name"), "张三    ", "text") == "张*****"

    def test_short_values_never_show_most_of_themselves(self) -> None:
        for kind in ("resident_id", "bank_card", "mobile"):
            for n in range(0, 11):
                value = "9" * n
                assert mask_value(parse_mask(kind), value) == "*" * n, (kind, n)

    def test_wrong_python_type(self) -> None:
        with pytest.raises(MaskTypeError):
            mask_value(parse_mask("name"), 42)
        with pytest.raises(MaskTypeError):
            mask_value(parse_mask("resident_id"), "110101199003077777", "integer")


class TestMaskValueOther:
    def test_hash_text(self) -> None:
        s = parse_mask({"hash": SALT})
        h = mask_value(s, "110101199003077777")
        assert re.fullmatch(r"h:[0-9a-f]{16}", h)
        import hashlib

        assert h == "h:" + hashlib.sha256((SALT + "110101199003077777").encode()).hexdigest()[:16]
        # joinable: same input + salt -> same output; another salt -> another output
        assert mask_value(s, "110101199003077777") == h
        assert mask_value(parse_mask({"hash": SALT + "2"}), "110101199003077777") != h
        assert mask_value(s, "") == "h:" + hashlib.sha256(SALT.encode()).hexdigest()[:16]
        assert mask_value(s, None) is None

    def test_hash_integers_keep_their_width(self) -> None:
        s = parse_mask({"hash": SALT})
        for pg_type, bits in (("smallint", 16), ("integer", 32), ("bigint", 64)):
            values = {mask_value(s, v, pg_type) for v in range(200)}
            assert len(values) > 150  # pseudonymous, not constant
            assert all(-(2 ** (bits - 1)) <= v < 2 ** (bits - 1) for v in values)
        assert mask_value(s, 7) == mask_value(s, 7, "bigint")
        # the int2 hash is the top half of the int4 hash
        assert mask_value(s, 7, "smallint") == mask_value(s, 7, "integer") >> 16

    def test_constant_and_null(self) -> None:
        c = parse_mask({"constant": "***"})
        assert mask_value(c, "secret") == "***"
        assert mask_value(c, None) == "***"  # constant even for NULL rows: presence is hidden too
        assert mask_value(parse_mask({"constant": 0}), 5, "integer") == 0
        assert mask_value(parse_mask({"constant": "1970-01-01"}), None, "date") == dt.date(1970, 1, 1)
        assert mask_value(parse_mask({"constant": "2000-01-01 00:00:00+08"}), None, "timestamptz") == \
            dt.datetime(2000, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=8)))
        assert mask_value(parse_mask({"constant": "0.1"}), 1.0, "real") == 0.1
        assert mask_value(parse_mask({"constant": "0.1000000001"}), 1.0, "real") == 0.1
        assert mask_value(parse_mask({"constant": "12.50"}), None, "numeric(6,2)") == Decimal("12.50")
        assert mask_value(parse_mask("null"), "x") is None
        assert mask_value(parse_mask("null"), 5, "integer") is None

    def test_date_to_year(self) -> None:
        s = parse_mask("date_to_year")
        assert mask_value(s, dt.date(2024, 5, 6)) == dt.date(2024, 1, 1)
        assert mask_value(s, dt.date(2024, 1, 1)) == dt.date(2024, 1, 1)
        assert mask_value(s, dt.datetime(1999, 12, 31, 23, 59, 59, 999999)) == dt.datetime(1999, 1, 1)
        sh = ZoneInfo("Asia/Shanghai")
        got = mask_value(s, dt.datetime(2024, 7, 1, 9, 30, tzinfo=sh))
        assert got == dt.datetime(2024, 1, 1, tzinfo=sh) and got.tzinfo is sh
        assert mask_value(s, None) is None
        with pytest.raises(MaskTypeError):
            mask_value(s, dt.datetime(2024, 1, 1), "date")
        with pytest.raises(MaskTypeError):
            mask_value(s, dt.datetime(2024, 1, 1), "timestamp with time zone")

    @pytest.mark.parametrize(
        "digits,value,pg_type,expected",
        [
            (2, Decimal("12.345"), "numeric", Decimal("12.35")),
            (2, Decimal("-12.345"), "numeric", Decimal("-12.35")),  # half away from zero
            (2, Decimal("12.3"), "numeric", Decimal("12.30")),
            (0, Decimal("2.5"), "numeric", Decimal("3")),
            (-2, Decimal("1250"), "numeric(10,2)", Decimal("1300")),
            (2, Decimal("-0.001"), "numeric", Decimal("0.00")),
            (2, Decimal("NaN"), "numeric", Decimal("NaN")),
            (2, Decimal("Infinity"), "numeric", Decimal("Infinity")),
            (-2, 1250, "integer", 1300),
            (-2, -1250, "integer", -1300),
            (-2, 149, "smallint", 100),
            (2, 149, "integer", 149),
            (-3, 32767, "smallint", 32767),  # 33000 does not fit: clamped, not an error
            (-1, 2147483647, "integer", 2147483647),
            (-1, -9223372036854775808, "bigint", -9223372036854775808),
            (1, 2.25, "double precision", 2.3),  # via 15 significant digits, as PostgreSQL does
            (2, 2.675, "double precision", 2.68),
            (-2, 1234.5, "double precision", 1200.0),
            (0, -0.4, "double precision", 0.0),
            (0, 1.7976931348623157e308, "double precision", 1.7976931348623157e308),
            (2, 0.1, "real", 0.1),  # float4 0.1 as PostgreSQL prints it
            (1, 0.10000000149011612, "real", 0.1),  # the exact float4 value in, the same out
            (-3, 3.4028235e38, "real", 3.40282e38),
            (2, 123456.789, "real", 123457.0),  # 6 significant digits first, as PostgreSQL does
        ],
    )
    def test_round(self, digits: int, value, pg_type: str, expected) -> None:  # noqa: ANN001
        got = mask_value(parse_mask({"round": digits}), value, pg_type)
        assert type(got) is type(expected)
        if isinstance(got, Decimal) and got.is_nan():
            assert expected.is_nan()
        else:
            assert got == expected
            assert str(got) == str(expected)

    def test_round_float_specials_pass_through(self) -> None:
        s = parse_mask({"round": 2})
        assert math.isnan(mask_value(s, float("nan")))
        assert mask_value(s, float("inf")) == float("inf")
        assert mask_value(s, float("-inf"), "real") == float("-inf")
        assert mask_value(s, None, "integer") is None

    def test_wrong_python_type(self) -> None:
        with pytest.raises(MaskTypeError):
            mask_value(parse_mask({"round": 2}), "12.5")
        with pytest.raises(MaskTypeError):
            mask_value(parse_mask({"round": 2}), True)
        with pytest.raises(MaskTypeError):
            mask_value(parse_mask("date_to_year"), "2024-01-01")
        with pytest.raises(MaskTypeError):
            mask_value(parse_mask({"hash": SALT}), 1.5)


# -- can_mask ------------------------------------------------------------------------

TEXT_TYPES = ["text", "character varying", "character varying(20)", "varchar(20)", "character(18)",
              "char(18)", "bpchar", "pg_catalog.text", "pg_catalog.varchar(20)"]
INT_TYPES = ["smallint", "integer", "bigint", "int2", "int4", "int8", "int"]
NUMBER_TYPES = ["numeric", "numeric(10,2)", "decimal(5)", "real", "double precision", "float8"]
DATE_TYPES = ["date", "timestamp without time zone", "timestamp(3) without time zone", "timestamp",
              "timestamp with time zone", "timestamp(0) with time zone", "timestamptz"]
OTHER_TYPES = ["boolean", "jsonb", "uuid", "bytea", "inet", "interval", "text[]", "integer[]",
               "character varying(20)[]", "public.mood", '"My Schema"."Mood"', "public.mood[]"]
ALL_TYPES = TEXT_TYPES + INT_TYPES + NUMBER_TYPES + DATE_TYPES + OTHER_TYPES

TEXT_KIND_NAMES = ["resident_id", "bank_card", "mobile", "name", "email", "address", "redact_text"]
ALLOWED = {
    **{k: TEXT_TYPES for k in TEXT_KIND_NAMES},
    "hash": TEXT_TYPES + INT_TYPES,
    "null": ALL_TYPES,
    "date_to_year": DATE_TYPES,
    "round": INT_TYPES + NUMBER_TYPES,
}
SPECS = {**{k: k for k in TEXT_KIND_NAMES}, "hash": {"hash": SALT}, "null": "null",
         "date_to_year": "date_to_year", "round": {"round": -2}}


class TestCanMask:
    @pytest.mark.parametrize("kind", list(SPECS))
    @pytest.mark.parametrize("pg_type", ALL_TYPES)
    def test_matrix(self, kind: str, pg_type: str) -> None:
        s = parse_mask(SPECS[kind])
        allowed = pg_type in ALLOWED[kind]
        assert can_mask(s, pg_type) is allowed
        col = exp.column("c")
        if allowed:
            assert isinstance(mask_sql(s, col, pg_type), exp.Expression)
        else:
            with pytest.raises(MaskTypeError, match=f"cannot mask a column of type {re.escape(pg_type)}"):
                mask_sql(s, col, pg_type)

    def test_constant_on_any_type_with_a_valid_literal(self) -> None:
        assert can_mask(parse_mask({"constant": "***"}), "text")
        assert can_mask(parse_mask({"constant": "***"}), "character(2)")
        assert can_mask(parse_mask({"constant": "{}"}), "jsonb")
        assert can_mask(parse_mask({"constant": "{}"}), "text[]")
        assert can_mask(parse_mask({"constant": "happy"}), "public.mood")
        ok = {"integer": "-5", "smallint": "32767", "numeric(4,1)": "1.5", "real": "1e3", "double precision": "NaN",
              "date": "1970-01-01", "timestamp": "1970-01-01 00:00:00", "timestamptz": "1970-01-01T00:00:00Z",
              "timestamp with time zone": "1970-01-01 08:00+08:00"}
        for t, v in ok.items():
            assert can_mask(parse_mask({"constant": v}), t), (t, v)
        bad = {"integer": "***", "smallint": "32768", "bigint": "1.0", "numeric": "1,5", "real": "1e39",
               "double precision": "1e-400", "date": "01/02/2024", "timestamp": "2024-01-01 00:00:00+08",
               "timestamptz": "2024-01-01 00:00:00", "date ": "2024-02-30"}
        for t, v in bad.items():
            assert not can_mask(parse_mask({"constant": v}), t), (t, v)
            with pytest.raises(MaskTypeError):
                mask_sql(parse_mask({"constant": v}), exp.column("c"), t)

    @pytest.mark.parametrize("pg_type", ["mood", '"char"', "serial", "geometry", "text; DROP TABLE x",
                                         "pg_catalog.text) --", "", "   ", "public.", "a.b.c", "text[x]"])
    def test_unknown_or_unqualified_types_are_refused(self, pg_type: str) -> None:
        assert not can_mask(parse_mask("null"), pg_type)
        with pytest.raises(MaskTypeError):
            mask_sql(parse_mask("null"), exp.column("c"), pg_type)

    def test_type_parsing(self) -> None:
        t = parse_pg_type("timestamp(3) with time zone")
        assert (t.schema, t.name, t.family, t.array_dims) == ("pg_catalog", "timestamptz", "timestamp", 0)
        t = parse_pg_type("character varying(20)[]")
        assert (t.name, t.array_dims) == ("varchar", 1)
        t = parse_pg_type('"My Schema"."Mood"[][]')
        assert (t.schema, t.name, t.family, t.array_dims) == ("My Schema", "Mood", "other", 2)
        t = parse_pg_type("PUBLIC.Mood")
        assert (t.schema, t.name) == ("public", "mood")  # unquoted names fold to lower case
        assert parse_pg_type("pg_catalog.int8").family == "int"


# -- the SQL -------------------------------------------------------------------------

#: SQL syntax (no name lookup through search_path) allowed besides pg_catalog functions.
SYNTAX_FUNCS = (exp.Cast, exp.Case, exp.Greatest, exp.Least, exp.Extract)
#: Words a '(' may follow in the SQL text: syntax, keywords before a parenthesised expression.
SYNTAX_WORDS = {"CAST", "GREATEST", "LEAST", "EXTRACT", "OPERATOR", "WHEN", "THEN", "ELSE", "NOT", "FROM"}
SQL_CASES = [
    *[(k, t) for k in TEXT_KIND_NAMES for t in ("text", "character varying(20)", "character(18)")],
    ({"redact_text": 9}, "text"),
    ({"hash": SALT}, "text"), ({"hash": SALT}, "character(18)"),
    ({"hash": SALT}, "smallint"), ({"hash": SALT}, "integer"), ({"hash": SALT}, "bigint"),
    ({"constant": "***"}, "text"), ({"constant": "it's \\ a \"quote\""}, "text"), ({"constant": "0"}, "integer"),
    ({"constant": "1970-01-01"}, "date"), ({"constant": "{}"}, "jsonb"),
    ("null", "text"), ("null", "integer"), ("null", "jsonb"), ("null", "text[]"), ("null", '"My S"."Mood"[]'),
    ("date_to_year", "date"), ("date_to_year", "timestamp(3) without time zone"),
    ("date_to_year", "timestamp with time zone"),
    ({"round": -2}, "smallint"), ({"round": -2}, "integer"), ({"round": -2}, "bigint"), ({"round": 2}, "integer"),
    ({"round": 2}, "numeric(10,2)"), ({"round": -1}, "real"), ({"round": 3}, "double precision"),
]
COLUMNS = [exp.column("v", "t"), exp.column("id_number"), exp.column('We"ird Col', "My Tab", quoted=True)]


def _case_id(case) -> str:  # noqa: ANN001
    value, t = case
    return f"{value if isinstance(value, str) else next(iter(value))}-{t}"


@pytest.mark.parametrize("case", SQL_CASES, ids=[_case_id(c) for c in SQL_CASES])
@pytest.mark.parametrize("column", COLUMNS, ids=["qualified", "bare", "quoted"])
class TestMaskSql:
    def test_only_pg_catalog_names(self, case, column: exp.Column) -> None:  # noqa: ANN001
        s, pg_type = parse_mask(case[0]), case[1]
        tree = mask_sql(s, column, pg_type)
        for node in tree.walk():
            if isinstance(node, exp.Anonymous):
                parent = node.parent
                assert isinstance(parent, exp.Dot) and parent.this == exp.to_identifier("pg_catalog"), node.sql()
            elif isinstance(node, exp.If):
                assert isinstance(node.parent, exp.Case)  # a WHEN branch
            elif isinstance(node, exp.Func):
                assert isinstance(node, SYNTAX_FUNCS), f"unqualified function {type(node).__name__}: {node.sql()}"
            elif isinstance(node, exp.Operator):
                assert node.args["operator"].startswith("pg_catalog."), node.sql()
                assert isinstance(node.parent, exp.Paren), "OPERATOR() must be parenthesised (precedence)"
            elif isinstance(node, exp.Dot):
                assert node.this == exp.to_identifier("pg_catalog") or isinstance(node.parent, exp.DataType)
            elif isinstance(node, exp.Is):
                assert isinstance(node.expression, exp.Null)  # IS NULL: syntax, no operator lookup
            elif isinstance(node, exp.Binary) and not isinstance(node, exp.Dot):
                raise AssertionError(f"bare operator {type(node).__name__}: {node.sql()}")
            elif isinstance(node, exp.DataType) and node.this != exp.DataType.Type.ARRAY:
                assert node.this == exp.DataType.Type.USERDEFINED and isinstance(node.args["kind"], exp.Dot), \
                    f"type not schema-qualified: {node.sql()}"
        # and in the text: every call is pg_catalog.f(...) or SQL syntax; every type is qualified
        sql = tree.sql(dialect="postgres")
        code = re.sub(r"'(?:[^']|'')*'", "''", sql)  # string literals out
        code = re.sub(r'"(?:[^"]|"")*"', '"q"', code)  # quoted identifiers out
        for m in re.finditer(r"([A-Za-z_][A-Za-z0-9_.]*)\s*\(", code):
            word = m.group(1)
            assert word.startswith("pg_catalog.") or word in SYNTAX_WORDS, \
                f"{word}( in {sql}"
        for m in re.finditer(r"\bAS\s+([^\s()]+)", code):
            assert m.group(1).startswith(("pg_catalog.", '"q".')), m.group(0)
        for m in re.finditer(r"OPERATOR\(([^)]*)\)", code):
            assert m.group(1).startswith("pg_catalog."), m.group(0)

    def test_round_trips_through_sqlglot(self, case, column: exp.Column) -> None:  # noqa: ANN001
        tree = mask_sql(parse_mask(case[0]), column, case[1])
        sql = tree.sql(dialect="postgres")
        again = sqlglot.parse_one(sql, read="postgres")
        assert again.sql(dialect="postgres") == sql
        assert again == tree
        # embedded the way the rewriter will use it, the statement round-trips too
        stmt = f"SELECT {sql} AS masked FROM public.t AS t WHERE TRUE OFFSET 0"
        assert sqlglot.parse_one(stmt, read="postgres").sql(dialect="postgres") == stmt

    def test_column_is_not_modified_and_literals_are_literals(self, case, column: exp.Column) -> None:  # noqa: ANN001
        before = column.sql()
        tree = mask_sql(parse_mask(case[0]), column, case[1])
        assert column.sql() == before and column.parent is None
        if isinstance(case[0], dict) and "constant" in case[0]:
            lits = [n.this for n in tree.find_all(exp.Literal) if n.is_string]
            assert parse_mask(case[0]).params["value"] in lits


@pytest.mark.parametrize("case", SQL_CASES, ids=[_case_id(c) for c in SQL_CASES])
def test_generated_sql_is_ascii(case) -> None:  # noqa: ANN001
    """Non-ASCII in SQL' could fail to encode in the client's encoding (e.g. LATIN1)."""
    assert mask_sql(parse_mask(case[0]), exp.column("c"), case[1]).sql(dialect="postgres").isascii()


def test_salt_and_constant_are_sql_literals_whatever_they_contain() -> None:
    nasty = "x'); DROP TABLE guests; --\\"
    for s in (parse_mask({"hash": nasty}), parse_mask({"constant": nasty})):
        sql = mask_sql(s, exp.column("c"), "text").sql(dialect="postgres")
        assert "'x''); DROP TABLE guests; --\\'" in sql
        parsed = sqlglot.parse_one(sql, read="postgres")
        assert nasty in [n.this for n in parsed.find_all(exp.Literal)]
