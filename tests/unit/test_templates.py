"""Decisions reused across statements that differ only in literals: always the decision the
statement would get on its own."""

from __future__ import annotations

import random

import pytest

from rules.decision import Decision
from rules.rewrite import rewrite
from rules.templates import TemplateCache, shape_of
from tests.unit.test_rewrite_fixtures import hotel_catalog, grants_of

CAT = hotel_catalog()


def test_shape_classes() -> None:
    a = shape_of("SELECT * FROM t WHERE id = 42 AND name = 'x''y' AND v = 1.5")
    b = shape_of("SELECT * FROM t WHERE id = 7 AND name = 'zz' AND v = 3.25")
    assert a is not None and b is not None and a[0] == b[0]
    assert [lit[2] for lit in a[1]] == ["42", "'x''y'", "1.5"]
    # different classes, prefixed strings and other spellings are part of the shape
    assert shape_of("SELECT 1 WHERE id = 3000000000")[0] != shape_of("SELECT 1 WHERE id = 3")[0]
    assert shape_of("SELECT E'a'")[1] == [] and shape_of("SELECT 1e3")[1] == []
    assert shape_of("SELECT $$a$$")[1] == []


# (user, statement pattern, templated?): a shape whose sentinel run does not reproduce the decision
# exactly (sqlglot rewrites INTERVAL '5 hours' as INTERVAL '5' HOURS) is decided afresh every time.
STATEMENTS = [
    ("bob", "SELECT id, category FROM cs_records WHERE id = {i} AND category = '{s}'", True),
    ("bob", "SELECT count(*) FROM cs_records WHERE created_at > now() - interval '{n} hours' LIMIT {i}", False),
    ("alice", "SELECT * FROM cs_records WHERE id IN ({i}, {j}) ORDER BY id LIMIT {n}", True),
    ("erin", "SELECT g.id FROM guests g JOIN cs_records c ON c.guest_id = g.id WHERE c.id > {i}", True),
    ("carol", "SELECT value FROM sys_params WHERE name = '{s}'", True),
    ("carol", "SELECT * FROM guests WHERE id = {i}", True),                  # refused, whatever the literal
    ("gina", "SELECT {i} + {j}", True),                                       # allowed as sent
    ("bob", "FETCH {n} FROM c", False),                                       # one opaque token to sqlglot
    ("pms", "INSERT INTO cs_records (guest_id, department, category, severity, channel, agent, content, "
            "created_at) VALUES ({i}, 'FO', 'request', 'normal', 'phone', 'pms', '{s}', now())", True),
]


def _fresh(user: str, sql: str) -> Decision:
    return rewrite(sql, grants_of(user), CAT, None)


@pytest.mark.parametrize("user,pattern,templated", STATEMENTS)
def test_templated_decision_equals_a_fresh_one(user: str, pattern: str, templated: bool) -> None:
    rnd = random.Random(7)
    cache = TemplateCache()
    calls = []

    def full(text: str) -> Decision:
        calls.append(text)
        return _fresh(user, text)

    for k in range(25):
        sql = pattern.format(i=rnd.randint(0, 2**31 - 1), j=rnd.randint(0, 9), n=rnd.randint(1, 500),
                             s=rnd.choice(["complaint", "O''Hara", "客人", "", "x" * 40]))
        got = cache.decide(sql, (user,), full)
        want = _fresh(user, sql)
        assert (got.action, got.sql, got.message, got.tables) == (want.action, want.sql, want.message, want.tables), sql
    # templated: decided twice for the first statement (as sent and with sentinels), never again
    assert len(calls) == (2 if templated else 26 if shape_of(pattern.format(i=1, j=1, n=1, s="a"))[1] else 25)


def test_a_shape_whose_sentinel_run_differs_is_never_templated() -> None:
    cache = TemplateCache()
    seen = []

    def full(text: str) -> Decision:
        seen.append(text)
        # the sentinel statement is decided differently from the one as sent: no template
        return Decision("refuse", message="no") if "2000000000" in text else Decision("allow")

    for v in (12, 13, 14):
        assert cache.decide(f"SELECT {v}", ("u",), full).action == "allow"
    assert len(seen) == 4  # 2 on the first sight (as sent + sentinels), then each statement afresh
