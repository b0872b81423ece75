"""pgbench through pgwarden: many concurrent sessions, all three query protocols, writes in transactions.

The pgbench tables live in their own database (``bench``), initialised directly
on the cluster as the superuser; pgwarden's service login only gets DML on them.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator

import pytest

from proxy.demo.pgcluster import PgCluster
from tests.conftest import Proxy
from tests.integration.fix_clients import program

pytestmark = [pytest.mark.slow]

BENCH_DB = "bench"


@pytest.fixture(scope="module")
def pgbench_exe() -> str:
    """pgbench on PATH; without it: skip, or fail under CI=true."""
    return program("pgbench", install="PostgreSQL's pgbench; Debian 12: postgresql-15")


@pytest.fixture(scope="module")
def bench_db(cluster: PgCluster, pgbench_exe: str) -> Iterator[str]:
    cluster.psql(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)", database="postgres")
    cluster.psql(f"CREATE DATABASE {BENCH_DB}", database="postgres")
    env = {**os.environ, "PGPASSWORD": cluster.superuser_password}
    r = subprocess.run([pgbench_exe, "-i", "-s", "1", "-q", "-h", cluster.host, "-p", str(cluster.port),
                        "-U", cluster.superuser, BENCH_DB], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    svc = cluster.service_user
    cluster.psql(f"GRANT CONNECT ON DATABASE {BENCH_DB} TO {svc};", database="postgres")
    cluster.psql(f"GRANT USAGE ON SCHEMA public TO {svc};\n"
                 f"GRANT SELECT, UPDATE, INSERT ON pgbench_accounts, pgbench_branches, pgbench_tellers, "
                 f"pgbench_history TO {svc};", database=BENCH_DB)
    yield BENCH_DB
    cluster.psql(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)", database="postgres")


def pgbench(proxy: Proxy, db: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PGPASSWORD": "demo", "PGCONNECT_TIMEOUT": "10", "PGSSLMODE": "disable"}
    return subprocess.run(["pgbench", "-h", "127.0.0.1", "-p", str(proxy.port), "-U", "dave", *args, db],
                          env=env, capture_output=True, text=True, timeout=120)


def check_summary(r: subprocess.CompletedProcess[str], want: int) -> None:
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert f"number of transactions actually processed: {want}/{want}" in r.stdout, out
    failed = re.search(r"number of failed transactions: (\d+)", r.stdout)
    if failed is not None:  # printed by pgbench 15+
        assert failed.group(1) == "0", out
    assert "error" not in r.stderr.lower(), r.stderr


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench_select_only(proxy: Proxy, bench_db: str, mode: str) -> None:
    r = pgbench(proxy, bench_db, "-n", "-S", "-M", mode, "-c", "4", "-j", "2", "-t", "500")
    check_summary(r, 2000)
    events = proxy.take_events()
    selects = [e for e in events if e["statement"].startswith("SELECT abalance FROM pgbench_accounts")]
    assert len(selects) == 2000
    assert all(e["outcome"] == "ok" and e["rows"] == 1 and e["user"] == "dave" for e in selects)
    if mode == "simple":
        assert all(re.fullmatch(r"SELECT abalance FROM pgbench_accounts WHERE aid = \d+", e["statement"])
                   for e in selects)
    else:  # parameters stay parameters in the audit log
        # (the statement text exactly as pgbench sent it in Parse, trailing semicolon included)
        assert {e["statement"] for e in selects} == {"SELECT abalance FROM pgbench_accounts WHERE aid = $1;"}


def test_pgbench_tpcb_like_writes(proxy: Proxy, cluster: PgCluster, bench_db: str) -> None:
    before = int(cluster.psql("SELECT count(*) FROM pgbench_history", database=bench_db).strip())
    r = pgbench(proxy, bench_db, "-n", "-M", "extended", "-c", "2", "-j", "2", "-t", "200")
    check_summary(r, 400)
    after = int(cluster.psql("SELECT count(*) FROM pgbench_history", database=bench_db).strip())
    assert after - before == 400
    # The balances moved consistently: every delta went to an account, its teller and its branch.
    sums = cluster.psql("SELECT (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(tbalance) FROM "
                        "pgbench_tellers), (SELECT sum(bbalance) FROM pgbench_branches), "
                        "(SELECT sum(delta) FROM pgbench_history)", database=bench_db).strip().split("|")
    assert len(set(sums)) == 1, sums
    events = proxy.take_events()
    # pgbench's own two setup queries (scale and partitioning of pgbench_accounts), then the script.
    setup = [e for e in events if e["statement"].startswith(("select count(*) from pgbench_branches",
                                                              "select o.n, p.partstrat"))]
    assert len(setup) == 2
    events = [e for e in events if e not in setup]
    by_type: dict[str, int] = {}
    for e in events:
        assert e["outcome"] == "ok", e
        by_type[e["statement_type"]] = by_type.get(e["statement_type"], 0) + 1
    assert by_type == {"BEGIN": 400, "UPDATE": 1200, "SELECT": 400, "INSERT": 400, "COMMIT": 400}


@pytest.fixture(scope="module")
def tls_proxy(cluster: PgCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    from tests.conftest import start_proxy
    from tests.integration.fix_tls import make_self_signed

    d = str(tmp_path_factory.mktemp("bench-tls"))
    cert, key = make_self_signed(d)
    p = start_proxy(cluster, d, tls={"cert": cert, "key": key})
    try:
        yield p
    finally:
        p.thread.stop()


def test_pgbench_prepared_over_tls(tls_proxy: Proxy, bench_db: str) -> None:
    tls_proxy.take_events(None)
    env = {**os.environ, "PGPASSWORD": "demo", "PGCONNECT_TIMEOUT": "10", "PGSSLMODE": "require"}
    from tests.integration.fix_tls import client_with_tls

    r = subprocess.run([client_with_tls("pgbench"), "-h", "127.0.0.1", "-p", str(tls_proxy.port), "-U", "dave", "-n", "-S",
                        "-M", "prepared", "-c", "4", "-j", "2", "-t", "250", bench_db],
                       env=env, capture_output=True, text=True, timeout=120)
    check_summary(r, 1000)
    logins = tls_proxy.take_events("login")
    assert len(logins) == 5 and all(e["tls"] is True for e in logins)  # 4 clients + pgbench's setup connection
