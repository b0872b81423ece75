"""Writes through the real proxy: a role may only write what it could read back.

pms_integration's rows are `today` and `agent = 'pms'`. INSERTed rows are checked against
that filter (nothing is written if one row fails), an UPDATE touches only rows inside it
and may not move a row out, and the filter is evaluated before the user's predicate can
see a row. Every test runs in a transaction it rolls back, so the shared data stays as it was.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from proxy.demo.pgcluster import PgCluster
from tests.conftest import Proxy, start_proxy
from tests.integration.test_attacks import PHONE_MASK, assert_refused
from tests.integration.test_policy_e2e import HOTEL, direct, guarded  # noqa: F401 - fixture

COLS = "guest_id, department, category, channel, agent, guest_name, phone, id_number, content"
ROW = "1, 'FO', 'request', 'phone', 'pms', '王小明', '13800001111', '110101199003077777', 'towels'"
CHECK_FAILED = "may not write a row it could not read back"


@pytest.fixture
def pms(guarded: Proxy) -> Iterator[psycopg.Connection]:  # noqa: F811
    with psycopg.connect(guarded.dsn("pms")) as conn:
        yield conn
        conn.rollback()


def error_of(conn: psycopg.Connection, sql: str, params: tuple | None = None) -> psycopg.Error:
    try:
        conn.execute(sql, params)
    except psycopg.Error as e:
        conn.rollback()
        return e
    raise AssertionError(f"not refused: {sql}")


def other_agents_record(cluster: PgCluster) -> tuple[int, str]:
    (rid, content), = direct(cluster, "SELECT id, content FROM cs_records WHERE agent <> 'pms' "
                                      "AND created_at > now() - interval '1 hour' ORDER BY id LIMIT 1")
    return rid, content


def test_insert_as_itself_with_defaults_is_written_and_read_back(pms: psycopg.Connection) -> None:
    (rid,), = pms.execute(f"INSERT INTO cs_records ({COLS}) VALUES ({ROW}) RETURNING id").fetchall()
    rows = pms.execute("SELECT agent, guest_name, phone, content, severity, created_at::date = current_date "
                       "FROM cs_records WHERE id = %s", (rid,)).fetchall()
    assert rows == [("pms", "王**", "138****1111", "towels", "normal", True)]


@pytest.mark.parametrize("values", [
    ROW.replace("'pms'", "'alice'"),                                # another agent
    ROW.replace("'pms'", "NULL"),                                   # no agent at all
])
def test_insert_outside_the_row_filter_is_refused_and_writes_nothing(pms: psycopg.Connection, cluster: PgCluster,
                                                                     values: str) -> None:
    before = direct(cluster, "SELECT count(*) FROM cs_records")
    err = error_of(pms, f"INSERT INTO cs_records ({COLS}) VALUES ({values})")
    assert err.sqlstate == "42501" and CHECK_FAILED in str(err), str(err)
    assert direct(cluster, "SELECT count(*) FROM cs_records") == before


def test_backdated_insert_is_refused(pms: psycopg.Connection) -> None:
    err = error_of(pms, f"INSERT INTO cs_records ({COLS}, created_at) VALUES ({ROW}, now() - interval '2 days')")
    assert err.sqlstate == "42501" and CHECK_FAILED in str(err)


def test_one_bad_row_refuses_the_whole_insert(pms: psycopg.Connection, cluster: PgCluster) -> None:
    before = direct(cluster, "SELECT count(*) FROM cs_records WHERE agent = 'pms'")
    err = error_of(pms, f"INSERT INTO cs_records ({COLS}) VALUES ({ROW}), ({ROW.replace(chr(39) + 'pms', chr(39) + 'bob')})")
    assert err.sqlstate == "42501"
    assert direct(cluster, "SELECT count(*) FROM cs_records WHERE agent = 'pms'") == before


def test_bound_parameters_are_checked_too(pms: psycopg.Connection) -> None:
    sql = f"INSERT INTO cs_records ({COLS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING agent, phone"
    row = [7, "FO", "request", "phone", "pms", "李四", "13912345678", "110101199003071234", "late checkout"]
    assert pms.execute(sql, row).fetchall() == [("pms", "139****5678")]
    err = error_of(pms, sql, tuple(row[:4] + ["alice"] + row[5:]))
    assert err.sqlstate == "42501" and CHECK_FAILED in str(err)


def test_update_touches_only_its_own_rows_of_today(pms: psycopg.Connection, cluster: PgCluster) -> None:
    (own,), = pms.execute(f"INSERT INTO cs_records ({COLS}) VALUES ({ROW}) RETURNING id").fetchall()
    rid, _ = other_agents_record(cluster)
    cur = pms.execute("UPDATE cs_records SET severity = 'major' WHERE id IN (%s, %s) RETURNING id, phone, id_number",
                      (own, rid))
    rows = cur.fetchall()
    assert cur.rowcount == 1 and [r[0] for r in rows] == [own]
    assert PHONE_MASK.fullmatch(rows[0][1]) and rows[0][2] == "110***********7777"


def test_leaky_update_predicate_never_sees_other_rows(pms: psycopg.Connection, cluster: PgCluster) -> None:
    # `category::int` fails on text and the error echoes the value. If PostgreSQL ran this on any
    # other agent's row, the PMS would read that row's category in the error. The row filter
    # guards the predicate, so it only ever sees the PMS's own rows (where it is false): UPDATE 0.
    for sql in ["UPDATE cs_records SET severity = 'major' WHERE CASE WHEN agent = 'pms' THEN false "
                "ELSE category::int = 1 END",
                "UPDATE cs_records SET severity = 'major' WHERE agent <> 'pms' AND category::int = 1"]:
        cur = pms.execute(sql)
        assert cur.rowcount == 0, sql


@pytest.mark.parametrize("sql", [
    "UPDATE cs_records SET agent = 'alice' WHERE agent = 'pms'",
    "UPDATE cs_records SET created_at = now() - interval '3 days'",
    "UPDATE cs_records SET content = phone",
    "DELETE FROM cs_records WHERE agent = 'pms'",
    "INSERT INTO cs_records DEFAULT VALUES",
])
def test_writes_that_would_escape_the_filter_are_refused(pms: psycopg.Connection, sql: str) -> None:
    assert_refused(error_of(pms, sql))


# ---------------------------------------------------------------------------
# A role whose row filter is expensive (ownership through guests, a subplan)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def owner_writes(cluster: PgCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """The hotel rules, with account managers also allowed to UPDATE their own guests' records."""
    text = HOTEL.read_text(encoding="utf-8")
    grant = "      public.cs_records:\n        rows:\n          - owned_through:"
    assert text.count(grant) == 1
    text = text.replace("  account_manager:                 # 客户经理: the service history of their own guests\n",
                        "  account_manager:\n    statements: [select, update, set, show, transaction]\n")
    text = text.replace(grant, "      public.cs_records:\n        statements: [select, update]\n        rows:\n"
                                "          - owned_through:")
    d = tmp_path_factory.mktemp("owner_writes")
    (d / "rules.yaml").write_text(text, encoding="utf-8")
    p = start_proxy(cluster, str(d), rules=str(d / "rules.yaml"))
    try:
        yield p
    finally:
        p.thread.stop()


def test_update_predicate_cannot_run_before_an_expensive_filter(owner_writes: Proxy, cluster: PgCluster) -> None:
    # PostgreSQL orders quals by cost: a cheap user predicate would run before the ownership
    # subplan and echo other guests' values in its cast error. The CASE guard keeps it behind.
    with psycopg.connect(owner_writes.dsn("erin")) as conn:
        cur = conn.execute("UPDATE cs_records SET severity = severity WHERE CASE WHEN guest_id IN "
                           "(SELECT id FROM guests) THEN false ELSE category::int = 1 END")
        assert cur.rowcount == 0
        conn.rollback()
        cur = conn.execute("UPDATE cs_records SET severity = severity WHERE guest_id > 0 RETURNING guest_id")
        mine = {g for (g,) in cur.fetchall()}
        conn.rollback()
    owned = {g for (g,) in direct(cluster, "SELECT c.guest_id FROM cs_records c JOIN guests g ON g.id = c.guest_id "
                                           "WHERE g.account_manager = 'erin' AND NOT c.legal_hold")}
    assert mine == owned and mine
