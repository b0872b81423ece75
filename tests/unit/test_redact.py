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
