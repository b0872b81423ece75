"""The connection to the real PostgreSQL, logged in with pgwarden's service credentials.

During login this is a small coroutine over a message queue; afterwards the
protocol object only forwards bytes to the session, so the relay path has no
awaits and no per-message objects.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from typing import TYPE_CHECKING

import scramp

from proxy.config import UpstreamConfig
from proxy.wire import codec
from proxy.wire.codes import Auth, B, SqlState

if TYPE_CHECKING:
    from proxy.net.client import ClientSession


class UpstreamError(Exception):
    """Login to the upstream failed; ``error`` is the server's ErrorResponse if it sent one."""

    def __init__(self, message: str, error: bytes | None = None, sqlstate: str = SqlState.CONNECTION_FAILURE) -> None:
        super().__init__(message)
        self.error = error  # raw ErrorResponse payload, relayed to the client unchanged
        self.sqlstate = sqlstate


class UpstreamProtocol(asyncio.Protocol):
    """Bytes from the server: queued during login, handed to the session afterwards."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.session: ClientSession | None = None
        self._inbox: list[bytes] = []
        self._waiter: asyncio.Future[None] | None = None
        self.closed = False
        self._paused_client = False

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        s = self.session
        if s is not None:
            s.on_upstream_data(data)
            return
        self._inbox.append(data)
        self._wake()

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()
        if self.session is not None:
            self.session.on_upstream_lost(exc)

    def pause_writing(self) -> None:
        # The server is not keeping up with what the client sends (e.g. COPY FROM STDIN).
        if self.session is not None:
            self.session.pause_client_reading()

    def resume_writing(self) -> None:
        if self.session is not None:
            self.session.resume_client_reading()

    # login-time reading
    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def read(self) -> bytes:
        while not self._inbox:
            if self.closed:
                raise UpstreamError("the upstream server closed the connection during login")
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
            self._waiter = None
        data = b"".join(self._inbox)
        self._inbox.clear()
        return data

    def take_buffered(self) -> bytes:
        data = b"".join(self._inbox)
        self._inbox.clear()
        return data


class UpstreamLogin:
    """The result of logging in: what the server announced, and bytes that followed."""

    def __init__(self) -> None:
        self.parameters: list[tuple[str, str]] = []
        self.parameter_messages: list[bytes] = []  # raw ParameterStatus messages, relayed verbatim
        self.notices: list[bytes] = []
        self.pid = 0
        self.secret = b""
        self.status = "I"
        self.rest = b""  # bytes after ReadyForQuery (normally none)


async def _open(cfg: UpstreamConfig) -> tuple[asyncio.Transport, UpstreamProtocol, bool]:
    loop = asyncio.get_running_loop()
    try:
        transport, proto = await asyncio.wait_for(
            loop.create_connection(UpstreamProtocol, cfg.host, cfg.port), cfg.connect_timeout
        )
    except (OSError, asyncio.TimeoutError) as exc:
        raise UpstreamError(f"pgwarden could not reach the database server at {cfg.host}:{cfg.port}: {exc}") from exc
    sock = transport.get_extra_info("socket")
    if sock is not None:
        import socket

        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
    if cfg.sslmode == "disable":
        return transport, proto, False
    transport.write(codec.ssl_request())
    answer = await proto.read()
    if answer[:1] == b"S" and len(answer) == 1:
        ctx = ssl.create_default_context()
        # sslmode=require semantics (as libpq): encrypt, do not verify the server's certificate.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        new_transport = await loop.start_tls(transport, proto, ctx, server_hostname=cfg.host)
        assert new_transport is not None
        proto.transport = new_transport  # type: ignore[assignment]
        return new_transport, proto, True  # type: ignore[return-value]
    if answer[:1] == b"N" and len(answer) == 1:
        if cfg.sslmode == "require":
            transport.close()
            raise UpstreamError("the upstream server does not support TLS, and upstream.sslmode is require")
        return transport, proto, False
    transport.close()
    raise UpstreamError("the upstream server answered the SSLRequest with something unexpected")


async def connect(
    cfg: UpstreamConfig, params: dict[str, str], max_message_size: int
) -> tuple[asyncio.Transport, UpstreamProtocol, UpstreamLogin]:
    """Open, encrypt if configured, and log in with the service credentials."""
    transport, proto, _tls = await _open(cfg)
    try:
        login = await _login(transport, proto, cfg, params, max_message_size)
    except BaseException:
        transport.close()
        raise
    return transport, proto, login


async def _login(
    transport: asyncio.Transport, proto: UpstreamProtocol, cfg: UpstreamConfig, params: dict[str, str],
    max_message_size: int,
) -> UpstreamLogin:
    startup = {"user": cfg.user, **params}
    transport.write(codec.startup_message(startup))
    reader = codec.MessageReader(max_message_size)
    login = UpstreamLogin()
    scram: scramp.ScramClient | None = None
    pending: list[tuple[int, bytes]] = []

    async def next_msg() -> tuple[int, bytes]:
        while not pending:
            try:
                pending.extend(reader.feed(await proto.read()))
            except codec.ProtocolError as exc:
                raise UpstreamError(f"the upstream server sent an invalid message: {exc}") from exc
        return pending.pop(0)

    while True:
        t, payload = await next_msg()
        if t == B.ERROR_RESPONSE:
            err = codec.decode_error(payload)
            raise UpstreamError(err.message, error=payload, sqlstate=err.sqlstate)
        if t == B.AUTHENTICATION:
            auth = codec.decode_auth(payload)
            if auth.code == Auth.OK:
                continue
            if cfg.password is None and auth.code != Auth.OK:
                raise UpstreamError("the upstream server wants a password and upstream.password is not set")
            pw = cfg.password or ""
            if auth.code == Auth.CLEARTEXT:
                transport.write(codec.password_message(pw.encode("utf-8") + b"\x00"))
            elif auth.code == Auth.MD5:
                inner = hashlib.md5((pw + cfg.user).encode("utf-8")).hexdigest()
                outer = "md5" + hashlib.md5(inner.encode("ascii") + auth.data[:4]).hexdigest()
                transport.write(codec.password_message(outer.encode("ascii") + b"\x00"))
            elif auth.code == Auth.SASL:
                mechs = [m.decode() for m in auth.data.split(b"\x00") if m]
                if "SCRAM-SHA-256" not in mechs:
                    raise UpstreamError(f"the upstream server offers no SASL mechanism pgwarden supports: {mechs}")
                scram = scramp.ScramClient(["SCRAM-SHA-256"], cfg.user, pw)
                transport.write(codec.sasl_initial_response("SCRAM-SHA-256", scram.get_client_first().encode()))
            elif auth.code == Auth.SASL_CONTINUE and scram is not None:
                try:
                    scram.set_server_first(auth.data.decode())
                except scramp.ScramException as exc:
                    raise UpstreamError(f"SCRAM exchange with the upstream server failed: {exc}") from exc
                transport.write(codec.password_message(scram.get_client_final().encode()))
            elif auth.code == Auth.SASL_FINAL and scram is not None:
                try:
                    scram.set_server_final(auth.data.decode())
                except scramp.ScramException as exc:
                    raise UpstreamError(f"the upstream server failed SCRAM verification: {exc}") from exc
            else:
                raise UpstreamError(f"the upstream server asked for an unsupported authentication method ({auth.code})")
        elif t == B.PARAMETER_STATUS:
            ps = codec.decode_parameter_status(payload)
            login.parameters.append((ps.name, ps.value))
            login.parameter_messages.append(codec.message(t, payload))
        elif t == B.BACKEND_KEY_DATA:
            k = codec.decode_backend_key(payload)
            login.pid, login.secret = k.pid, k.secret
        elif t == B.NOTICE_RESPONSE:
            login.notices.append(codec.message(t, payload))
        elif t == B.NEGOTIATE_PROTOCOL_VERSION:
            continue
        elif t == B.READY_FOR_QUERY:
            login.status = codec.decode_ready(payload).status
            # Anything after ReadyForQuery belongs to the relay (nothing, normally).
            rest = b"".join(codec.message(tt, pp) for tt, pp in pending)
            login.rest = rest + reader.take_buffered() + proto.take_buffered()
            return login
        else:
            raise UpstreamError(f"the upstream server sent an unexpected message {chr(t)!r} during login")


async def send_cancel(cfg: UpstreamConfig, pid: int, secret: bytes) -> None:
    """Forward a cancel to the upstream backend (a fresh connection, as the protocol requires)."""
    loop = asyncio.get_running_loop()
    try:
        transport, proto = await asyncio.wait_for(
            loop.create_connection(UpstreamProtocol, cfg.host, cfg.port), cfg.connect_timeout
        )
    except (OSError, asyncio.TimeoutError):
        return
    try:
        transport.write(codec.cancel_request(pid, secret))
        # The server closes the connection after reading the request.
        for _ in range(50):
            if proto.closed:
                break
            await asyncio.sleep(0.01)
    finally:
        transport.close()
