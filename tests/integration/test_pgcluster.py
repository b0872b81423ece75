"""PgCluster + load_sample against a real PostgreSQL.

Self-contained (its own module-scoped cluster, no conftest), because the
harness fixtures are built on top of exactly these two modules.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from proxy.demo.pgcluster import PgCluster
from proxy.demo.sampledata import TABLES, load_sample_sync, partition_bounds


N_RECORDS = 20_000


@pytest.fixture(scope="module")
def cluster() -> Iterator[PgCluster]:
    with PgCluster() as c:
        yield c


@pytest.fixture(scope="module")
def loaded(cluster: PgCluster) -> dict[str, int]:
    return load_sample_sync(cluster.dsn(), cs_records=N_RECORDS, guests=1_000)


async def _connect(cluster: PgCluster, user: str | None = None):
    return await asyncpg.connect(cluster.dsn(user))


async def test_row_counts_match(cluster: PgCluster, loaded: dict[str, int]) -> None:
    assert set(loaded) == set(TABLES)
    assert loaded["cs_records"] == N_RECORDS
    assert loaded["guests"] == 1_000
    conn = await _connect(cluster)
    try:
        for table, expected in loaded.items():
            assert await conn.fetchval(f"SELECT count(*) FROM public.{table}") == expected, table
        recent = await conn.fetchval("SELECT count(*) FROM cs_records WHERE created_at > now() - interval '1 hour'")
        assert recent > 0
    finally:
        await conn.close()


async def test_partitions_exist(cluster: PgCluster, loaded: dict[str, int]) -> None:
    conn = await _connect(cluster)
    try:
        names = {r["relname"] for r in await conn.fetch(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'public.cs_records'::regclass AND c.relkind = 'r'")}
        # Compare with the bounds as of now (a month boundary between load and
        # here could shift the window by one, hence the subset check on the core).
        expected = {n for n, _, _ in partition_bounds()}
        assert len(names) >= 37
        assert len(expected - names) <= 1
        month = await conn.fetchval("SELECT 'cs_records_' || to_char(now() AT TIME ZONE 'UTC', 'YYYY_MM')")
        assert month in names
        # Rows really land in the monthly partitions.
        assert await conn.fetchval(f"SELECT count(*) FROM {month}") > 0
        assert await conn.fetchval("SELECT count(*) FROM pg_indexes WHERE tablename = 'cs_records'") >= 4
    finally:
        await conn.close()


async def test_service_user_is_least_privileged(cluster: PgCluster, loaded: dict[str, int]) -> None:
    conn = await _connect(cluster, cluster.service_user)
    try:
        assert await conn.fetchval("SELECT current_user") == "pgwarden_svc"
        assert await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user") is False
        owners = {r["tableowner"] for r in await conn.fetch(
            "SELECT tableowner FROM pg_tables WHERE schemaname = 'public'")}
        assert owners == {"postgres"}
        assert await conn.fetchval("SELECT count(*) FROM cs_records") == N_RECORDS
        assert await conn.fetchval("SELECT count(*) FROM guests") == 1_000
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetch("SELECT * FROM pg_authid")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("DROP TABLE guests")
        tr = conn.transaction()
        await tr.start()
        try:
            # Its own state schema, COPY FROM STDIN into a table it may INSERT into, NOTIFY.
            await conn.execute("CREATE SCHEMA pgwarden")
            await conn.execute("CREATE TABLE pgwarden.probe (id int)")
            status = await conn.copy_records_to_table(
                "sys_params", records=[("probe.param", "1")], columns=["name", "value"])
            assert status == "COPY 1"
            await conn.execute("NOTIFY pgwarden_probe, 'x'")
            rid = await conn.fetchval(
                "INSERT INTO cs_records (guest_id, department, category, channel, agent, content) "
                "VALUES (1, 'FO', 'praise', 'chat', 'alice', '客人表扬前台。') RETURNING id")
            assert rid > N_RECORDS  # id sequences were moved past the loaded ids
            month = await conn.fetchval("SELECT 'cs_records_' || to_char(now() AT TIME ZONE 'UTC', 'YYYY_MM')")
            rid2 = await conn.fetchval(
                f"INSERT INTO {month} (guest_id, department, category, channel, agent, content) "
                "VALUES (1, 'FO', 'praise', 'chat', 'alice', '客人表扬前台。') RETURNING id")
            assert rid2 == rid + 1  # a partition written directly shares the parent's id sequence
        finally:
            await tr.rollback()
    finally:
        await conn.close()


async def test_listen_notify_as_service_user(cluster: PgCluster) -> None:
    import asyncio

    conn = await _connect(cluster, cluster.service_user)
    got: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    try:
        await conn.add_listener("pgwarden_probe", lambda *args: got.done() or got.set_result(args[3]))
        await conn.execute("NOTIFY pgwarden_probe, 'hello'")
        assert await asyncio.wait_for(got, 5) == "hello"
    finally:
        await conn.close()


async def test_default_privileges_cover_new_tables(cluster: PgCluster, loaded: dict[str, int]) -> None:
    conn = await _connect(cluster)
    try:
        async with conn.transaction():
            await conn.execute("CREATE TABLE public.later_table (id int)")
            assert await conn.fetchval("SELECT has_table_privilege('pgwarden_svc', 'public.later_table', 'SELECT')")
            assert not await conn.fetchval(
                "SELECT has_table_privilege('pgwarden_svc', 'public.later_table', 'TRUNCATE')")
            await conn.execute("DROP TABLE public.later_table")
    finally:
        await conn.close()


async def test_passwords_are_checked_over_tcp(cluster: PgCluster) -> None:
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(cluster.dsn(cluster.service_user, password="wrong"))
    conn = await asyncpg.connect(cluster.dsn(cluster.superuser, database="postgres"))
    try:
        method = await conn.fetchval(
            "SELECT auth_method FROM pg_hba_file_rules WHERE type = 'host' AND address = '127.0.0.1'")
        assert method == "scram-sha-256"
        assert await conn.fetchval("SHOW fsync") == "off"
    finally:
        await conn.close()


def test_dsn_shape(cluster: PgCluster) -> None:
    assert cluster.dsn().startswith("postgresql://postgres:")
    assert cluster.dsn().endswith(f"@127.0.0.1:{cluster.port}/hotel")
    assert cluster.dsn("x", "p@ss/w", database="postgres") == f"postgresql://x:p%40ss%2Fw@127.0.0.1:{cluster.port}/postgres"
    assert cluster.dsn("nobody_known") == f"postgresql://nobody_known@127.0.0.1:{cluster.port}/hotel"


def test_start_is_idempotent_and_stop_removes_workdir() -> None:
    c = PgCluster()
    c.start()
    try:
        workdir, port = c.workdir, c.port
        assert workdir is not None and (workdir / "data" / "PG_VERSION").exists()
        c.start()  # no-op on a running cluster
        assert c.port == port
        assert c.psql("SELECT 1", database="hotel").strip() == "1"
    finally:
        c.stop()
    assert not workdir.exists()
    c.stop()  # stopping twice is harmless


def test_kept_workdir_is_reused() -> None:
    # Not under pytest's tmp_path: another pytest session starting at the same time resets
    # /tmp/pytest-of-<user> to 0700, which the unprivileged server user then cannot traverse.
    base = Path(tempfile.mkdtemp(prefix="pgwarden-kept-"))
    workdir = base / "cluster"
    workdir.mkdir()
    first = PgCluster(workdir)
    with first:
        first.psql("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('still here');")
    assert workdir.exists()  # not created by PgCluster, so kept
    second = PgCluster(workdir)
    with second:
        assert second.service_password == first.service_password
        assert second.psql("SELECT v FROM kept").strip() == "still here"
    shutil.rmtree(base, ignore_errors=True)
