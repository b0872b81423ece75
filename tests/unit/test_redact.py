"""Sensitive literals in logged statements (R2.4)."""

from __future__ import annotations

from masking.kinds import parse_mask
from rules.redact import redact

SENSITIVE = {"id_number": parse_mask("resident_id"), "phone": parse_mask("mobile"), "name": parse_mask("name")}


def test_nothing_sensitive_is_left_alone() -> None:
    assert redact("SELECT * FROM cs_records WHERE category = 'complaint'", SENSITIVE) is None


def test_equality_in_list_and_reversed() -> None:
    out = redact("SELECT 1 FROM t WHERE id_number = '110101199003077777' AND '13812345678' = phone "
                 "OR name IN ('张三丰', '李四')", SENSITIVE)
    assert out is not None
    for clear in ("110101199003077777", "13812345678", "张三丰", "李四"):
        assert clear not in out
    assert "'110***********7777'" in out and "'138****5678'" in out and "'张**'" in out


def test_qualified_and_quoted_columns() -> None:
    out = redact('SELECT 1 FROM guests g WHERE g."phone" LIKE \'1381234%\'', SENSITIVE)
    assert out is not None and "1381234" not in out


def test_unparseable_statement_is_not_logged_in_clear() -> None:
    assert redact("SELECT phone FROM WHERE phone = '13812345678' ((", SENSITIVE) == \
        "<statement not parsed; not logged in clear>"


def test_unicode_escaped_column_name_is_still_redacted() -> None:
    out = redact('SELECT 1 FROM t WHERE U&"\\0069d_number" = \'110101199003077777\'', SENSITIVE)
    assert out is not None and "110101199003077777" not in out and "***" in out


# ---------------------------------------------------------------------------
# issue 13: redaction by lineage and by shape, with keyed hashes (R2.4)
# ---------------------------------------------------------------------------

import os  # noqa: E402

import pytest  # noqa: E402

from rules.redact import NOT_REDACTED, normalise_value, redact_values, redaction_of, shapes, value_hash  # noqa: E402
from tests.unit.test_rewrite_fixtures import RULES, hotel_catalog  # noqa: E402

os.environ.setdefault("PGWARDEN_MASK_SALT", "test-salt-not-secret")
KEY = b"k" * 32
PHONE, ID, CARD, MAIL = "13912345678", "11010519491231002X", "4111111111111111", "Li.Lei@Example.com"


@pytest.fixture(scope="module")
def red():  # noqa: ANN201
    from rules.model import load_rules

    return redaction_of(load_rules(str(RULES)).tables, KEY)


CAT = hotel_catalog()


@pytest.mark.parametrize("sql, clear", [
    (f"SELECT * FROM cs_records WHERE phone::text = '{PHONE}'", PHONE),
    ("SELECT * FROM cs_records WHERE phone ~ '^13912'", "13912"),
    ("SELECT * FROM cs_records WHERE strpos(id_number, '110105') > 0", "110105"),
    ("SELECT * FROM cs_records WHERE phone SIMILAR TO '13912%'", "13912"),
    ("SELECT * FROM cs_records WHERE coalesce(bank_card, '') = '622202'", "622202"),
    ("SELECT * FROM guests WHERE (phone, name) = ('1391234', '张三丰')", "张三丰"),
    ("SELECT * FROM guests WHERE lower(email) LIKE 'li.lei%'", "li.lei"),
    ("SELECT * FROM cs_records WHERE guest_name IN ('张三丰', '李四')", "张三丰"),
    # through lineage: renames, alias lists, derived constants, whole rows
    ("SELECT * FROM (SELECT phone AS p FROM cs_records) t WHERE p = '1391234'", "1391234"),
    ("SELECT * FROM cs_records AS c(a, b, c, d, e, f, g, h) WHERE h = '张三丰'", "张三丰"),
    ("SELECT * FROM cs_records c JOIN (SELECT '1391234' AS p) v ON c.phone = v.p", "1391234"),
    ("SELECT * FROM cs_records c WHERE row_to_json(c)::text LIKE '%张三丰%'", "张三丰"),
    ("WITH x AS (SELECT guest_name AS n FROM cs_records) SELECT * FROM x WHERE n = '张三丰'", "张三丰"),
    # writes
    ("UPDATE cs_records SET guest_name = '张三丰' WHERE id = 1", "张三丰"),
    ("INSERT INTO cs_records (guest_id, guest_name, content) VALUES (1, '张三丰', 'x')", "张三丰"),
    # by shape, anywhere
    (f"SELECT 'call {PHONE} today'", PHONE),
    (f"SELECT * FROM sys_params WHERE value = '{ID}'", ID),
    (f"SELECT {CARD}", CARD),
    (f"SELECT '{MAIL}'", MAIL),
    ("SELECT '139 1234 5678'", "139 1234 5678"),
    (f"SELECT 1 /* {PHONE} */", PHONE),
])
def test_redacted_by_lineage_and_by_shape(red, sql: str, clear: str) -> None:  # noqa: ANN001
    out, hashes = redact_values(sql, red, catalog=CAT, search_path=("public",))
    assert out is not None and clear not in out, out
    assert hashes, "each redacted literal leaves a keyed hash"


def test_what_is_not_sensitive_is_left_alone(red) -> None:  # noqa: ANN001
    for sql in ["SELECT * FROM cs_records WHERE category = 'complaint' AND guest_id = 42",
                "SELECT * FROM (SELECT 'x' AS phone) t WHERE phone = 'abc'",  # a constant named phone
                "SELECT '2026-11-29 12:30:55', 1234567890, 23456789012, 110101199003071234"]:  # not the shapes (bad check digit)
        assert redact_values(sql, red, catalog=CAT, search_path=("public",)) == (None, ()), sql


def test_hashes_find_the_value_however_it_was_written(red) -> None:  # noqa: ANN001
    _, h1 = redact_values(f"SELECT * FROM cs_records WHERE phone = '{PHONE}'", red, catalog=CAT)
    _, h2 = redact_values(f"SELECT * FROM cs_records WHERE phone LIKE '%{PHONE}%'", red, catalog=CAT)
    _, h3 = redact_values("SELECT '139-1234-5678'", red)
    want = value_hash(KEY, PHONE)
    assert want in h1 and want in h2 and want in h3
    assert value_hash(KEY, " 139 1234 5678 ") == want and normalise_value(MAIL) == MAIL.lower()
    assert value_hash(b"another key " * 3, PHONE) != want  # keyed: the log alone cannot be brute-forced
    assert redact_values(f"SELECT '{PHONE}'", redaction_of({}, None))[1] == ()  # no key: no hashes


def test_the_mask_salt_never_reaches_the_log(red) -> None:  # noqa: ANN001
    salt = os.environ["PGWARDEN_MASK_SALT"]
    out, _ = redact_values(f"SELECT pg_catalog.md5(pg_catalog.concat('{salt}', card_serial)) FROM keycard_events",
                           red, catalog=CAT)
    assert out is not None and salt not in out


def test_shapes() -> None:
    assert [k for *_, k in shapes(f"{ID} {CARD} {PHONE} {MAIL}")] == ["resident_id", "bank_card", "mobile", "email"]
    assert shapes("110101199003071234") == []  # wrong check digit
    assert shapes("4111111111111112") == []  # fails Luhn
    assert shapes("23912345678") == [] and shapes("139123456789") == []  # not a mobile


def test_redaction_never_raises(red) -> None:  # noqa: ANN001
    for hostile in ["SELECT phone FROM WHERE phone = '13812345678' ((", "\x00", "SELECT '" + "(" * 5000,
                    f"SELECT {PHONE} FROM ((((", "WITH RECURSIVE " * 300]:
        out, hashes = redact_values(hostile, red, catalog=CAT)
        assert out in (None, NOT_REDACTED)
        if PHONE in hostile:
            assert out == NOT_REDACTED and value_hash(KEY, PHONE) in hashes


def test_mask_shapes_in_free_text() -> None:
    from rules.redact import mask_shapes

    assert mask_shapes(f'invalid input syntax for type bigint: "{PHONE}x"') == \
        'invalid input syntax for type bigint: "139****5678x"'
    assert mask_shapes("nothing here 123") == "nothing here 123"
