"""A raw protocol-3.0 client over asyncio streams, for tests that send hostile bytes.

Messages are built with pgwarden's own encoders (``proxy.wire.codec``) and the
answers framed with its ``MessageReader``; nothing here trusts the proxy to be
well behaved: every read has a timeout and EOF is reported, not raised.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import dataclass, field

import scramp

from proxy.wire import codec
from proxy.wire.codes import GSSENC_REQUEST, PROTOCOL_3_0, B
from proxy.wire.messages import ErrorResponse

READ_TIMEOUT = 10.0


@dataclass
class RawConn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    framer: codec.MessageReader = field(default_factory=lambda: codec.MessageReader(1 << 30))
    pending: list[tuple[int, bytes]] = field(default_factory=list)
    eof: bool = False
    backend_pid: int = 0

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def recv(self, timeout: float = READ_TIMEOUT) -> tuple[int, bytes] | None:
        """The next whole message, or None at EOF."""
        while not self.pending:
            if self.eof:
                return None
            try:
                data = await asyncio.wait_for(self.reader.read(65536), timeout)
            except (ConnectionResetError, BrokenPipeError):
                data = b""
            if not data:
                self.eof = True
                continue
            self.pending.extend(self.framer.feed(data))
        return self.pending.pop(0)

    async def recv_until(self, *types: int, timeout: float = READ_TIMEOUT) -> list[tuple[int, bytes]]:
        """Messages up to and including the first of ``types`` (or EOF)."""
        out: list[tuple[int, bytes]] = []
        while True:
            m = await self.recv(timeout)
            if m is None:
                return out
            out.append(m)
            if m[0] in types:
                return out

    async def read_to_eof(self, timeout: float = READ_TIMEOUT) -> list[tuple[int, bytes]]:
        """Every message until the proxy closes the connection; fails the test if it does not."""
        out: list[tuple[int, bytes]] = []
        while True:
            m = await self.recv(timeout)
            if m is None:
                return out
            out.append(m)

    async def read_byte(self, timeout: float = READ_TIMEOUT) -> bytes:
        """One untyped byte (the answer to SSLRequest / GSSENCRequest)."""
        return await asyncio.wait_for(self.reader.read(1), timeout)

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 5)
        except (OSError, asyncio.TimeoutError):
            pass


async def open_raw(port: int, host: str = "127.0.0.1") -> RawConn:
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return RawConn(reader, writer)


def errors(msgs: list[tuple[int, bytes]]) -> list[ErrorResponse]:
    return [codec.decode_error(p) for t, p in msgs if t == B.ERROR_RESPONSE]


def gssenc_request() -> bytes:
    return struct.pack("!ii", 8, GSSENC_REQUEST)


def auth_code(payload: bytes) -> int:
    return struct.unpack_from("!i", payload, 0)[0]


class LoginRefused(AssertionError):
    """The server answered the login with an ErrorResponse (kept whole: SQLSTATE, severity, message)."""

    def __init__(self, error: ErrorResponse) -> None:
        super().__init__(f"login refused: {error.sqlstate} {error.message}")
        self.error = error


async def authenticate(conn: RawConn, user: str, password: str) -> list[tuple[int, bytes]]:
    """Answer whatever authentication the proxy asks for (trust, SCRAM, md5, cleartext) up to ReadyForQuery.

    Returns every message received on the way (ParameterStatus, BackendKeyData, ...).
    Raises LoginRefused (an AssertionError) with the server's error if the login is refused.
    """
    seen: list[tuple[int, bytes]] = []
    scram: scramp.ScramClient | None = None
    while True:
        m = await conn.recv()
        assert m is not None, f"connection closed during login; got {seen!r}"
        seen.append(m)
        t, payload = m
        if t == B.ERROR_RESPONSE:
            raise LoginRefused(codec.decode_error(payload))
        if t == B.BACKEND_KEY_DATA:
            conn.backend_pid = struct.unpack_from("!i", payload, 0)[0]
        if t == B.READY_FOR_QUERY:
            return seen
        if t != B.AUTHENTICATION:
            continue
        code = auth_code(payload)
        if code == 0:
            continue
        if code == 3:  # cleartext
            conn.send(codec.password_message(password.encode() + b"\x00"))
        elif code == 5:  # md5
            import hashlib

            inner = hashlib.md5((password + user).encode()).hexdigest()
            outer = "md5" + hashlib.md5(inner.encode() + payload[4:8]).hexdigest()
            conn.send(codec.password_message(outer.encode() + b"\x00"))
        elif code == 10:  # SASL
            mechs = [x.decode() for x in payload[4:].split(b"\x00") if x]
            assert "SCRAM-SHA-256" in mechs, mechs
            scram = scramp.ScramClient(["SCRAM-SHA-256"], user, password)
            conn.send(codec.sasl_initial_response("SCRAM-SHA-256", scram.get_client_first().encode()))
        elif code == 11:
            assert scram is not None
            scram.set_server_first(payload[4:].decode())
            conn.send(codec.password_message(scram.get_client_final().encode()))
        elif code == 12:
            assert scram is not None
            scram.set_server_final(payload[4:].decode())
        else:
            raise AssertionError(f"unexpected authentication request {code}")


async def start_tls(conn: RawConn) -> None:
    """SSLRequest, 'S', then a TLS handshake (the certificate is not verified)."""
    import ssl

    conn.send(codec.ssl_request())
    answer = await conn.read_byte()
    assert answer == b"S", f"expected b'S' to SSLRequest, got {answer!r}"
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    await conn.writer.start_tls(ctx)


async def login(port: int, user: str = "dave", password: str = "demo", database: str = "hotel",
                tls: bool = False, **params: str) -> RawConn:
    """A raw connection, logged in and idle (ReadyForQuery received)."""
    conn = await open_raw(port)
    if tls:
        await start_tls(conn)
    conn.send(codec.startup_message({"user": user, "database": database, **params}, PROTOCOL_3_0))
    await authenticate(conn, user, password)
    return conn


async def refused_login(port: int, user: str = "dave", password: str = "demo", database: str = "hotel",
                        **params: str) -> ErrorResponse:
    """The ErrorResponse a login is refused with, as sent on the wire; the test fails if it succeeds.

    libpq-based clients (psql, psycopg) do not expose the SQLSTATE of a login error: read it here.
    """
    conn = await open_raw(port)
    try:
        conn.send(codec.startup_message({"user": user, "database": database, **params}, PROTOCOL_3_0))
        try:
            await authenticate(conn, user, password)
        except LoginRefused as exc:
            return exc.error
        raise AssertionError(f"the login of {user} with {params} was not refused")
    finally:
        await conn.close()


def login_refusal(port: int, user: str = "dave", password: str = "demo", database: str = "hotel",
                  **params: str) -> ErrorResponse:
    """``refused_login`` for tests that are not coroutines."""
    return asyncio.run(refused_login(port, user, password, database, **params))


async def simple_query(conn: RawConn, sql: str) -> list[tuple[int, bytes]]:
    conn.send(codec.query_message(sql))
    return await conn.recv_until(B.READY_FOR_QUERY)


def data_rows(msgs: list[tuple[int, bytes]]) -> list[list[bytes | None]]:
    out = []
    for t, p in msgs:
        if t != B.DATA_ROW:
            continue
        n = struct.unpack_from("!h", p, 0)[0]
        pos, row = 2, []
        for _ in range(n):
            ln = struct.unpack_from("!i", p, pos)[0]
            pos += 4
            if ln < 0:
                row.append(None)
            else:
                row.append(p[pos:pos + ln])
                pos += ln
        out.append(row)
    return out


def wait_events(proxy, kind: str | None, n: int, timeout: float = 5.0) -> list[dict]:
    """At least ``n`` audit events of ``kind`` (taken from ``proxy``), waiting for them to be written.

    The proxy writes an event right after it answered the client, so a client can see the answer
    a moment before the event exists. Returns all events of that kind taken (possibly more than n).
    """
    import time

    deadline = time.monotonic() + timeout
    out: list[dict] = []
    while True:
        out += proxy.take_events(kind)
        if len(out) >= n or time.monotonic() > deadline:
            return out
        time.sleep(0.02)
