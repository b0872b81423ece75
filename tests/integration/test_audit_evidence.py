"""Every statement leaves its own, exactly labelled event; malformed input never leaves a traceback (issue 14).

Real PostgreSQL, real sockets; pgwarden in-process (``proxy`` fixture: no rules) unless a test starts its own.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from pathlib import Path

import pytest

from proxy.demo.pgcluster import PgCluster
from proxy.wire import codec
from proxy.wire.codes import B, F
from tests.conftest import Proxy, start_proxy
from tests.integration.fix_wire import data_rows, errors, login, simple_query, wait_events

FAST = 5.0


def frame(t: int, payload: bytes) -> bytes:
    return bytes([t]) + struct.pack("!i", len(payload) + 4) + payload


MALFORMED = {
    "parse_unterminated_name": frame(F.PARSE, b"stmt"),
    "parse_negative_param_count": frame(F.PARSE, b"\x00SELECT 1\x00" + struct.pack("!h", -1)),
    "parse_param_count_past_end": frame(F.PARSE, b"\x00SELECT 1\x00" + struct.pack("!h", 3) + b"\x00\x00"),
    "parse_trailing_bytes": frame(F.PARSE, b"\x00SELECT 1\x00\x00\x00junk"),
    "close_empty": frame(F.CLOSE, b""),
    "close_bad_kind": frame(F.CLOSE, b"Xname\x00"),
    "close_unterminated": frame(F.CLOSE, b"Sname"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
async def test_malformed_parse_and_close_get_fatal_08p01_and_one_event(proxy: Proxy, case: str,
                                                                        capfd: pytest.CaptureFixture[str]) -> None:
    conn = await login(proxy.port)
    proxy.take_events(None)
    conn.send(MALFORMED[case] + codec.query_message("SELECT 1"))
    start = time.monotonic()
    msgs = await conn.read_to_eof(timeout=FAST)
    assert conn.eof and time.monotonic() - start < FAST
    errs = errors(msgs)
    assert [t for t, _ in msgs] == [B.ERROR_RESPONSE], msgs
    assert (errs[0].severity, errs[0].sqlstate) == ("FATAL", "08P01")
    kind = "Parse" if case.startswith("parse") else "Close"
    assert errs[0].message.startswith(f"pgwarden: invalid {kind} message: "), errs[0].message
    evs = wait_events(proxy, "protocol_error", 1)
    time.sleep(0.1)
    evs += proxy.take_events("protocol_error")
    assert len(evs) == 1 and evs[0]["sqlstate"] == "08P01" and evs[0]["user"] == "dave"
    assert proxy.take_events("statement") == []  # the SELECT 1 after it was not run
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Fatal error" not in err, err


def test_protocol_errors_on_stderr_are_rate_limited() -> None:
    import io

    from proxy.ops.stderr import RateLimited

    out = io.StringIO()
    limiter = RateLimited(interval=0.2, out=out)
    for _ in range(50):
        limiter.say("protocol:Parse", "pgwarden: protocol error: bad Parse")
    limiter.say("protocol:Close", "pgwarden: protocol error: bad Close")
    time.sleep(0.25)
    limiter.say("protocol:Parse", "pgwarden: protocol error: bad Parse")
    assert out.getvalue().splitlines() == [
        "pgwarden: protocol error: bad Parse", "pgwarden: protocol error: bad Close",
        "pgwarden: protocol error: bad Parse (49 more like this in the last 0.2s were not printed)"]


async def test_statements_skipped_after_an_error_get_an_event_each(proxy: Proxy) -> None:
    conn = await login(proxy.port)
    proxy.take_events(None)
    msgs = await simple_query(conn, "SELECT 1; SELECT 1/0; SELECT 2; SELECT 3")
    assert errors(msgs)[0].sqlstate == "22012"
    evs = wait_events(proxy, "statement", 4)
    assert [(e["statement"], e["outcome"]) for e in evs] == [
        ("SELECT 1", "ok"), ("SELECT 1/0", "error"), ("SELECT 2", "skipped"), ("SELECT 3", "skipped")]
    await conn.close()


def _half_closed_query(port: int, sql: str) -> list[tuple[int, bytes]]:
    """Log in with a blocking socket, send a Query, shutdown(SHUT_WR), read everything until EOF."""
    async def go() -> socket.socket:
        c = await login(port)
        sock = c.writer.get_extra_info("socket").dup()
        c.writer.transport.pause_reading()
        return sock

    sock = asyncio.run(go())
    sock.setblocking(True)
    sock.settimeout(FAST)
    sock.sendall(codec.query_message(sql))
    sock.shutdown(socket.SHUT_WR)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    out, pos = [], 0
    while pos + 5 <= len(data):
        n = struct.unpack_from("!i", data, pos + 1)[0]
        out.append((data[pos], data[pos + 5:pos + 1 + n]))
        pos += 1 + n
    return out


def test_a_half_closed_client_still_gets_its_answer(proxy: Proxy) -> None:
    """psql -c ... < /dev/null and shell pipelines send a Query and shut their side: PostgreSQL answers them."""
    proxy.take_events(None)
    msgs = _half_closed_query(proxy.port, "SELECT pg_sleep(0.3), 42")
    assert data_rows(msgs) == [[b"", b"42"]]
    assert [t for t, _ in msgs if t != B.PARAMETER_STATUS][-2:] == [B.COMMAND_COMPLETE, B.READY_FOR_QUERY]
    evs = wait_events(proxy, "statement", 1)
    assert [(e["statement"], e["outcome"], e["rows"]) for e in evs] == [("SELECT pg_sleep(0.3), 42", "ok", 1)]


async def test_statements_after_the_drain_notice_are_refused_with_an_event(cluster: PgCluster, tmp_path: Path) -> None:
    p = start_proxy(cluster, str(tmp_path), shutdown_grace=10)
    try:
        conn = await login(p.port)
        p.take_events(None)
        conn.send(codec.query_message("SELECT pg_sleep(0.5), 1"))
        await asyncio.sleep(0.2)
        server = p.thread.server
        assert server is not None
        drained = asyncio.run_coroutine_threadsafe(server.drain(10), p.thread.loop)
        await asyncio.sleep(0.1)  # the drain notice is out: the session reads nothing new
        conn.send(codec.query_message("SELECT 2; SELECT 3"))
        msgs = await conn.read_to_eof(timeout=FAST)
        await asyncio.wrap_future(drained)
        assert data_rows(msgs) == [[b"", b"1"]]
        assert errors(msgs)[-1].sqlstate == "57P01"
        evs = [e for e in p.events if e.get("event") == "statement"]
        assert [(e["statement"], e["outcome"], e.get("reason")) for e in evs] == [
            ("SELECT pg_sleep(0.5), 1", "ok", None), ("SELECT 2", "refused", "shutting down"),
            ("SELECT 3", "refused", "shutting down")]
        assert all(e["sqlstate"] == "57P01" for e in evs[1:])
    finally:
        p.thread.stop()
