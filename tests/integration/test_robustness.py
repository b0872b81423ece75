"""Hostile and unlucky clients: bad framing, odd startup packets, vanishing peers, huge results, limits.

Everything a PostgreSQL server shrugs off, pgwarden must shrug off too: answer
a protocol violation with SQLSTATE 08P01 and a closed connection, never crash,
never buffer what a peer merely *claims* it will send, and clean up (cancel the
server's work, write the audit event) when either side goes away.
"""

from __future__ import annotations

import asyncio
import os
import struct
import subprocess
import time
from collections.abc import Iterator

import psycopg
import pytest

from proxy.demo.pgcluster import PgCluster
from proxy.wire import codec
from proxy.wire.codes import PROTOCOL_3_0, B
from tests.conftest import Proxy, start_proxy
from tests.integration.fix_tls import make_self_signed
from tests.integration.fix_wire import (
    RawConn,
    auth_code,
    authenticate,
    data_rows,
    errors,
    gssenc_request,
    login,
    open_raw,
    simple_query,
    wait_events,
)

FAST = 5.0  # seconds within which a hostile connection must be answered and closed


def rss_bytes() -> int:
    """Resident set size of this process (pgwarden runs in-process, on its own thread)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def session_count(proxy: Proxy) -> int:
    return proxy.thread.call(lambda: len(proxy.thread.server.sessions))


def wait_sessions(proxy: Proxy, n: int, timeout: float = FAST) -> None:
    deadline = time.monotonic() + timeout
    while session_count(proxy) != n:
        assert time.monotonic() < deadline, f"pgwarden still holds {session_count(proxy)} sessions, expected {n}"
        time.sleep(0.02)


def still_serves(proxy: Proxy, **params: str) -> None:
    """A normal client still gets in and runs a query: the bad connection took nothing down."""
    with psycopg.connect(proxy.dsn("dave", **params), connect_timeout=10) as c:
        assert c.execute("SELECT 40 + 2").fetchone() == (42,)


def assert_fatal(msgs: list[tuple[int, bytes]], sqlstate: str, needle: str = "") -> None:
    """The only thing that came back is one FATAL ErrorResponse with ``sqlstate`` (the caller saw EOF)."""
    errs = errors(msgs)
    assert [t for t, _ in msgs] == [B.ERROR_RESPONSE], f"expected one ErrorResponse, got {msgs!r}"
    assert errs[0].sqlstate == sqlstate, errs[0].fields
    assert errs[0].severity == "FATAL", errs[0].fields
    assert needle in errs[0].message, errs[0].message


async def until_eof(conn: RawConn) -> list[tuple[int, bytes]]:
    start = time.monotonic()
    msgs = await conn.read_to_eof(timeout=FAST)
    assert conn.eof and time.monotonic() - start < FAST
    return msgs


@pytest.fixture(scope="module")
def trust_proxy(cluster: PgCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    p = start_proxy(cluster, str(tmp_path_factory.mktemp("trust")), auth={"trust": ["127.0.0.1/32"]})
    try:
        yield p
    finally:
        p.thread.stop()


# --- hostile framing after login ----------------------------------------------------------------

HOSTILE_AFTER_LOGIN = {
    "length_3": [b"Q" + (3).to_bytes(4, "big")],
    "length_negative": [b"Q" + (-1).to_bytes(4, "big", signed=True)],
    "length_2gb": [b"Q" + (2**31 - 1).to_bytes(4, "big")],
    # The header split across two writes (the reader must check it once it is whole).
    "length_2gb_split_header": [b"Q\x7f", b"\xff\xff\xff"],
    # A good statement, then in the same write a header claiming 2 GB.
    "length_2gb_after_good_query": [codec.query_message("SELECT 1") + b"P" + (2**31 - 1).to_bytes(4, "big")],
    "unknown_type": [b"z" + (4).to_bytes(4, "big")],
    "unknown_type_with_payload": [b"\x01" + (9).to_bytes(4, "big") + b"hello"],
}


@pytest.mark.parametrize("case", list(HOSTILE_AFTER_LOGIN))
async def test_hostile_framing_after_scram_login(proxy: Proxy, case: str) -> None:
    conn = await login(proxy.port, "dave", "demo")
    proxy.take_events(None)
    rss0 = rss_bytes()
    for chunk in HOSTILE_AFTER_LOGIN[case]:
        conn.send(chunk)
        await conn.writer.drain()
        await asyncio.sleep(0.05)
    msgs = await until_eof(conn)
    assert rss_bytes() - rss0 < 32 * 1024 * 1024  # nothing was allocated for the claimed length
    if case == "length_2gb_after_good_query":
        # The statement before the bad header may or may not have been answered: only its error is checked.
        msgs = [m for m in msgs if m[0] == B.ERROR_RESPONSE]
    assert_fatal(msgs, "08P01")
    await conn.close()
    events = wait_events(proxy, "protocol_error", 1)
    assert [(e["user"], e["sqlstate"]) for e in events] == [("dave", "08P01")]
    wait_sessions(proxy, 0)  # every connection of this test (and earlier ones) is gone
    still_serves(proxy)


async def test_hostile_framing_on_trusted_proxy(trust_proxy: Proxy) -> None:
    conn = await login(trust_proxy.port, "dave", "")
    conn.send(b"Q" + (2**31 - 1).to_bytes(4, "big"))
    assert_fatal(await until_eof(conn), "08P01", "invalid message length")
    await conn.close()
    still_serves(trust_proxy)


async def test_message_over_configured_limit(cluster: PgCluster, tmp_path) -> None:
    p = start_proxy(cluster, str(tmp_path), limits={"max_message_size": 1024})
    try:
        conn = await login(p.port)
        ok = await simple_query(conn, "SELECT '" + "x" * 900 + "'")
        assert data_rows(ok) == [[b"x" * 900]]
        conn.send(codec.query_message("SELECT '" + "x" * 2000 + "'"))
        assert_fatal(await until_eof(conn), "08P01", "invalid message length")
        await conn.close()
        still_serves(p)
    finally:
        p.thread.stop()


async def test_hostile_messages_during_authentication(proxy: Proxy) -> None:
    # A 2 GB "password" message while the proxy waits for the SCRAM response.
    conn = await open_raw(proxy.port)
    conn.send(codec.startup_message({"user": "dave", "database": "hotel"}))
    t, payload = await conn.recv()
    assert t == B.AUTHENTICATION and auth_code(payload) == 10
    conn.send(b"p" + (2**31 - 1).to_bytes(4, "big"))
    assert_fatal(await until_eof(conn), "08P01")
    await conn.close()
    # A Query instead of the password.
    conn = await open_raw(proxy.port)
    conn.send(codec.startup_message({"user": "dave", "database": "hotel"}))
    t, payload = await conn.recv()
    assert t == B.AUTHENTICATION and auth_code(payload) == 10
    conn.send(codec.query_message("SELECT 1"))
    assert_fatal(await until_eof(conn), "08P01", "expected a password response")
    await conn.close()
    still_serves(proxy)


async def test_query_pipelined_with_startup(trust_proxy: Proxy) -> None:
    # With trust there is no password round trip, so a client may send its first Query with the startup.
    conn = await open_raw(trust_proxy.port)
    conn.send(codec.startup_message({"user": "dave", "database": "hotel"}) + codec.query_message("SELECT 'early'"))
    await authenticate(conn, "dave", "")
    msgs = await conn.recv_until(B.READY_FOR_QUERY)
    assert data_rows(msgs) == [[b"early"]]
    await conn.close()


async def test_hostile_frame_pipelined_with_startup(trust_proxy: Proxy) -> None:
    conn = await open_raw(trust_proxy.port)
    conn.send(codec.startup_message({"user": "dave", "database": "hotel"}) + b"Q" + (2**31 - 1).to_bytes(4, "big"))
    msgs = await until_eof(conn)
    # Whatever part of the login happened first, it ends with one FATAL 08P01 and a closed connection.
    errs = errors(msgs)
    assert [(e.sqlstate, e.severity) for e in errs] == [("08P01", "FATAL")]
    assert msgs[-1][0] == B.ERROR_RESPONSE
    await conn.close()
    still_serves(trust_proxy)


# --- garbage before startup ---------------------------------------------------------------------

GARBAGE_BEFORE_STARTUP = {
    "startup_length_5": (5).to_bytes(4, "big") + b"\x00",
    "startup_length_1mb": (2**20).to_bytes(4, "big") + struct.pack("!i", PROTOCOL_3_0),
    "startup_length_2gb": (2**31 - 1).to_bytes(4, "big"),
    "startup_length_negative": (-8).to_bytes(4, "big", signed=True) + b"\x00" * 4,
    "http_request": b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "protocol_2": struct.pack("!ii", 8, 2 << 16),
    "startup_not_nul_terminated": struct.pack("!ii", 17, PROTOCOL_3_0) + b"user\x00dave",
}


@pytest.mark.parametrize("case", list(GARBAGE_BEFORE_STARTUP))
async def test_garbage_before_startup(proxy: Proxy, case: str) -> None:
    conn = await open_raw(proxy.port)
    conn.send(GARBAGE_BEFORE_STARTUP[case])
    # Like PostgreSQL: an unsupported protocol version is feature_not_supported, the rest protocol_violation.
    state = "0A000" if case == "protocol_2" else "08P01"
    assert_fatal(await until_eof(conn), state)
    await conn.close()
    failed = wait_events(proxy, "login_failed", 1)
    assert [e["sqlstate"] for e in failed] == [state]
    wait_sessions(proxy, 0)  # every connection of this test (and earlier ones) is gone
    still_serves(proxy)


async def test_oversized_startup_stream_without_length_violation(proxy: Proxy) -> None:
    # A plausible length (9,000) and then 200 KB of bytes: the startup reader must not keep them.
    conn = await open_raw(proxy.port)
    conn.send(struct.pack("!ii", 9000, PROTOCOL_3_0) + b"a" * 200_000)
    msgs = await until_eof(conn)
    assert_fatal(msgs, "08P01")
    await conn.close()
    still_serves(proxy)


# --- SSL / GSS / protocol negotiation ----------------------------------------------------------


@pytest.fixture(scope="module")
def tls_proxy(cluster: PgCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    d = str(tmp_path_factory.mktemp("tls"))
    cert, key = make_self_signed(d)
    p = start_proxy(cluster, d, tls={"cert": cert, "key": key})
    try:
        yield p
    finally:
        p.thread.stop()


async def test_plaintext_after_sslrequest_is_refused(tls_proxy: Proxy) -> None:
    # CVE-2021-23214 style: bytes sent with the SSLRequest could come from a man in the middle.
    conn = await open_raw(tls_proxy.port)
    conn.send(codec.ssl_request() + codec.startup_message({"user": "dave", "database": "hotel"}))
    first = await conn.read_byte()
    assert first == b"E", f"expected an ErrorResponse, not {first!r} (b'S' would start a TLS handshake)"
    rest = await asyncio.wait_for(conn.reader.read(), FAST)  # everything up to EOF
    msgs = codec.MessageReader().feed(first + rest)
    assert_fatal(msgs, "08P01", "unencrypted data after SSL request")
    failed = wait_events(tls_proxy, "login_failed", 1)
    assert [e["sqlstate"] for e in failed] == ["08P01"]
    assert tls_proxy.take_events("login") == []
    await conn.close()
    still_serves(tls_proxy, sslmode="require")


async def test_sslrequest_on_plain_proxy_answered_n(proxy: Proxy) -> None:
    conn = await open_raw(proxy.port)
    conn.send(codec.ssl_request())
    assert await conn.read_byte() == b"N"
    conn.send(codec.startup_message({"user": "dave", "database": "hotel"}))
    await authenticate(conn, "dave", "demo")
    assert data_rows(await simple_query(conn, "SELECT 7")) == [[b"7"]]
    await conn.close()


async def test_gssencrequest_answered_n_then_startup_continues(proxy: Proxy) -> None:
    conn = await open_raw(proxy.port)
    conn.send(gssenc_request())
    assert await conn.read_byte() == b"N"
    conn.send(codec.startup_message({"user": "dave", "database": "hotel"}))
    await authenticate(conn, "dave", "demo")
    assert data_rows(await simple_query(conn, "SELECT current_database()")) == [[b"hotel"]]
    await conn.close()
    login_ev = wait_events(proxy, "login", 1)
    assert [(e["user"], e["tls"]) for e in login_ev] == [("dave", False)]


async def test_gssenc_then_ssl_on_tls_proxy(tls_proxy: Proxy) -> None:
    # libpq's gssencmode=prefer order: GSSENCRequest ('N'), then SSLRequest ('S'), then TLS.
    tls_proxy.take_events(None)
    conn = await open_raw(tls_proxy.port)
    conn.send(gssenc_request())
    assert await conn.read_byte() == b"N"
    conn.send(codec.ssl_request())
    assert await conn.read_byte() == b"S"
    import ssl

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    await conn.writer.start_tls(ctx)
    conn.send(codec.startup_message({"user": "dave", "database": "hotel"}))
    await authenticate(conn, "dave", "demo")
    assert data_rows(await simple_query(conn, "SELECT 1")) == [[b"1"]]
    await conn.close()
    assert [e["tls"] for e in wait_events(tls_proxy, "login", 1)] == [True]


@pytest.mark.parametrize("version,params,expect_v", [
    ((3 << 16) | 2, {"_pq_.test_option": "on"}, (0, ["_pq_.test_option"])),
    ((3 << 16) | 2, {}, (0, [])),
    (PROTOCOL_3_0, {"_pq_.a": "1", "_pq_.b": "2"}, (0, ["_pq_.a", "_pq_.b"])),
    (PROTOCOL_3_0, {}, None),
], ids=["3.2+option", "3.2", "3.0+options", "3.0"])
async def test_negotiate_protocol_version(proxy: Proxy, version: int, params: dict[str, str],
                                          expect_v: tuple[int, list[str]] | None) -> None:
    conn = await open_raw(proxy.port)
    conn.send(codec.startup_message({"user": "dave", "database": "hotel", **params}, version))
    seen = await authenticate(conn, "dave", "demo")
    nego = [p for t, p in seen if t == B.NEGOTIATE_PROTOCOL_VERSION]
    if expect_v is None:
        assert nego == []
    else:
        assert len(nego) == 1, seen
        newest, count = struct.unpack_from("!ii", nego[0], 0)
        names = [n.decode() for n in nego[0][8:].split(b"\x00")[:count]]
        assert (newest, names) == expect_v
        assert nego[0][8:] == b"".join(n.encode() + b"\x00" for n in expect_v[1])
        # It comes before authentication, as PostgreSQL sends it.
        assert seen[0][0] == B.NEGOTIATE_PROTOCOL_VERSION
        assert seen[1][0] == B.AUTHENTICATION
    # Protocol 3.0 behaviour afterwards: a 4-byte cancel secret.
    key = [p for t, p in seen if t == B.BACKEND_KEY_DATA]
    assert len(key) == 1 and len(key[0]) == 8
    assert data_rows(await simple_query(conn, "SELECT 'ok'")) == [[b"ok"]]
    await conn.close()


# --- peers that go away -------------------------------------------------------------------------


def _backend_alive(cluster: PgCluster, pid: int) -> bool:
    return cluster.psql(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}", "postgres").strip() == "1"


def _active_sleeps(cluster: PgCluster) -> int:
    return int(cluster.psql("SELECT count(*) FROM pg_stat_activity "
                            "WHERE lower(query) = 'select pg_sleep(20)' AND state = 'active'", "postgres").strip())


async def test_client_disconnect_mid_query_cancels_upstream(proxy: Proxy, cluster: PgCluster) -> None:
    conn = await login(proxy.port)
    pid = conn.backend_pid
    proxy.take_events(None)
    conn.send(codec.query_message("SELECT pg_sleep(20)"))
    await conn.writer.drain()
    deadline = time.monotonic() + FAST
    while _active_sleeps(cluster) == 0:
        assert time.monotonic() < deadline, "the query never started upstream"
        await asyncio.sleep(0.05)
    start = time.monotonic()
    conn.writer.transport.abort()  # vanish: no Terminate, the socket just closes
    while _active_sleeps(cluster) or _backend_alive(cluster, pid):
        assert time.monotonic() - start < FAST, "the upstream backend still runs pg_sleep(20) for nobody"
        await asyncio.sleep(0.05)
    deadline = time.monotonic() + FAST
    events: list[dict] = []
    while not any(e.get("event") == "disconnect" for e in events):
        assert time.monotonic() < deadline, events
        await asyncio.sleep(0.05)
        events += proxy.take_events(None)
    stmts = [e for e in events if e["event"] == "statement"]
    assert [(e["statement"], e["outcome"], e["user"]) for e in stmts] == [
        ("SELECT pg_sleep(20)", "client_disconnected", "dave")]
    assert stmts[0]["duration_ms"] < 20_000
    still_serves(proxy)


async def test_client_disconnect_mid_extended_query(proxy: Proxy, cluster: PgCluster) -> None:
    conn = await login(proxy.port)
    pid = conn.backend_pid
    proxy.take_events(None)
    conn.send(codec.message(ord("P"), b"\x00SELECT pg_sleep(20)\x00\x00\x00")
              + codec.message(ord("B"), b"\x00\x00\x00\x00\x00\x00\x00\x00")
              + codec.message(ord("E"), b"\x00\x00\x00\x00\x00")
              + codec.message(ord("S")))
    await conn.writer.drain()
    deadline = time.monotonic() + FAST
    while _active_sleeps(cluster) == 0:
        assert time.monotonic() < deadline, "the query never started upstream"
        await asyncio.sleep(0.05)
    conn.writer.transport.abort()
    start = time.monotonic()
    while _backend_alive(cluster, pid):
        assert time.monotonic() - start < FAST, "the upstream backend outlived its client"
        await asyncio.sleep(0.05)
    stmts = wait_events(proxy, "statement", 1)
    assert [(e["statement"], e["outcome"]) for e in stmts] == [("SELECT pg_sleep(20)", "client_disconnected")]


def test_upstream_backend_killed(proxy: Proxy, cluster: PgCluster) -> None:
    conn = psycopg.connect(proxy.dsn("dave"), autocommit=True)
    try:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        assert conn.info.backend_pid == pid  # pgwarden hands out the real upstream pid
        proxy.take_events(None)
        assert cluster.psql(f"SELECT pg_terminate_backend({pid})", "postgres").strip() == "t"
        deadline = time.monotonic() + FAST
        while _backend_alive(cluster, pid):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.2)
        with pytest.raises(psycopg.OperationalError) as ei:
            conn.execute("SELECT 1")
        msg = str(ei.value)
        assert ("terminating connection due to administrator command" in msg
                or "connection to the database server was lost" in msg), msg
        assert conn.broken
    finally:
        conn.close()
    events = wait_events(proxy, None, 2)
    errs = [e for e in events if e["event"] == "error"]
    assert [(e["user"], e["sqlstate"]) for e in errs] == [("dave", "57P01")]
    assert [e["event"] for e in events if e["event"] == "disconnect"] == ["disconnect"]
    still_serves(proxy)


async def test_upstream_killed_mid_query(proxy: Proxy, cluster: PgCluster) -> None:
    conn = await login(proxy.port)
    pid = conn.backend_pid
    proxy.take_events(None)
    conn.send(codec.query_message("SELECT pg_sleep(20)"))
    await conn.writer.drain()
    deadline = time.monotonic() + FAST
    while _active_sleeps(cluster) == 0:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert cluster.psql(f"SELECT pg_terminate_backend({pid})", "postgres").strip() == "t"
    msgs = await until_eof(conn)
    errs = errors(msgs)
    assert [(e.sqlstate, e.severity) for e in errs] == [("57P01", "FATAL")]
    await conn.close()
    stmts = wait_events(proxy, "statement", 1)
    assert [(e["statement"], e["outcome"], e.get("sqlstate")) for e in stmts] == [
        ("SELECT pg_sleep(20)", "error", "57P01")]
    still_serves(proxy)


# --- big results --------------------------------------------------------------------------------

MILLION_SQL = "SELECT g, repeat('x', 100) FROM generate_series(1, 1000000) g"
MILLION_SUM = 1_000_000 * 1_000_001 // 2


async def stream_slowly(conn: RawConn, sql: str) -> tuple[int, int, int, int, int]:
    """Run ``sql`` (rows of (int, 100 x's)) reading like a slow client.

    Returns (rows, sum of the first column, rows whose second column is not 100 bytes, bytes received,
    peak RSS growth of this process while streaming).
    """
    framer = codec.MessageReader()
    rss0 = rss_bytes()
    peak = rss0
    conn.send(codec.query_message(sql))
    await conn.writer.drain()
    rows = total = wire_bytes = bad = 0
    done = False
    next_pause = 1
    unpack = struct.unpack_from
    while not done:
        data = await asyncio.wait_for(conn.reader.read(65536), 30)
        assert data, "connection closed mid-result"
        wire_bytes += len(data)
        for t, p in framer.feed(data):
            if t == 0x44:  # DataRow
                ln = unpack("!i", p, 2)[0]
                total += int(p[6:6 + ln])
                if unpack("!i", p, 6 + ln)[0] != 100:
                    bad += 1
                rows += 1
            elif t == B.ERROR_RESPONSE:
                raise AssertionError(codec.decode_error(p).fields)
            elif t == B.READY_FOR_QUERY:
                done = True
        if wire_bytes >= next_pause:
            # A slow client (a long stall first, while the server could send the whole result, then
            # regular pauses): pgwarden must stop reading the server, not buffer the result.
            await asyncio.sleep(1.5 if next_pause == 1 else 0.1)
            next_pause = wire_bytes + (8 << 20)
            peak = max(peak, rss_bytes())
    peak = max(peak, rss_bytes())
    return rows, total, bad, wire_bytes, peak - rss0


@pytest.mark.slow
async def test_million_rows_slow_reader_bounded_memory(proxy: Proxy) -> None:
    conn = await login(proxy.port)
    proxy.take_events(None)
    rows, total, bad, wire_bytes, growth = await stream_slowly(conn, MILLION_SQL)
    assert (rows, total, bad) == (1_000_000, MILLION_SUM, 0)
    assert wire_bytes > 115_000_000
    # Without backpressure this grows by ~115 MB (the whole result buffered for the slow client).
    assert growth < 100 * 1024 * 1024, f"RSS grew by {growth / 2**20:.0f} MB while streaming"
    await conn.close()
    ev = wait_events(proxy, "statement", 1)
    assert [(e["statement"], e["outcome"], e["rows"]) for e in ev] == [(MILLION_SQL, "ok", 1_000_000)]


@pytest.mark.slow
async def test_half_million_rows_slow_tls_reader_bounded_memory(tls_proxy: Proxy) -> None:
    # The same over TLS: the client transport is then uvloop's SSL transport, which must
    # also pass "pause writing" on to pgwarden.
    sql = MILLION_SQL.replace("1000000", "500000")
    conn = await login(tls_proxy.port, tls=True)
    tls_proxy.take_events(None)
    rows, total, bad, wire_bytes, growth = await stream_slowly(conn, sql)
    assert (rows, total, bad) == (500_000, 500_000 * 500_001 // 2, 0)
    assert wire_bytes > 57_000_000
    assert growth < 50 * 1024 * 1024, f"RSS grew by {growth / 2**20:.0f} MB while streaming"
    await conn.close()
    ev = wait_events(tls_proxy, "statement", 1)
    assert [(e["statement"], e["outcome"], e["rows"]) for e in ev] == [(sql, "ok", 500_000)]


async def test_client_disconnects_mid_stream(proxy: Proxy, cluster: PgCluster) -> None:
    conn = await login(proxy.port)
    pid = conn.backend_pid
    proxy.take_events(None)
    conn.send(codec.query_message(MILLION_SQL))
    got = 0
    while got < 1 << 20:
        data = await asyncio.wait_for(conn.reader.read(65536), 10)
        assert data
        got += len(data)
    conn.writer.transport.abort()
    start = time.monotonic()
    while _backend_alive(cluster, pid):
        assert time.monotonic() - start < FAST, "the upstream backend outlived its client"
        await asyncio.sleep(0.05)
    ev = wait_events(proxy, "statement", 1)
    assert [(e["statement"], e["outcome"]) for e in ev] == [(MILLION_SQL, "client_disconnected")]
    still_serves(proxy)


@pytest.mark.slow
def test_million_rows_through_psql(proxy: Proxy) -> None:
    env = {**os.environ, "PGPASSWORD": "demo", "PGCONNECT_TIMEOUT": "10"}
    r = subprocess.run(["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-o", "/dev/null",
                        f"host=127.0.0.1 port={proxy.port} dbname=hotel user=dave", "-c", MILLION_SQL],
                       env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    ev = wait_events(proxy, "statement", 1)
    assert [(e["statement"], e["outcome"], e["rows"]) for e in ev] == [(MILLION_SQL, "ok", 1_000_000)]


# --- limits ---------------------------------------------------------------------------------------


async def test_max_connections(cluster: PgCluster, tmp_path) -> None:
    p = start_proxy(cluster, str(tmp_path), limits={"max_connections": 2})
    try:
        a = await login(p.port)
        b = await login(p.port)
        c = await open_raw(p.port)
        c.send(codec.startup_message({"user": "dave", "database": "hotel"}))
        assert_fatal(await until_eof(c), "53300", "too many clients")
        await c.close()
        # The two admitted sessions are unaffected.
        assert data_rows(await simple_query(a, "SELECT 1")) == [[b"1"]]
        assert data_rows(await simple_query(b, "SELECT 2")) == [[b"2"]]
        # A freed slot is available again.
        a.send(codec.terminate_message())
        await a.read_to_eof()
        await a.close()
        wait_sessions(p, 1)
        d = await login(p.port)
        assert data_rows(await simple_query(d, "SELECT 3")) == [[b"3"]]
        await d.close()
        await b.close()
        wait_sessions(p, 0)
    finally:
        p.thread.stop()


@pytest.fixture()
def full_proxy(cluster: PgCluster, tmp_path) -> Iterator[Proxy]:
    """A proxy with max_connections=1, its one slot taken by a logged-in psycopg session."""
    p = start_proxy(cluster, str(tmp_path), limits={"max_connections": 1})
    try:
        with psycopg.connect(p.dsn("dave", sslmode="disable")) as held:
            assert held.execute("SELECT 1").fetchone() == (1,)
            yield p
    finally:
        p.thread.stop()


async def test_max_connections_refusal_after_ssl_negotiation(full_proxy: Proxy) -> None:
    # PostgreSQL answers the SSLRequest first and reports "too many clients" after the StartupMessage.
    conn = await open_raw(full_proxy.port)
    conn.send(codec.ssl_request())
    answer = await conn.read_byte()
    assert answer == b"N", f"SSLRequest answered {answer!r}"
    conn.send(codec.startup_message({"user": "dave", "database": "hotel"}))
    assert_fatal(await until_eof(conn), "53300", "too many clients")
    await conn.close()


def test_max_connections_refusal_seen_by_default_libpq(full_proxy: Proxy) -> None:
    with pytest.raises(psycopg.OperationalError) as ei:
        psycopg.connect(full_proxy.dsn("dave"))  # libpq default: sslmode=prefer sends SSLRequest first
    assert "sorry, too many clients already" in str(ei.value)
