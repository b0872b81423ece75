"""Bounded analysis (issue 11, item 4): large statements are decided off the event loop, within limits.

Speed is the benchmark's business (tests/bench: the isolation figure); here, that the path is taken,
that limits refuse with a message a person can act on, and that the proxy keeps serving meanwhile.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import psycopg
import pytest

from proxy.demo.pgcluster import PgCluster
from tests.conftest import Proxy, start_proxy
from tests.integration.test_policy_e2e import HOTEL, direct


@pytest.fixture(scope="module")
def bounded(cluster: PgCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    p = start_proxy(cluster, str(tmp_path_factory.mktemp("bounded")), rules=str(HOTEL),
                    analysis={"max_statement_bytes": 200_000, "max_tokens": 20_000, "offload_bytes": 1024,
                              "timeout": 60})
    try:
        yield p
    finally:
        p.thread.stop()


def _in_list(n: int, column: str = "category") -> str:
    return f"SELECT count(*) FROM cs_records WHERE {column} IN (" + ",".join(f"'c{i}'" for i in range(n)) + ")"


def test_a_large_statement_is_decided_in_a_worker(bounded: Proxy, cluster: PgCluster) -> None:
    pool = bounded.thread.server.analysis
    before = pool.jobs
    with psycopg.connect(bounded.dsn("bob"), autocommit=True) as c:
        got = c.execute(_in_list(2000).replace("'c0'", "'complaint'")).fetchall()
        assert c.execute("SELECT 1").fetchone() == (1,)
    want = direct(cluster, "SELECT count(*) FROM cs_records WHERE category = 'complaint' AND department = 'FO' "
                           "AND NOT legal_hold AND created_at >= statement_timestamp() - interval '72 hours'")
    assert got == want
    assert pool.jobs == before + 1
    with psycopg.connect(bounded.dsn("bob"), autocommit=True) as c:  # the decision is cached: no second job
        c.execute(_in_list(2000).replace("'c0'", "'complaint'")).fetchall()
    assert pool.jobs == before + 1


def test_other_sessions_are_served_while_a_large_statement_is_analysed(bounded: Proxy) -> None:
    done = threading.Event()
    errors: list[BaseException] = []

    def big() -> None:
        try:
            with psycopg.connect(bounded.dsn("alice"), autocommit=True) as c:
                c.execute(_in_list(9000)).fetchall()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            done.set()

    t = threading.Thread(target=big)
    t.start()
    answered = 0
    with psycopg.connect(bounded.dsn("bob"), autocommit=True) as c:
        while not done.is_set() and answered < 10_000:
            assert c.execute("SELECT 1").fetchone() == (1,)
            answered += 1
    t.join()
    assert not errors, errors
    assert answered > 1  # answered while the other analysis ran


def test_statements_over_the_limits_are_refused_with_the_limit_named(bounded: Proxy) -> None:
    with psycopg.connect(bounded.dsn("alice"), autocommit=True) as c:
        for sql, needle in ((_in_list(30_000), "analysis.max_statement_bytes"),
                            (_in_list(12_000).replace("'c", "'"), "analysis.max_tokens")):
            with pytest.raises(psycopg.Error) as ei:
                c.execute(sql).fetchall()
            assert ei.value.sqlstate == "42501" and needle in str(ei.value), str(ei.value)[:200]
        assert c.execute("SELECT 1").fetchone() == (1,)


def test_limits_do_not_apply_to_unrestricted_sessions_of_a_relay(pgwarden: Proxy) -> None:
    # Without rules nobody is restricted: a large statement passes as sent.
    with psycopg.connect(pgwarden.dsn("dave"), autocommit=True) as c:
        assert c.execute(_in_list(30_000)).fetchone() is not None
