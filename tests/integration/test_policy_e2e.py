"""The hotel rules enforced end to end: real clients through pgwarden, results checked against
independent queries run directly on PostgreSQL (R1, R2, R3.1, R6.4)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from proxy.demo.pgcluster import PgCluster
from tests.conftest import Proxy, start_proxy

HOTEL = Path(__file__).resolve().parents[2] / "deploy" / "rules" / "hotel.yaml"


@pytest.fixture(scope="module")
def guarded(cluster: PgCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    p = start_proxy(cluster, str(tmp_path_factory.mktemp("guarded")), rules=str(HOTEL))
    try:
        yield p
    finally:
        p.thread.stop()


def run(p: Proxy, user: str, sql: str, params: tuple | None = None) -> list[tuple]:
    with psycopg.connect(p.dsn(user), autocommit=True) as c:
        return c.execute(sql, params).fetchall()


def refused(p: Proxy, user: str, sql: str) -> psycopg.Error:
    with psycopg.connect(p.dsn(user), autocommit=True) as c:
        with pytest.raises(psycopg.Error) as ei:
            c.execute(sql).fetchall()
        assert ei.value.sqlstate == "42501", (ei.value.sqlstate, str(ei.value))
        # the session stays usable after a refusal
        assert c.execute("SELECT 1").fetchone() == (1,)
    return ei.value


def direct(c: PgCluster, sql: str) -> list[tuple]:
    with psycopg.connect(c.dsn(c.superuser, c.superuser_password)) as conn:
        return conn.execute(sql).fetchall()


def test_supervisor_sees_own_department_last_72_hours(guarded: Proxy, cluster: PgCluster) -> None:
    got = run(guarded, "bob", "SELECT id FROM cs_records ORDER BY id")
    want = direct(cluster, "SELECT id FROM cs_records WHERE department = 'FO' AND NOT legal_hold "
                           "AND created_at >= statement_timestamp() - interval '72 hours' ORDER BY id")
    assert got == want and len(got) > 0


# The start of the current shift in the hotel rules (07-15, 15-23, 23-07 Asia/Shanghai), written apart
# from the rules engine's own formulation.
SHIFT_START = ("(SELECT (CASE WHEN t::time >= '23:00' THEN date_trunc('day', t) + interval '23 hours' "
               "WHEN t::time < '07:00' THEN date_trunc('day', t) - interval '1 hour' "
               "WHEN t::time >= '15:00' THEN date_trunc('day', t) + interval '15 hours' "
               "ELSE date_trunc('day', t) + interval '7 hours' END) AT TIME ZONE 'Asia/Shanghai' "
               "FROM (SELECT statement_timestamp() AT TIME ZONE 'Asia/Shanghai' AS t) l)")
ALICE_SEES = (f"department = 'FO' AND NOT legal_hold AND created_at >= {SHIFT_START} "
              "AND created_at <= statement_timestamp()")


def planted_records(c: PgCluster, rows: list[tuple[str, str, str, bool, str]]) -> list[int]:
    """cs_records inserted directly: (department, phone, id_number, legal_hold, created_at SQL) each."""
    values = ", ".join(f"(1, '{d}', 'request', 'normal', 'phone', 'desk', '王小明', '{p}', '{i}', 'planted', {h}, {t})"
                       for d, p, i, h, t in rows)
    with psycopg.connect(c.dsn(c.superuser, c.superuser_password)) as conn:
        ids = conn.execute("INSERT INTO cs_records (guest_id, department, category, severity, channel, agent, "
                           "guest_name, phone, id_number, content, legal_hold, created_at) VALUES "
                           f"{values} RETURNING id").fetchall()
    return [i for (i,) in ids]


def test_front_desk_masks(guarded: Proxy, cluster: PgCluster) -> None:
    from masking import mask_value

    # The current shift may have just begun: plant two records of it (and four alice may not see: another
    # department's, one under legal hold, one from just before the shift began, one from the future) so the
    # masks are checked on rows that are surely there, and the newest rows include what must stay out.
    planted = planted_records(cluster, [("FO", "13912345678", "11010119900307123X", False, "now()"),
                                        ("FO", "13698765432", "440301198512240011", False, "now()"),
                                        ("HK", "13711112222", "310101197001010022", False, "now()"),
                                        ("FO", "13533334444", "320101197001010033", True, "now()"),
                                        ("FO", "13655556666", "320101197001010044", False,
                                         f"{SHIFT_START} - interval '1 minute'"),
                                        ("FO", "13677778888", "320101197001010055", False, "now() + interval '1 hour'")])
    try:
        for _ in range(3):  # again if a shift boundary fell between the two queries
            # the newest 50 (a shift can hold more than alice's row cap of 200)
            got = run(guarded, "alice", "SELECT id, phone, id_number, department FROM cs_records "
                                        "ORDER BY id DESC LIMIT 50")
            clear = direct(cluster, f"SELECT id, phone, id_number, department FROM cs_records WHERE {ALICE_SEES} "
                                    "ORDER BY id DESC LIMIT 50")
            if [r[0] for r in got] == [r[0] for r in clear]:
                break
        assert [r[0] for r in got] == [r[0] for r in clear]
        assert {r[0] for r in got} & set(planted) == set(planted[:2])
        assert got == [(i, mask_value("mobile", p), mask_value("resident_id", n), d) for i, p, n, d in clear]
        assert [r[1:3] for r in got if r[0] in planted] == [("136****5432", "440***********0011"),
                                                           ("139****5678", "110***********123X")]
    finally:
        cluster.psql(f"DELETE FROM cs_records WHERE id IN ({', '.join(map(str, planted))})")


def test_sales_never_sees_complaints(guarded: Proxy, cluster: PgCluster) -> None:
    assert direct(cluster, "SELECT count(*) > 0 FROM cs_records WHERE category = 'complaint'") == [(True,)]
    assert run(guarded, "gina", "SELECT count(*) FROM cs_records WHERE category = 'complaint'") == [(0,)]
    assert run(guarded, "gina", "SELECT count(*) FROM cs_records") == direct(
        cluster, "SELECT count(*) FROM cs_records WHERE category = 'consultation' AND NOT legal_hold")


def test_account_manager_own_guests_only(guarded: Proxy, cluster: PgCluster) -> None:
    got = run(guarded, "erin", "SELECT id, account_manager FROM guests ORDER BY id")
    assert got == direct(cluster, "SELECT id, account_manager FROM guests WHERE account_manager = 'erin' ORDER BY id")


@pytest.mark.parametrize("user,sql", [
    ("carol", "SELECT * FROM guests"),                      # it_ops: never personal data
    ("carol", "SELECT count(*) FROM cs_records"),
    ("alice", "SELECT * FROM guests"),                      # not granted
    ("anna", "SELECT * FROM cs_records"),                   # training not done: trainee scope
    ("hank", "SELECT * FROM cs_records"),
    ("alice", "COPY cs_records TO STDOUT"),                 # export
    ("alice", "COPY (SELECT * FROM cs_records) TO STDOUT"),
    ("alice", "DROP TABLE guests"),
    ("alice", "SET ROLE postgres"),
    ("alice", "SELECT * FROM pg_stats"),
    ("alice", "SELECT query_to_xml('select * from guests', true, true, '')"),
    ("alice", "DO $$ BEGIN PERFORM 1; END $$"),
])
def test_refusals(guarded: Proxy, user: str, sql: str) -> None:
    refused(guarded, user, sql)


def test_it_ops_reads_system_tables(guarded: Proxy, cluster: PgCluster) -> None:
    assert run(guarded, "carol", "SELECT name FROM sys_params ORDER BY name") == direct(
        cluster, "SELECT name FROM sys_params ORDER BY name")


def test_trainee_reads_training_dialogs(guarded: Proxy, cluster: PgCluster) -> None:
    assert run(guarded, "anna", "SELECT count(*) FROM training_dialogs") == direct(
        cluster, "SELECT count(*) FROM training_dialogs")


BOB_SEES = "department = 'FO' AND NOT legal_hold AND created_at >= statement_timestamp() - interval '72 hours'"


def test_division_oracle_does_not_leak_filtered_rows(guarded: Proxy, cluster: PgCluster) -> None:
    # Rows of other departments would raise division by zero if the user's predicate saw them.
    rows = run(guarded, "bob", "SELECT count(*) FROM cs_records "
                               "WHERE 1 / (CASE WHEN department = 'FO' THEN 1 ELSE 0 END) = 1")
    want = direct(cluster, f"SELECT count(*) FROM cs_records WHERE {BOB_SEES}")
    assert rows == want and want[0][0] > 0


def test_extended_protocol_parameters(guarded: Proxy, cluster: PgCluster) -> None:
    got = run(guarded, "bob", "SELECT count(*) FROM cs_records WHERE category = %s", ("complaint",))
    assert got == direct(cluster, "SELECT count(*) FROM cs_records WHERE department = 'FO' AND NOT legal_hold "
                                  "AND category = 'complaint' AND created_at >= statement_timestamp() - interval '72 hours'")


def test_refusal_is_audited(guarded: Proxy) -> None:
    guarded.take_events(None)
    refused(guarded, "alice", "SELECT * FROM guests")
    ev = [e for e in guarded.take_events() if e["outcome"] == "refused"]
    assert len(ev) == 1 and ev[0]["sqlstate"] == "42501" and ev[0]["statement"] == "SELECT * FROM guests"


def test_reload_on_file_change_keeps_connections(cluster: PgCluster, tmp_path: Path) -> None:
    import shutil
    import time

    rules = tmp_path / "rules.yaml"
    shutil.copy(HOTEL, rules)
    p = start_proxy(cluster, str(tmp_path), rules=str(rules))
    try:
        with psycopg.connect(p.dsn("carol"), autocommit=True) as c:
            with pytest.raises(psycopg.Error) as ei:
                c.execute("SELECT count(*) FROM training_dialogs").fetchall()
            assert ei.value.sqlstate == "42501"
            # grant it_ops the training dialogues
            text = rules.read_text(encoding="utf-8").replace(
                "      public.sys_params: {}\n      public.fault_logs: {}\n",
                "      public.sys_params: {}\n      public.fault_logs: {}\n      public.training_dialogs: {}\n", 1)
            rules.write_text(text, encoding="utf-8")
            deadline = time.monotonic() + 15
            while True:
                try:
                    n = c.execute("SELECT count(*) FROM training_dialogs").fetchone()
                    break
                except psycopg.Error:
                    assert time.monotonic() < deadline, "new rules never applied"
                    time.sleep(0.3)
            assert n == direct(cluster, "SELECT count(*) FROM training_dialogs")[0] and n[0] > 0
            # invalid rules: refused, the old (new) rules stay, the connection stays
            rules.write_text(text + "roles: [broken\n", encoding="utf-8")
            time.sleep(4)
            assert c.execute("SELECT count(*) FROM training_dialogs").fetchone() == n
        failed = [e for e in p.take_events(None) if e["event"] == "rules_reload_failed"]
        assert len(failed) == 1 and failed[0]["error"].startswith(f"{rules}:"), failed
    finally:
        p.thread.stop()


def test_a_change_in_an_included_file_reloads_the_rules(cluster: PgCluster, tmp_path: Path) -> None:
    import time

    head, roles = HOTEL.read_text(encoding="utf-8").split("\nroles:\n", 1)
    (tmp_path / "hotel.yaml").write_text(head + "\ninclude: roles.yaml\n", encoding="utf-8")
    part = tmp_path / "roles.yaml"
    part.write_text("roles:\n" + roles, encoding="utf-8")
    p = start_proxy(cluster, str(tmp_path), rules=str(tmp_path / "hotel.yaml"))
    try:
        with psycopg.connect(p.dsn("carol"), autocommit=True) as c:
            with pytest.raises(psycopg.Error) as ei:
                c.execute("SELECT count(*) FROM training_dialogs")
            assert ei.value.sqlstate == "42501"
            part.write_text(part.read_text(encoding="utf-8").replace(
                "      public.fault_logs: {}\n", "      public.fault_logs: {}\n      public.training_dialogs: {}\n", 1),
                encoding="utf-8")
            deadline = time.monotonic() + 15
            while True:
                try:
                    (n,), = c.execute("SELECT count(*) FROM training_dialogs").fetchall()
                    break
                except psycopg.Error:
                    assert time.monotonic() < deadline, "a change in an included file was never applied"
                    time.sleep(0.3)
        assert n == direct(cluster, "SELECT count(*) FROM training_dialogs")[0][0]
    finally:
        p.thread.stop()


def test_sensitive_literals_are_redacted_in_the_audit_log(guarded: Proxy) -> None:
    guarded.take_events(None)
    id_number = "110101199003077777"
    run(guarded, "dave", f"SELECT count(*) FROM cs_records WHERE id_number = '{id_number}' AND phone IN ('13812345678')")
    ev = guarded.take_events()[-1]
    logged = ev["statement"] + ev.get("rewritten", "")
    assert id_number not in logged and "13812345678" not in logged
    assert "110***********7777" in ev["statement"] and "138****5678" in ev["statement"]
    with open(guarded.audit_path, encoding="utf-8") as f:
        assert id_number not in f.read()


BI_WORKLOAD = [
    "SELECT department, category, count(*) AS n FROM cs_records GROUP BY 1, 2 ORDER BY 1, 2",
    "SELECT date_trunc('month', created_at) AS m, count(*) FROM cs_records "
    "WHERE created_at >= now() - interval '1 year' GROUP BY 1 ORDER BY 1",
    "SELECT r.department, avg(r.score)::numeric(4,2) FROM service_ratings r GROUP BY 1 ORDER BY 1",
    "SELECT c.id, c.severity, p.published FROM cs_records c JOIN complaint_plans p ON p.cs_record_id = c.id "
    "WHERE c.severity = 'major' ORDER BY c.id LIMIT 50",
    "WITH recent AS (SELECT * FROM cs_records WHERE created_at > now() - interval '7 days') "
    "SELECT channel, count(*) FROM recent GROUP BY channel ORDER BY channel",
    "SELECT title FROM crisis_reports ORDER BY id",
]


@pytest.mark.parametrize("sql", BI_WORKLOAD)
def test_general_manager_bi_workload_matches_direct(guarded: Proxy, cluster: PgCluster, sql: str) -> None:
    # The general manager's grants cover these tables in clear and in full: results must be identical.
    assert run(guarded, "dave", sql) == direct(cluster, sql)


# The start of today in the hotel's time zone, as the PMS's `today` condition means it.
TODAY_STARTS = "(date_trunc('day', statement_timestamp() AT TIME ZONE 'Asia/Shanghai') AT TIME ZONE 'Asia/Shanghai')"


def test_pms_inserts_and_reads_back_only_its_own_records_of_today(guarded: Proxy, cluster: PgCluster) -> None:
    # The legacy PMS: md5 login, no TLS, simple protocol, GBK text.
    import subprocess

    from masking import mask_value

    # Records it must not read back: its own of yesterday (hotel time), and another agent's of today.
    with psycopg.connect(cluster.dsn(cluster.superuser, cluster.superuser_password)) as c:
        planted = [i for (i,) in c.execute(
            "INSERT INTO cs_records (guest_id, department, category, severity, channel, agent, guest_name, content, "
            f"created_at) VALUES (1, 'FO', 'request', 'normal', 'phone', 'pms', '李雷', 'yesterday', "
            f"{TODAY_STARTS} - interval '1 minute'), (1, 'FO', 'request', 'normal', 'phone', 'desk', '韩梅梅', "
            "'another agent', now()) RETURNING id").fetchall()]
    env = {"PGPASSWORD": "demo", "PGCLIENTENCODING": "GBK", "PATH": os.environ["PATH"]}
    conn = f"host=127.0.0.1 port={guarded.port} dbname=hotel user=pms sslmode=disable"
    try:
        ins = ("INSERT INTO cs_records (guest_id, department, category, severity, channel, agent, guest_name, phone, "
               "id_number, content, created_at) VALUES (1, 'FO', 'request', 'normal', 'front_desk', 'pms', '王小明', "
               "'13800001111', '110101199003077777', '客人要求加床', now()) RETURNING id")
        r = subprocess.run(["psql", "-X", "-A", "-t", "-q", conn, "-c", ins.encode("gbk")], env=env,
                           capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr.decode("gbk", "replace")
        new_id = int(r.stdout.decode("gbk").strip())
        r = subprocess.run(["psql", "-X", "-A", "-t", conn, "-c",
                            "SELECT id, agent, guest_name, content FROM cs_records ORDER BY id"],
                           env=env, capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr.decode("gbk", "replace")
        rows = [tuple(line.split("|")) for line in r.stdout.decode("gbk").strip().splitlines()]
        want = direct(cluster, "SELECT id, agent, guest_name, content FROM cs_records WHERE agent = 'pms' "
                               f"AND created_at >= {TODAY_STARTS} ORDER BY id")
        assert rows == [(str(i), a, mask_value("name", n), mask_value("redact_text", t)) for i, a, n, t in want]
        assert (str(new_id), "pms", "王**", "客人要求加床") in rows
        assert not {str(i) for i in planted} & {r[0] for r in rows}
        # DELETE is not among the PMS's statements: refused with 42501 (VERBOSITY=verbose shows the SQLSTATE)
        r = subprocess.run(["psql", "-X", "-A", "-t", "-v", "VERBOSITY=verbose", conn, "-c", "DELETE FROM cs_records"],
                           env=env, capture_output=True, timeout=60)
        assert r.returncode == 1
        assert r.stderr.decode("gbk").startswith("ERROR:  42501: pgwarden: role pms_integration may not "), r.stderr
        assert direct(cluster, f"SELECT count(*) FROM cs_records WHERE id = {new_id}") == [(1,)]  # nothing deleted
    finally:
        cluster.psql(f"DELETE FROM cs_records WHERE id IN ({planted[0]}, {planted[1]})")


@pytest.fixture(scope="module")
def capped(cluster: PgCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    d = tmp_path_factory.mktemp("capped")
    rules = d / "rules.yaml"
    text = HOTEL.read_text(encoding="utf-8")
    assert "  supervisor:" in text
    rules.write_text(text.replace("    row_cap: 5000\n", "    row_cap: 10\n", 1), encoding="utf-8")
    p = start_proxy(cluster, str(d), rules=str(rules))
    try:
        yield p
    finally:
        p.thread.stop()


def test_row_cap_refuses_instead_of_truncating(capped: Proxy) -> None:
    with psycopg.connect(capped.dsn("bob"), autocommit=True) as c:
        assert len(c.execute("SELECT id FROM cs_records ORDER BY id LIMIT 10").fetchall()) == 10
        with pytest.raises(psycopg.Error) as ei:
            c.execute("SELECT id FROM cs_records").fetchall()
        assert ei.value.sqlstate == "42501"
        assert "more than 10 rows, the row cap of role supervisor" in str(ei.value)
        # the same through a cursor: refused on the first FETCH, whatever its size
        c.execute("BEGIN")
        c.execute("DECLARE cur CURSOR FOR SELECT id FROM cs_records")
        with pytest.raises(psycopg.Error) as ei:
            c.execute("FETCH 3 FROM cur").fetchall()
        assert ei.value.sqlstate == "42501"
        # PostgreSQL aborted the transaction itself, as it would for any error
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            c.execute("SELECT 1")
        c.execute("ROLLBACK")
    ev = [e for e in capped.take_events() if e["outcome"] == "refused"]
    assert [e["statement"] for e in ev] == ["SELECT id FROM cs_records", "FETCH 3 FROM cur"]
    assert all(e["reason"] == "result larger than the role's row cap (R3.2)" for e in ev)


async def test_row_cap_holds_across_execute_max_rows(capped: Proxy) -> None:
    import asyncpg

    conn = await asyncpg.connect(host="127.0.0.1", port=capped.port, user="bob", password="demo", database="hotel")
    try:
        async with conn.transaction():
            with pytest.raises(asyncpg.PostgresError) as ei:
                async for _ in conn.cursor("SELECT id FROM cs_records", prefetch=5):
                    pass
        assert ei.value.sqlstate == "42501"
        assert len(await conn.fetch("SELECT id FROM cs_records LIMIT 5")) == 5
    finally:
        await conn.close()


def test_rejoined_multi_statement_query_keeps_statement_boundaries(guarded: Proxy, cluster: PgCluster) -> None:
    # The first statement ends in a line comment; when pgwarden rewrites the second and rejoins
    # the Query, the comment must not swallow the separator.
    with psycopg.connect(guarded.dsn("bob"), autocommit=True) as c:
        cur = c.cursor()
        cur.execute("SELECT 1 AS one -- trailing comment\n; SELECT count(*) FROM cs_records")
        assert cur.fetchall() == [(1,)]
        assert cur.nextset()
        assert cur.fetchall() == direct(cluster, f"SELECT count(*) FROM cs_records WHERE {BOB_SEES}")
        assert not cur.nextset()


def test_audit_event_names_masks_and_flags(guarded: Proxy) -> None:
    guarded.take_events(None)
    run(guarded, "alice", "SELECT phone FROM cs_records LIMIT 1")
    run(guarded, "dave", "SELECT count(*) FROM crisis_reports")
    alice, dave = guarded.take_events()[-2:]
    assert alice["decision"] == "rewrite" and alice["tables"] == ["public.cs_records"]
    assert alice["masked"] == ["public.cs_records.phone"]  # the columns it read, not every masked one (issue 13)
    assert dave["flags"] == ["internal_audit"]  # the general manager's every access is flagged
