"""One meaning (issue 11), differentially: sqlglot's and libpg_query's readings of hostile text.

10,000 seeded statements from tests/hostile_sql.py, each decided for a restricted demo role
against the hand-built demo catalog. Two oracles that do not use rules.pgconfirm:

* where the two parsers' raw readings of the client's text differ (one parses and the other
  does not, a different number of statements, different relation names), the decision must be
  a refusal;
* whatever is not refused is checked on PostgreSQL's own parse of the text pgwarden would send:
  every reference to a table the role's grants protect sits in a derived table of exactly the
  fence shape (that table alone, OFFSET 0, the role's row filter), or is a DML target of a
  role allowed to write, and nothing else is sent.

The same cases go through the real proxy in tests/integration/test_one_meaning_proxy.py.
"""

from __future__ import annotations

import collections
import logging
from typing import Any

import pgparse
import pytest
import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError

from rules.decision import Decision
from rules.rewrite import rewrite
from tests.hostile_sql import cases
from tests.unit.test_rewrite_fixtures import _CATALOG, grants_of

SEED = 20261202
N = 10_000
USERS = ("alice", "bob", "carol", "erin", "gina", "frank", "dave", "pms", "hank", "judy", "ivy")

logging.getLogger("sqlglot").setLevel(logging.ERROR)  # the raw sqlglot reading below warns on fallbacks


def _sqlglot_reading(sql: str) -> tuple[int, frozenset[str]] | None:
    try:
        trees = [t for t in sqlglot.parse(sql, read="postgres") if t is not None]
    except (SqlglotError, ValueError, RecursionError):
        return None
    names = frozenset(t.name for tree in trees for t in tree.find_all(exp.Table) if isinstance(t.this, exp.Identifier))
    return len(trees), names


def _walk(node: Any, path: list[tuple[str, Any]]):  # noqa: ANN202 - generator of (RangeVar, path)
    if isinstance(node, dict):
        if "relname" in node and "relpersistence" in node:
            yield node, path
        for k, v in node.items():
            yield from _walk(v, [*path, (k, node)])
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v, path)


def _pg_reading(sql: str) -> tuple[int, frozenset[str]] | None:
    try:
        stmts = pgparse.parse(sql)
    except pgparse.PGQueryError:
        return None
    return len(stmts), frozenset(rv["relname"] for rv, _ in _walk(stmts, []))


def _fenced(path: list[tuple[str, Any]], relname: str, filtered: bool) -> bool:
    """The innermost subquery around the reference is a fence of that table: alone, OFFSET 0, filtered."""
    for key, parent in reversed(path):
        if key == "subquery":
            sel = parent["subquery"].get("SelectStmt", {})
            frm = sel.get("fromClause") or []
            offset = sel.get("limitOffset", {}).get("A_Const", {})
            return (len(frm) == 1 and frm[0].get("RangeVar", {}).get("relname") == relname
                    and frm[0]["RangeVar"].get("schemaname") == "public" and offset.get("ival") == {}
                    and (not filtered or "whereClause" in sel))
    return False


def _sent_problems(user: str, d: Decision) -> list[str]:
    g = grants_of(user)
    protected = {t.split(".", 1)[1]: g.tables[t].row_filter is not None for t in g.tables}
    if "cs_records" in protected:
        protected["cs_records_2026_11"] = protected["cs_records"]
    out = []
    assert d.sql is not None
    for rv, path in _walk(pgparse.parse(d.sql), []):
        name = rv["relname"]
        if name not in protected:
            continue
        keys = [k for k, _ in path]
        if keys and keys[-1] == "relation" and d.reading is not None and d.reading.targets:
            continue  # the DML target of a role that may write
        if "whereClause" in keys and _inside_fence_filter(path):
            continue  # a row filter's own subquery (owned_through), inside the fence
        if not _fenced(path, name, protected[name]):
            out.append(f"{name} outside a fence")
    return out


def _inside_fence_filter(path: list[tuple[str, Any]]) -> bool:
    seen_where = False
    for key, _ in reversed(path):
        if key == "whereClause":
            seen_where = True
        elif key == "subquery" and seen_where:
            return True
    return False


@pytest.fixture(scope="module")
def decided() -> list[tuple[str, str, Decision]]:
    out = []
    for i, c in enumerate(cases(SEED, N)):
        user = USERS[i % len(USERS)]
        out.append((user, c.sql, rewrite(c.sql, grants_of(user), _CATALOG)))
    return out


def test_the_generator_is_reproducible_and_varied() -> None:
    a = [c.sql for c in cases(SEED, 200)]
    assert a == [c.sql for c in cases(SEED, 200)]
    assert len(set(a)) > 150
    for needle in ("/*/**/", "E'", "U&'", "UESCAPE", "$$", "$a$", "--", "客服"):
        assert any(needle in s for s in (c.sql for c in cases(SEED, 2000))), needle


def test_where_the_parsers_disagree_the_statement_is_refused(decided: list[tuple[str, str, Decision]]) -> None:
    kinds: collections.Counter[str] = collections.Counter()
    wrong = []
    for user, sql, d in decided:
        pg, ours = _pg_reading(sql), _sqlglot_reading(sql)
        if pg == ours:
            kinds["agree"] += 1
            continue
        kinds["only PostgreSQL parses" if ours is None else "only sqlglot parses" if pg is None
              else "different statements or relations"] += 1
        if d.action != "refuse":
            wrong.append((user, sql, d.action))
    assert not wrong, wrong[:5]
    # The generator must exercise each kind of disagreement, or this test proves little.
    assert kinds["only sqlglot parses"] > 100 and kinds["only PostgreSQL parses"] > 100, kinds
    assert kinds["different statements or relations"] > 10, kinds


def test_nothing_sent_reads_a_protected_table_outside_a_fence(decided: list[tuple[str, str, Decision]]) -> None:
    passed = 0
    for user, sql, d in decided:
        if d.action == "refuse":
            assert d.sqlstate == "42501" and d.message.startswith("pgwarden:"), d
            continue
        passed += 1
        assert d.sql is not None, (user, sql, d)  # '' for a text of comments only: an empty query
        problems = _sent_problems(user, d)
        assert not problems, (user, sql, d.sql, problems)
    assert passed > 500, passed  # enough of them get through to be checked


@pytest.mark.parametrize("sql", [
    "/*/**/ SELECT '*/ SELECT phone, id_number FROM cs_records --'",
    "/*/**/ SELECT '*/ COPY (SELECT phone, id_number FROM cs_records) TO STDOUT --'",
    "/*/**/ SELECT '*/ WITH x AS (UPDATE cs_records SET content = content WHERE legal_hold RETURNING 1) "
    "SELECT count(*) FROM x --'",
    "/*/**/ SELECT '*/ SELECT * FROM guests --'",
    "SELECT 1 /*/**/ , (SELECT phone FROM cs_records LIMIT 1) -- */",
    "/*/**/ SELECT $1::text || '*/ SELECT phone, id_number FROM cs_records --'",
    "/*/**/ SELECT '*/ SET ROLE postgres --'",
    "/*/**/ SELECT 1; SELECT '*/ SELECT phone FROM cs_records; --'",
])
@pytest.mark.parametrize("user", USERS)
def test_the_comment_nesting_attack_and_its_relatives_are_refused_as_disagreements(sql: str, user: str) -> None:
    g = grants_of(user)
    d = rewrite(sql, g, _CATALOG)
    assert d.action == "refuse" and d.sqlstate == "42501", (user, sql, d)
    if "public.cs_records" in g.tables or "cs_records" not in sql:
        # What sqlglot reads is allowed to this role: only PostgreSQL's other reading refuses it.
        assert d.reason.startswith("parser_disagreement"), (user, sql, d.reason)
        assert "PostgreSQL's parser reads this statement differently" in d.message


def test_nesting_both_parsers_agree_on_is_decided_normally() -> None:
    """sqlglot nests block comments as PostgreSQL does: this one is no disagreement, just a fenced read."""
    d = rewrite("/* /* /* */ */ SELECT '*/ SELECT phone FROM cs_records --'", grants_of("alice"), _CATALOG)
    assert d.action == "rewrite" and d.tables == ("public.cs_records",), d
