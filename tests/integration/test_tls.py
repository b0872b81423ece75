"""TLS between clients and pgwarden, and the login methods that depend on it (cleartext, trust).

Whether the *upstream* link is encrypted is a different question (``ssl_is_used()``
on the server answers that one); these tests look at the client's side of
pgwarden: libpq's ``ssl_in_use``, psql's ``\\conninfo``, and the audit log's
``tls`` field on the login event.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import asyncpg
import psycopg
import pytest

from proxy.verifiers import make_md5, make_scram_verifier
from proxy.demo.pgcluster import PgCluster
from proxy.wire import codec
from proxy.wire.codes import B
from tests.conftest import Proxy, start_proxy
from tests.integration.fix_tls import client_with_tls, make_self_signed
from tests.integration.fix_wire import authenticate, data_rows, errors, open_raw, simple_query, wait_events

CLEAR_PW = "cleartext-pw"


@dataclass
class TlsSetup:
    proxy: Proxy
    cert: str
    key: str


def _users() -> dict[str, dict]:
    """A complete ``users`` section: one user per login method."""
    return {
        "dave": {"role": "general_manager", "password": make_scram_verifier("demo"), "method": "scram-sha-256"},
        "pms": {"role": "pms_integration", "department": "FO", "md5": make_md5("demo", "pms"), "method": "md5"},
        # Cleartext password exchange: allowed only over TLS.
        "tina": {"role": "front_desk", "department": "FO", "password": make_scram_verifier(CLEAR_PW),
                 "method": "password"},
    }


@pytest.fixture(scope="module")
def tls(cluster: PgCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsSetup]:
    d = str(tmp_path_factory.mktemp("tls"))
    cert, key = make_self_signed(d)
    p = start_proxy(cluster, d, tls={"cert": cert, "key": key}, users=_users())
    try:
        yield TlsSetup(p, cert, key)
    finally:
        p.thread.stop()


@pytest.fixture()
def tp(tls: TlsSetup) -> Proxy:
    tls.proxy.take_events(None)
    return tls.proxy


def no_verify_ctx() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def session_count(proxy: Proxy) -> int:
    return proxy.thread.call(lambda: len(proxy.thread.server.sessions))


def wait_sessions(proxy: Proxy, n: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while session_count(proxy) != n:
        assert time.monotonic() < deadline, f"pgwarden still holds {session_count(proxy)} sessions, expected {n}"
        time.sleep(0.02)


# --- TLS on and off -----------------------------------------------------------------------------


def test_sslmode_require_uses_tls(tp: Proxy) -> None:
    with psycopg.connect(tp.dsn("dave", sslmode="require")) as c:
        assert c.info.pgconn.ssl_in_use is True
        assert c.execute("SELECT current_user").fetchone() == ("pgwarden_svc",)
    logins = wait_events(tp, "login", 1)
    assert [(e["user"], e["tls"], e["auth_method"]) for e in logins] == [("dave", True, "scram-sha-256")]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_sslmode_verify_full_with_self_signed_root(tls: TlsSetup, tp: Proxy, host: str) -> None:
    dsn = (f"host={host} port={tp.port} dbname=hotel user=dave password=demo "
           f"sslmode=verify-full sslrootcert={tls.cert}")
    with psycopg.connect(dsn) as c:
        assert c.info.pgconn.ssl_in_use is True
        assert c.execute("SELECT 1").fetchone() == (1,)


def test_sslmode_disable_still_works_for_scram(tp: Proxy) -> None:
    with psycopg.connect(tp.dsn("dave", sslmode="disable")) as c:
        assert c.info.pgconn.ssl_in_use is False
        assert c.execute("SELECT 1").fetchone() == (1,)
    logins = wait_events(tp, "login", 1)
    assert [(e["user"], e["tls"], e["auth_method"]) for e in logins] == [("dave", False, "scram-sha-256")]


def test_md5_user_over_tls(tp: Proxy) -> None:
    with psycopg.connect(tp.dsn("pms", sslmode="require")) as c:
        assert c.info.pgconn.ssl_in_use is True
        assert c.execute("SELECT 1").fetchone() == (1,)
    assert [(e["user"], e["tls"], e["auth_method"]) for e in wait_events(tp, "login", 1)] == [("pms", True, "md5")]


def test_psql_over_tls(tp: Proxy) -> None:
    env = {**os.environ, "PGPASSWORD": "demo", "PGCONNECT_TIMEOUT": "10"}
    psql = client_with_tls("psql")
    r = subprocess.run([psql, "-X", "-A", "-t", f"host=127.0.0.1 port={tp.port} dbname=hotel user=dave "
                        "sslmode=require", "-c", "SELECT 'over tls'", "-c", r"\conninfo"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[0] == "over tls"
    assert "SSL connection (protocol: TLSv1." in r.stdout
    assert [e["tls"] for e in wait_events(tp, "login", 1)] == [True]


def test_require_against_proxy_without_tls(proxy: Proxy) -> None:
    with pytest.raises(psycopg.OperationalError, match="server does not support SSL"):
        psycopg.connect(proxy.dsn("dave", sslmode="require"))


# --- the cleartext password method ------------------------------------------------------------


def test_cleartext_user_over_tls(tp: Proxy) -> None:
    with psycopg.connect(tp.dsn("tina", CLEAR_PW, sslmode="require")) as c:
        assert c.info.pgconn.ssl_in_use is True
        assert c.execute("SELECT 1").fetchone() == (1,)
    assert [(e["user"], e["tls"], e["auth_method"]) for e in wait_events(tp, "login", 1)] == [
        ("tina", True, "password")]


async def test_cleartext_user_wrong_password_over_tls(tp: Proxy) -> None:
    with pytest.raises(asyncpg.InvalidPasswordError) as ei:
        await asyncpg.connect(host="127.0.0.1", port=tp.port, user="tina", password="wrong", database="hotel",
                              ssl=no_verify_ctx())
    assert ei.value.sqlstate == "28P01"
    assert 'password authentication failed for user "tina"' in str(ei.value)
    failed = wait_events(tp, "login_failed", 1)
    assert [(e["user"], e["sqlstate"], e["tls"]) for e in failed] == [("tina", "28P01", True)]


async def test_cleartext_user_over_plain_tcp_refused(tp: Proxy) -> None:
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError) as ei:
        await asyncpg.connect(host="127.0.0.1", port=tp.port, user="tina", password=CLEAR_PW, database="hotel",
                              ssl=False)
    assert ei.value.sqlstate == "28000"
    assert "only over TLS" in str(ei.value)
    failed = wait_events(tp, "login_failed", 1)
    assert [(e["user"], e["sqlstate"], e["tls"]) for e in failed] == [("tina", "28000", False)]


async def test_cleartext_refused_before_password_is_asked(tp: Proxy) -> None:
    # Over plain TCP the proxy must not even ask for the password (it would travel in clear).
    conn = await open_raw(tp.port)
    conn.send(codec.startup_message({"user": "tina", "database": "hotel"}))
    msgs = await conn.read_to_eof(timeout=5)
    assert [t for t, _ in msgs] == [B.ERROR_RESPONSE]
    (err,) = errors(msgs)
    assert (err.sqlstate, err.severity) == ("28000", "FATAL")
    assert "sslmode=require" in err.message
    await conn.close()


def test_cleartext_user_psycopg_plain_refused(tp: Proxy) -> None:
    with pytest.raises(psycopg.OperationalError, match="only over TLS"):
        psycopg.connect(tp.dsn("tina", CLEAR_PW, sslmode="disable"))


# --- hostile TLS negotiation ------------------------------------------------------------------


async def test_second_sslrequest_inside_tls_refused(tp: Proxy) -> None:
    conn = await open_raw(tp.port)
    conn.send(codec.ssl_request())
    assert await conn.read_byte() == b"S"
    await conn.writer.start_tls(no_verify_ctx())
    conn.send(codec.ssl_request())
    msgs = await conn.read_to_eof(timeout=5)
    (err,) = errors(msgs)
    assert [t for t, _ in msgs] == [B.ERROR_RESPONSE]
    assert (err.sqlstate, err.severity) == ("08P01", "FATAL")
    await conn.close()


async def test_garbage_instead_of_tls_handshake(tp: Proxy) -> None:
    conn = await open_raw(tp.port)
    conn.send(codec.ssl_request())
    assert await conn.read_byte() == b"S"
    conn.send(codec.startup_message({"user": "dave", "database": "hotel"}) + b"\x00" * 64)
    # Whatever comes back (a TLS alert at most), the connection is closed promptly.
    rest = await asyncio.wait_for(conn.reader.read(), 5)
    assert len(rest) < 100
    await conn.close()
    wait_sessions(tp, 0)
    with psycopg.connect(tp.dsn("dave", sslmode="require")) as c:
        assert c.execute("SELECT 1").fetchone() == (1,)


async def test_failed_tls_handshake_is_handled(cluster: PgCluster, tmp_path) -> None:
    cert, key = make_self_signed(str(tmp_path))
    p = start_proxy(cluster, str(tmp_path), tls={"cert": cert, "key": key})
    unhandled: list[dict] = []
    try:
        p.thread.call(p.thread.loop.set_exception_handler, lambda _loop, ctx: unhandled.append(ctx))
        conn = await open_raw(p.port)
        conn.send(codec.ssl_request())
        assert await conn.read_byte() == b"S"
        conn.send(codec.startup_message({"user": "dave", "database": "hotel"}))  # plaintext, not a ClientHello
        await asyncio.wait_for(conn.reader.read(), 5)
        await conn.close()
        wait_sessions(p, 0)
        import gc

        gc.collect()  # "Task exception was never retrieved" is reported when the task is collected
        await asyncio.sleep(0.1)
        p.thread.call(gc.collect)
        assert [str(c.get("exception") or c.get("message")) for c in unhandled] == []
        failed = wait_events(p, "login_failed", 1)
        assert [(e["sqlstate"], e["tls"]) for e in failed] == [("08P01", False)]
    finally:
        p.thread.stop()


async def test_client_vanishes_during_tls_handshake(tp: Proxy) -> None:
    conn = await open_raw(tp.port)
    conn.send(codec.ssl_request())
    assert await conn.read_byte() == b"S"
    conn.writer.transport.abort()
    await asyncio.sleep(0.1)
    wait_sessions(tp, 0)


# --- trust networks ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trusted(cluster: PgCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    p = start_proxy(cluster, str(tmp_path_factory.mktemp("trusted")), auth={"trust": ["127.0.0.1/32"]})
    try:
        yield p
    finally:
        p.thread.stop()


def test_trust_network_needs_no_password(trusted: Proxy) -> None:
    trusted.take_events(None)
    with psycopg.connect(f"host=127.0.0.1 port={trusted.port} dbname=hotel user=dave sslmode=disable") as c:
        assert c.execute("SELECT 1").fetchone() == (1,)
    logins = wait_events(trusted, "login", 1)
    assert [(e["user"], e["auth_method"], e["tls"]) for e in logins] == [("dave", "trust", False)]


async def test_trust_network_raw_login_has_no_auth_exchange(trusted: Proxy) -> None:
    conn = await open_raw(trusted.port)
    conn.send(codec.startup_message({"user": "dave", "database": "hotel"}))
    seen = await authenticate(conn, "dave", "")
    auths = [p for t, p in seen if t == B.AUTHENTICATION]
    assert auths == [b"\x00\x00\x00\x00"]  # AuthenticationOk straight away
    assert data_rows(await simple_query(conn, "SELECT 1")) == [[b"1"]]
    await conn.close()


async def test_trust_network_unknown_user_refused(trusted: Proxy) -> None:
    with pytest.raises(asyncpg.InvalidPasswordError) as ei:
        await asyncpg.connect(host="127.0.0.1", port=trusted.port, user="mallory", database="hotel", ssl=False)
    assert ei.value.sqlstate == "28P01"


async def test_without_trust_wrong_password_refused(proxy: Proxy) -> None:
    with pytest.raises(asyncpg.InvalidPasswordError) as ei:
        await asyncpg.connect(host="127.0.0.1", port=proxy.port, user="dave", password="wrong", database="hotel",
                              ssl=False)
    assert ei.value.sqlstate == "28P01"
    assert 'password authentication failed for user "dave"' in str(ei.value)
    failed = wait_events(proxy, "login_failed", 1)
    assert [(e["user"], e["sqlstate"]) for e in failed] == [("dave", "28P01")]
