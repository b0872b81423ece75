"""Session settings (issue 11, item 5): the startup packet allows exactly what SET allows, and
names resolve with the session's real search_path, which pgwarden follows."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from proxy.demo.pgcluster import PgCluster
from rules.settings import SESSION_SETTINGS
from tests.conftest import Proxy, start_proxy
from tests.integration.test_policy_e2e import HOTEL, direct


def _superuser(cluster: PgCluster, sql: str) -> None:
    with psycopg.connect(cluster.dsn(cluster.superuser, cluster.superuser_password), autocommit=True) as c:
        c.execute(sql)


@pytest.fixture(scope="module")
def shadowed(cluster: PgCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """A schema ``shadow`` with its own sys_params (not granted to anyone), then a proxy that knows it."""
    _superuser(cluster, "CREATE SCHEMA shadow; CREATE TABLE shadow.sys_params (name text, value text); "
                        "INSERT INTO shadow.sys_params VALUES ('from shadow', 'x'); "
                        f"GRANT USAGE ON SCHEMA shadow TO {cluster.service_user}; "
                        f"GRANT SELECT ON shadow.sys_params TO {cluster.service_user}")
    p = start_proxy(cluster, str(tmp_path_factory.mktemp("settings")), rules=str(HOTEL))
    try:
        yield p
    finally:
        p.thread.stop()
        _superuser(cluster, "DROP SCHEMA shadow CASCADE")


def _first_param(p: Proxy, user: str, sql: str, **dsn: str) -> object:
    extra = "".join(f" {k}={v}" for k, v in dsn.items())
    with psycopg.connect(p.dsn(user) + extra, autocommit=True) as c:
        try:
            return c.execute(sql).fetchall()
        except psycopg.Error as e:
            return e


def _refused(got: object, needle: str = "") -> None:
    assert isinstance(got, psycopg.Error) and got.sqlstate == "42501", got
    assert needle in str(got), (needle, str(got))


def test_set_search_path_is_followed(shadowed: Proxy, cluster: PgCluster) -> None:
    public = direct(cluster, "SELECT name FROM public.sys_params ORDER BY name")
    with psycopg.connect(shadowed.dsn("carol"), autocommit=True) as c:
        assert c.execute("SELECT name FROM sys_params ORDER BY name").fetchall() == public
        c.execute("SET search_path TO shadow, public")
        assert c.execute("SHOW search_path").fetchone() == ("shadow, public",)
        with pytest.raises(psycopg.Error) as ei:  # now sys_params is shadow.sys_params, which carol may not read
            c.execute("SELECT name FROM sys_params").fetchall()
        assert ei.value.sqlstate == "42501" and "shadow.sys_params" in str(ei.value)
        c.execute("RESET search_path")
        assert c.execute("SELECT name FROM sys_params ORDER BY name").fetchall() == public


def test_set_search_path_in_the_extended_protocol_is_followed(shadowed: Proxy) -> None:
    with psycopg.connect(shadowed.dsn("carol"), autocommit=True) as c:
        c.execute("SET search_path TO shadow, public", prepare=True)
        with pytest.raises(psycopg.Error) as ei:
            c.execute("SELECT name FROM sys_params", prepare=True).fetchall()
        assert ei.value.sqlstate == "42501" and "shadow.sys_params" in str(ei.value)


def test_a_set_search_path_that_is_rolled_back_is_not_followed(shadowed: Proxy, cluster: PgCluster) -> None:
    public = direct(cluster, "SELECT name FROM public.sys_params ORDER BY name")
    with psycopg.connect(shadowed.dsn("carol"), autocommit=True) as c:
        with pytest.raises(psycopg.Error) as ei:  # one implicit transaction: the error undoes the SET
            c.execute("SET search_path TO shadow, public; SELECT 1 / 0")
        assert ei.value.sqlstate == "22012"
        assert c.execute("SHOW search_path").fetchone()[0] != "shadow, public"
        assert c.execute("SELECT name FROM sys_params ORDER BY name").fetchall() == public


def test_set_search_path_inside_a_transaction_is_refused(shadowed: Proxy) -> None:
    with psycopg.connect(shadowed.dsn("carol")) as c:  # psycopg opens a transaction
        with pytest.raises(psycopg.Error) as ei:
            c.execute("SET search_path TO shadow")
        assert ei.value.sqlstate == "42501" and "outside a transaction block" in str(ei.value)
    _refused(_first_param(shadowed, "carol", "SET LOCAL search_path TO shadow"), "SET LOCAL search_path")


def test_startup_search_path_is_followed(shadowed: Proxy) -> None:
    _refused(_first_param(shadowed, "carol", "SELECT name FROM sys_params",
                          options="'-c search_path=shadow,public'"), "shadow.sys_params")


@pytest.mark.parametrize("name,value", [("role", "postgres"), ("session_authorization", "postgres"),
                                        ("row_security", "off"), ("session_replication_role", "replica"),
                                        ("standard_conforming_strings", "off"), ("search_path", "shadow,public")])
def test_startup_allows_exactly_what_set_allows(shadowed: Proxy, name: str, value: str) -> None:
    with psycopg.connect(shadowed.dsn("alice"), autocommit=True) as c:
        try:
            c.execute(f"SET {name} TO {value}")
            by_set = None
        except psycopg.Error as e:
            by_set = e.sqlstate
    try:
        psycopg.connect(shadowed.dsn("alice") + f" options='-c {name}={value}'").close()
        at_startup = None
    except psycopg.OperationalError as e:
        at_startup = "42501" if "42501" in str(getattr(e, "sqlstate", "")) or "not allowed" in str(e) \
            or "must stay on" in str(e) else str(e)
    assert by_set == at_startup, (name, by_set, at_startup)
    assert (name in SESSION_SETTINGS and value != "off") == (by_set is None), (name, by_set)


def test_jit_is_off_for_restricted_sessions_and_cannot_be_switched_on(shadowed: Proxy) -> None:
    with psycopg.connect(shadowed.dsn("carol"), autocommit=True) as c:
        assert c.execute("SELECT current_setting('jit')").fetchone() == ("off",)
        with pytest.raises(psycopg.Error) as ei:
            c.execute("SET jit TO on")
        assert ei.value.sqlstate == "42501" and "jit may only be switched off" in str(ei.value)
        c.execute("SET jit TO off")
    _refused_login = psycopg.OperationalError
    with pytest.raises(_refused_login) as ei:
        psycopg.connect(shadowed.dsn("carol") + " options='-c jit=on'")
    assert "jit may only be switched off" in str(ei.value)
