"""Real drivers through pgwarden: psycopg 3, asyncpg, pg8000, SQLAlchemy, pandas.

Each test compares what comes back through the proxy with the same query
run directly against PostgreSQL, and checks the audit events it produced.
"""

from __future__ import annotations

import asyncio
import decimal
import threading
import time

import asyncpg
import pandas as pd
import pg8000.native
import psycopg
import pytest
import sqlalchemy as sa

from proxy.demo.pgcluster import PgCluster
from tests.conftest import Proxy

GUEST_SQL = "SELECT id, name, phone, vip FROM guests WHERE id = ANY(%s) ORDER BY id"


def direct(cluster: PgCluster, sql: str, *params: object) -> list[tuple]:
    with psycopg.connect(cluster.dsn(cluster.superuser, cluster.superuser_password)) as c:
        return c.execute(sql, params or None).fetchall()


# --- psycopg 3 --------------------------------------------------------------------------------


def test_psycopg_simple_and_extended(proxy: Proxy, cluster: PgCluster) -> None:
    want = direct(cluster, GUEST_SQL, [1, 2, 3])
    with psycopg.connect(proxy.dsn("dave")) as c:
        # extended protocol (server-side parameters)
        assert c.execute(GUEST_SQL, ([1, 2, 3],)).fetchall() == want
        # simple protocol (client-side binding)
        with psycopg.ClientCursor(c) as cur:
            cur.execute(GUEST_SQL, ([1, 2, 3],))
            assert cur.fetchall() == want
        # prepared (named statement after prepare_threshold)
        for _ in range(3):
            assert c.execute(GUEST_SQL, ([1, 2, 3],), prepare=True).fetchall() == want
    events = proxy.take_events()
    assert [e["statement_type"] for e in events] == ["BEGIN"] + ["SELECT"] * 5 + ["COMMIT"]
    selects = events[1:-1]
    assert all(e["outcome"] == "ok" and e["rows"] == 3 for e in selects)
    assert selects[0]["statement"] == "SELECT id, name, phone, vip FROM guests WHERE id = ANY($1) ORDER BY id"
    assert selects[1]["statement"] == "SELECT id, name, phone, vip FROM guests WHERE id = ANY('{1,2,3}'::int2[]) ORDER BY id"


def test_psycopg_pipeline(proxy: Proxy, cluster: PgCluster) -> None:
    with psycopg.connect(proxy.dsn("dave")) as c:
        with c.pipeline():
            curs = [c.execute("SELECT %s::int * 2", (i,)) for i in range(20)]
            bad = c.cursor()
            bad.execute("SELECT 1/0")
            with pytest.raises(psycopg.errors.DivisionByZero):
                bad.fetchall()
        values = [cur.fetchone()[0] for cur in curs]
    assert values == [i * 2 for i in range(20)]
    events = proxy.take_events()
    assert [(e["statement_type"], e["outcome"]) for e in events] == (
        [("BEGIN", "ok")] + [("SELECT", "ok")] * 20 + [("SELECT", "error"), ("ROLLBACK", "ok")])
    assert events[21]["sqlstate"] == "22012"


def test_psycopg_transaction_error_and_recovery(proxy: Proxy) -> None:
    with psycopg.connect(proxy.dsn("dave")) as c:
        with pytest.raises(psycopg.errors.DivisionByZero):
            with c.transaction():
                c.execute("SELECT 1")
                c.execute("SELECT 1/0")
        assert c.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert c.execute("SELECT 2").fetchone() == (2,)


def test_psycopg_listen_notify(proxy: Proxy) -> None:
    with psycopg.connect(proxy.dsn("dave"), autocommit=True) as a, \
            psycopg.connect(proxy.dsn("bob"), autocommit=True) as b:
        a.execute("LISTEN pgwarden_test")
        b.execute("NOTIFY pgwarden_test, 'hello'")
        got = next(a.notifies(timeout=5))
        assert (got.channel, got.payload) == ("pgwarden_test", "hello")
        # BackendKeyData carries the upstream's real pid, so drivers can match notifications to backends.
        assert got.pid == b.info.backend_pid == b.execute("SELECT pg_backend_pid()").fetchone()[0]


def test_psycopg_cancel(proxy: Proxy) -> None:
    with psycopg.connect(proxy.dsn("dave")) as c:
        # cancel_safe() waits in Python; the legacy cancel() blocks in libpq holding the GIL, which would
        # starve the in-process proxy thread that has to route the cancel.
        timer = threading.Timer(0.5, c.cancel_safe)
        timer.start()
        t0 = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            c.execute("SELECT pg_sleep(30)")
        assert time.monotonic() - t0 < 10
        c.rollback()
        assert c.execute("SELECT 1").fetchone() == (1,)
    events = proxy.take_events(None)
    sleeps = [e for e in events if e.get("statement") == "SELECT pg_sleep(30)"]
    assert [(e["outcome"], e["sqlstate"]) for e in sleeps] == [("error", "57014")]
    assert [e["user"] for e in events if e["event"] == "cancel"] == ["dave"]


def test_psycopg_binary_copy_roundtrip(proxy: Proxy, cluster: PgCluster) -> None:
    cluster.psql("CREATE TABLE IF NOT EXISTS copy_bin(id int, note text); GRANT ALL ON copy_bin TO pgwarden_svc; "
                 "TRUNCATE copy_bin")
    with psycopg.connect(proxy.dsn("dave")) as c:
        with c.cursor().copy("COPY copy_bin (id, note) FROM STDIN") as cp:
            for i in range(5000):
                cp.write_row((i, f"备注 {i}"))
        c.commit()
        assert c.execute("SELECT count(*), sum(id), max(note) FROM copy_bin").fetchone() == (5000, 12497500, "备注 999")


# --- asyncpg ----------------------------------------------------------------------------------


async def test_asyncpg_named_statements_binary(proxy: Proxy, cluster: PgCluster) -> None:
    want = direct(cluster, "SELECT id, guest_name, created_at, legal_hold FROM cs_records WHERE id <= 5 ORDER BY id")
    conn = await asyncpg.connect(host="127.0.0.1", port=proxy.port, user="dave", password="demo", database="hotel")
    try:
        stmt = await conn.prepare("SELECT id, guest_name, created_at, legal_hold FROM cs_records WHERE id <= $1 ORDER BY id")
        for _ in range(3):
            rows = await stmt.fetch(5)
            assert [(r[0], r[2], r[3]) for r in rows] == [(w[0], w[2], w[3]) for w in want]
        # binary numeric / arrays
        assert await conn.fetchval("SELECT $1::numeric * 2", decimal.Decimal("1.25")) == decimal.Decimal("2.50")
        assert await conn.fetchval("SELECT array_agg(g) FROM generate_series(1,5) g") == [1, 2, 3, 4, 5]
        # cursors with prefetch use Execute with max_rows (PortalSuspended)
        async with conn.transaction():
            n = 0
            async for _r in conn.cursor("SELECT g FROM generate_series(1, 2500) g", prefetch=100):
                n += 1
        assert n == 2500
        with pytest.raises(asyncpg.exceptions.UndefinedTableError):
            await conn.fetch("SELECT * FROM no_such_table")
        assert await conn.fetchval("SELECT 7") == 7
    finally:
        await conn.close()
    events = proxy.take_events()
    errors = [e for e in events if e["outcome"] == "error"]
    assert [e["sqlstate"] for e in errors] == ["42P01"]
    # fetchval/fetchrow Execute with max_rows=1, so PostgreSQL suspends those portals too.
    suspended = [e for e in events if e["outcome"] == "suspended" and "generate_series(1, 2500)" in e["statement"]]
    assert [e["rows"] for e in suspended] == [100] * 25


async def test_asyncpg_concurrent_sessions(proxy: Proxy) -> None:
    async def work(i: int) -> int:
        conn = await asyncpg.connect(host="127.0.0.1", port=proxy.port, user="dave", password="demo", database="hotel")
        try:
            total = 0
            for j in range(20):
                total += await conn.fetchval("SELECT $1::int + $2::int", i, j)
            return total
        finally:
            await conn.close()

    results = await asyncio.gather(*(work(i) for i in range(10)))
    assert results == [20 * i + 190 for i in range(10)]


# --- pg8000, SQLAlchemy, pandas ----------------------------------------------------------------


def test_pg8000(proxy: Proxy, cluster: PgCluster) -> None:
    want = direct(cluster, "SELECT id, name FROM guests WHERE region = 'east' ORDER BY id LIMIT 10")
    conn = pg8000.native.Connection("dave", host="127.0.0.1", port=proxy.port, database="hotel", password="demo")
    try:
        rows = conn.run("SELECT id, name FROM guests WHERE region = :r ORDER BY id LIMIT 10", r="east")
        assert [tuple(r) for r in rows] == want
    finally:
        conn.close()


def test_sqlalchemy_and_pandas(proxy: Proxy, cluster: PgCluster) -> None:
    engine = sa.create_engine(f"postgresql+psycopg://dave:demo@127.0.0.1:{proxy.port}/hotel")
    try:
        with engine.connect() as c:
            got = c.execute(sa.text("SELECT department, count(*) AS n FROM cs_records GROUP BY 1 ORDER BY 1")).all()
            assert [tuple(r) for r in got] == direct(
                cluster, "SELECT department, count(*) AS n FROM cs_records GROUP BY 1 ORDER BY 1")
            meta = sa.MetaData()
            guests = sa.Table("guests", meta, autoload_with=c)  # reflection reads pg_catalog through the proxy
            assert "id_number" in guests.c
        df = pd.read_sql("SELECT id, score FROM service_ratings ORDER BY id LIMIT 50", engine)
        want = direct(cluster, "SELECT id, score FROM service_ratings ORDER BY id LIMIT 50")
        assert list(df.itertuples(index=False, name=None)) == want
    finally:
        engine.dispose()
