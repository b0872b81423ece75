"""One client connection, asyncio side: login, then bytes between the client, the relay and the server.

Theory of operation. Login (SSL negotiation, startup, authentication, the upstream login) is a
coroutine; it builds the session's :class:`proxy.session.core.Relay`. After it everything is
callbacks: the client's bytes go to the relay, which writes to the server through
``services.to_server``; the server's bytes go through the relay to the client. When the relay
must wait (a guard check, a ticket, a large analysis) it hands over an awaitable: the client is
paused, the awaitable runs here, its answer goes back to the relay. This class holds every
socket and task of the session and no policy of its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from proxy import auth
from proxy.guards.checks import device_refusal
from proxy.guards.ticketstore import TicketError, open_scope
from proxy.net import upstream
from proxy.ops.stderr import say
from proxy.ops import console as admin_console
from proxy.session.core import Relay, Services
from proxy.session.policy import app_prefix
from proxy.session.startup import LoginError, StartupSettings, startup_settings
from proxy.session.text import TextReader
from proxy.wire import codec
from proxy.wire.codes import B, SqlState
from proxy.wire.messages import CancelRequest, GSSENCRequest, SSLRequest, StartupMessage
from rules.principal import Principal

if TYPE_CHECKING:
    from proxy.net.server import Server

__all__ = ["ClientSession", "LoginError"]

LOGIN_TIMEOUT = 60.0
WRITE_HIGH_WATER = 1 << 20


class ClientSession(asyncio.Protocol):
    """The client side of one connection, and the I/O of its relay once logged in."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.principal: Principal | None = None
        self.client_addr = ""
        self.client_port = 0
        self.tls = False
        self.relaying = False
        self.closed = False
        self._over_limit = False
        self.client_cert: str | None = None  # SHA-256 of a verified client certificate, if one was shown
        # login
        self._rx = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        self._startup = codec.StartupReader()
        self._reader = codec.MessageReader(server.config.max_message_size)
        self._pending: deque[tuple[int, bytes]] = deque()
        self._task: asyncio.Task[None] | None = None
        self._settings = StartupSettings()
        # relay
        self.relay: Relay | None = None
        self.text = TextReader()
        self.up_transport: asyncio.Transport | None = None
        self.up_proto: upstream.UpstreamProtocol | None = None
        self.up_pid = 0
        self.up_secret = b""
        self.key: tuple[int, bytes] | None = None
        self._client_paused = False
        self._discarding = False
        self._client_eof = False  # the client half-closed: what it sent is still answered
        self._fatal_sent = False  # one FATAL and one protocol_error / internal_error event per session

    # --- what the server and the admin console read ---------------------------------------------

    @property
    def tx_status(self) -> str:
        return self.relay.tx_status if self.relay is not None else "I"

    @property
    def statements(self) -> int:
        return self.relay.statements if self.relay is not None else 0

    def busy(self) -> bool:
        """Is the server still to answer something this client sent (a statement running)?"""
        return self.relay is not None and self.relay.busy()

    # --- asyncio callbacks -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.client_addr, self.client_port = str(peer[0]), int(peer[1])
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)  # type: ignore[union-attr]
        # Over the limit, the client still gets SSL negotiation and its cancel requests served, and
        # hears "too many clients" after its StartupMessage, as PostgreSQL does.
        self._over_limit = not self.server.admit(self)
        self._task = self.loop.create_task(self._login())

    def data_received(self, data: bytes) -> None:
        if self._fatal_sent:
            return
        if self._discarding:  # shutting down: nothing more runs; each statement still sent gets an event
            if self.relay is not None:
                self._run(lambda: self.relay.after_shutdown(data), "client message")  # type: ignore[union-attr]
            return
        if self.relaying:
            assert self.relay is not None
            try:
                self.relay.client_data(data)
            except Exception as exc:  # noqa: BLE001 - never a traceback on the transport
                self._internal_error("client message", exc)
            return
        self._rx += data
        if len(self._rx) > self.server.config.max_message_size + 16:
            self._abort_login("message too large during login")
            return
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def eof_received(self) -> bool | None:
        # A client that sent a Query and then shutdown(SHUT_WR) still gets its answer, as from PostgreSQL:
        # keep the socket open for writing until the server has answered what was sent.
        if self.relaying and self.relay is not None and self.busy() and self.relay.answer_coming():
            self._client_eof = True
            self.server.spawn(self._probe_half_closed())
            return True
        return False

    async def _probe_half_closed(self, every: float = 0.5) -> None:
        """A FIN means shutdown(SHUT_WR) or a closed socket; only a write tells them apart. While the answer
        is pending, send the client a ParameterStatus it already has (a no-op for every driver), between
        whole messages: a closed socket answers it with a reset, the next write fails, and the teardown
        cancels the statement instead of letting it run for nobody."""
        params = self.text.parameters
        name = "client_encoding" if "client_encoding" in params else next(iter(params), None)
        while name is not None and self._client_eof and not self.closed and self.busy():
            await asyncio.sleep(every)
            t = self.transport
            if t is None or t.is_closing() or self.closed or not self.busy():
                return
            relay = self.relay
            if relay is not None and relay.tracker.scanner._skip == 0 and t.get_write_buffer_size() == 0:
                t.write(codec.parameter_status(name, params[name]))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._teardown(client_gone=True)

    def pause_writing(self) -> None:
        # The client reads slower than the server produces: stop reading the server.
        t = self.up_transport
        if t is not None and not t.is_closing():
            t.pause_reading()

    def resume_writing(self) -> None:
        t = self.up_transport
        if t is not None and not t.is_closing():
            t.resume_reading()

    def pause_client_reading(self) -> None:
        if self.transport is not None and not self._client_paused and not self.transport.is_closing():
            self._client_paused = True
            self.transport.pause_reading()

    def resume_client_reading(self) -> None:
        if self.transport is not None and self._client_paused and not self.transport.is_closing():
            self._client_paused = False
            self.transport.resume_reading()

    # --- login --------------------------------------------------------------------------------

    def _abort_login(self, why: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(codec.error_response(SqlState.PROTOCOL_VIOLATION, why, severity="FATAL"))
            self.transport.close()

    async def _more(self) -> None:
        if self.closed:
            raise ConnectionResetError("client closed the connection")
        self._waiter = self.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
        if self.closed and not self._rx:
            raise ConnectionResetError("client closed the connection")

    async def _read_startup(self) -> Any:
        while True:
            if self._rx:
                self._startup.feed(bytes(self._rx))
                self._rx.clear()
            pkt = self._startup.next()
            if pkt is not None:
                return pkt
            await self._more()

    async def _recv(self) -> tuple[int, bytes]:
        while not self._pending:
            if self._rx:
                data = bytes(self._rx)
                self._rx.clear()
                self._pending.extend(self._reader.feed(data))
                continue
            await self._more()
        return self._pending.popleft()

    def _send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def _login(self) -> None:
        started = time.monotonic()
        user = ""
        console = False
        try:
            async with asyncio.timeout(LOGIN_TIMEOUT):
                startup = await self._negotiate()
                if startup is None:
                    return
                user = startup.params.get("user", "")
                if self._over_limit:
                    raise LoginError(SqlState.TOO_MANY_CONNECTIONS, "sorry, too many clients already")
                self.principal = await self._authenticate(startup)
                blocked = self._device_refusal(self.principal) or await self.server.guards.login_block(
                    self.principal, self.server.engine.restricted(self.principal))
                if blocked is not None:
                    raise LoginError(SqlState.INVALID_AUTHORIZATION, blocked)
                console = self.principal.database == admin_console.DATABASE
                if console:  # pgwarden answers itself; nothing reaches the database server
                    if not admin_console.may_use(self.server, self.principal):
                        raise LoginError(SqlState.INSUFFICIENT_PRIVILEGE,
                                         f"pgwarden: {self.principal.user} may not use the pgwarden console")
                    self._send(admin_console.greeting())
                else:
                    self.relay = await self._new_relay(self.principal)
                    for name, value in self._settings.own.items():  # options=-c pgwarden.ticket=T-... (BI tools)
                        why = await self._startup_scope(name.split(".", 1)[1], value)
                        if why is not None:
                            raise LoginError(SqlState.INSUFFICIENT_PRIVILEGE, why)
                    await self._connect_upstream()
        except LoginError as exc:
            self._login_failed(user, exc.sqlstate, exc.message, exc.raw)
            return
        except auth.AuthFailed as exc:
            self._login_failed(user, exc.sqlstate, exc.message, None)
            return
        except codec.ProtocolError as exc:
            if isinstance(exc, codec.UnsupportedProtocol):
                self._login_failed(user, exc.sqlstate, str(exc), None)
            else:
                self._login_failed(user, exc.sqlstate, f"invalid startup packet: {exc}", None)
            return
        except TimeoutError:
            self._login_failed(user, SqlState.PROTOCOL_VIOLATION, "pgwarden: login timed out", None)
            return
        except (ConnectionError, asyncio.CancelledError):
            self._close_upstream()
            return
        except OSError as exc:  # ssl.SSLError from a failed TLS handshake, mostly
            self._login_failed(user, SqlState.PROTOCOL_VIOLATION, f"pgwarden: connection failed during login: {exc}",
                               None)
            return
        if self.server.stats is not None:
            self.server.stats.login(None)
        self.server.audit.emit("login", self.principal, auth_method=self.principal.auth_method,
                               tls=self.tls, database=self.principal.database,
                               login_ms=round((time.monotonic() - started) * 1000, 3))
        if console:
            await admin_console.run(self)

    async def _negotiate(self) -> StartupMessage | None:
        """SSL/GSS negotiation, cancel requests, then the StartupMessage."""
        while True:
            pkt = await self._read_startup()
            if isinstance(pkt, SSLRequest):
                if self.tls:
                    raise codec.ProtocolError("SSLRequest after TLS is established")
                ctx = self.server.ssl_context
                if ctx is None:
                    self._send(b"N")
                    continue
                if self._rx or self._startup.take_rest():
                    # Bytes sent before the handshake could be injected by a man in the middle.
                    raise codec.ProtocolError("received unencrypted data after SSL request")
                self._send(b"S")
                assert self.transport is not None
                new = await self.loop.start_tls(self.transport, self, ctx, server_side=True)
                if new is None:
                    raise ConnectionResetError("TLS handshake failed")
                self.transport = new  # type: ignore[assignment]
                self.tls = True
                der = new.get_extra_info("ssl_object").getpeercert(binary_form=True)
                self.client_cert = hashlib.sha256(der).hexdigest() if der else None
                continue
            if isinstance(pkt, GSSENCRequest):
                self._send(b"N")
                continue
            if isinstance(pkt, CancelRequest):
                await self.server.cancel(pkt.pid, pkt.secret)
                if self.transport is not None:
                    self.transport.close()
                return None
            assert isinstance(pkt, StartupMessage)
            rest = self._startup.take_rest()
            if rest:
                self._rx[:0] = rest
            return pkt

    async def _authenticate(self, startup: StartupMessage) -> Principal:
        params = startup.params
        user = params.get("user", "")
        if not user:
            raise LoginError(SqlState.INVALID_AUTHORIZATION, "no PostgreSQL user name specified in startup packet")
        self._settings = startup_settings(params)
        if startup.minor > 0 or self._settings.unsupported:
            self._send(codec.negotiate_protocol_version(0, self._settings.unsupported))
        entry, method = await auth.authenticate(self.server.config, user, self.client_addr, self.tls,
                                                self._send, self._recv)
        return Principal(
            user=entry.name, role=entry.role, department=entry.department, attributes=dict(entry.attributes),
            client_addr=self.client_addr, client_port=self.client_port,
            application=params.get("application_name", ""), session_id=secrets.token_hex(8), tls=self.tls,
            auth_method=method, database=params.get("database") or user,
        )

    def _device_refusal(self, p: Principal) -> str | None:
        entry = self.server.config.users.get(p.user)
        if entry is not None and entry.certificates and self.client_cert not in entry.certificates:
            return (f"pgwarden: user {p.user} must also present their client certificate (TLS), "
                    + ("and this one is not theirs" if self.client_cert else "and presented none"))
        rules = self.server.engine.rules
        role = None
        if rules is not None:
            from rules.model import effective_role

            role, _ = effective_role(rules, p)
        if not (entry is not None and entry.networks) and not getattr(role, "networks", ()):
            return None
        return device_refusal(p, entry.networks if entry is not None else (), role)

    async def _new_relay(self, p: Principal) -> Relay:
        """The session's relay, with the catalog the rules are enforced against."""
        server = self.server
        catalog: Any = None
        context: dict[str, Any] = {}
        if server.engine.enforcing:
            try:
                catalog = await server.catalog_for(p.database)
            except Exception as exc:  # noqa: BLE001 - fail closed with a message the person can act on
                raise LoginError(SqlState.CANNOT_CONNECT_NOW,
                                 f"pgwarden: cannot read the catalog of database {p.database!r} to enforce the "
                                 f"rules ({exc}); try again later or ask the DBA") from exc
            sp = self._settings.search_path()
            if sp is not None:
                from rules.catalog import parse_search_path

                context["search_path"] = parse_search_path(sp, server.config.upstream.user)
        services = Services(
            engine_of=lambda: server.engine, guards=server.guards, audit=server.audit, config=server.config, stats=server.stats,
            analysis=server.analysis, to_server=self._to_server, wait=self._wait, close_client=self._close_client,
            when_durable=self._when_durable, pause_client=self._pause_for_relay,
            open_scope=lambda principal, name, value: open_scope(server.guards.store, server.engine.rules,
                                                                 principal, name, value))
        return Relay(services, p, catalog, self.text, context)

    async def _startup_scope(self, name: str, value: str) -> str | None:
        """A ticket given in the connection string (options=-c pgwarden.ticket=T-...)."""
        relay = self.relay
        assert relay is not None
        if self.server.guards.store is None:
            return "pgwarden: tickets and break-glass need the guard state store, and none is configured"
        try:
            scope = await open_scope(self.server.guards.store, self.server.engine.rules, relay.principal, name, value)
        except TicketError as exc:
            return f"pgwarden: {exc}"
        relay.set_scope(scope, f"startup {name}")
        return None

    async def _connect_upstream(self) -> None:
        relay = self.relay
        assert relay is not None and self.principal is not None
        p = self.principal
        self._send(codec.auth_request(0))
        params = {"database": p.database}
        for k, v in self._settings.forward.items():
            if k.lower() != "application_name":
                params[k] = v
        # The DBA sees the person, not only the service login, in pg_stat_activity.
        params["application_name"] = app_prefix(relay, p.application)
        if self.server.engine.enforcing:
            # JIT compiling the masks of a statement with many fences took a minute of server CPU in
            # tests (1.2 s without): a cheap way to stall the server, and never worth it here.
            params["jit"] = "off"
        try:
            transport, proto, login = await upstream.connect(self.server.config.upstream, params,
                                                            self.server.config.max_message_size)
        except upstream.UpstreamError as exc:
            if self.server.stats is not None:
                self.server.stats.upstream_errors["connect"] += 1
            raise LoginError(exc.sqlstate, str(exc), exc.error) from exc
        if self.closed:
            transport.close()
            raise ConnectionResetError("client left during login")
        self.up_transport, self.up_proto = transport, proto
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.up_pid, self.up_secret = login.pid, login.secret
        for name, value in login.parameters:
            self.text.track(name, value)
        # Our own secret, the upstream's real pid: drivers compare NOTIFY pids with it.
        key = (login.pid, secrets.token_bytes(4))
        while key in self.server.cancel_keys:
            key = (login.pid, secrets.token_bytes(4))
        self.key = key
        self.server.cancel_keys[key] = self
        relay.tx_status = login.status
        out = b"".join(login.notices) + b"".join(login.parameter_messages)
        out += codec.backend_key_data(key[0], key[1]) + codec.ready_for_query(login.status)
        proto.session = self
        self.relaying = True
        self._send(out)
        # Anything that arrived while logging in goes through the relay like the rest.
        if login.rest:
            self.on_upstream_data(login.rest)
        leftover = list(self._pending)
        self._pending.clear()
        if self._rx:
            leftover.extend(self._reader.feed(bytes(self._rx)))
            self._rx.clear()
        if leftover:
            self._run(lambda: relay.client_messages(leftover, None), "client message")

    def _login_failed(self, user: str, sqlstate: str, message: str, raw: bytes | None) -> None:
        if raw is not None:
            self._send(codec.message(B.ERROR_RESPONSE, raw))
        else:
            self._send(codec.error_response(sqlstate, message, severity="FATAL"))
        if self.transport is not None:
            self.transport.close()
        self._close_upstream()
        if self.server.stats is not None:
            self.server.stats.login(sqlstate)
        self.server.audit.emit("login_failed", None, user=user, client_addr=self.client_addr,
                               sqlstate=sqlstate, error=message, tls=self.tls)

    # --- the relay's I/O ------------------------------------------------------------------------

    def _to_server(self, data: bytes) -> None:
        t = self.up_transport
        if t is not None and not t.is_closing():
            t.write(data)

    def _wait(self, check: Any) -> None:
        """Hold the client's messages until ``check`` answers, then give the relay the answer."""
        if self.transport is not None and not self._client_paused:
            self.transport.pause_reading()

        async def wait() -> None:
            try:
                answer = await check
            except Exception as exc:  # noqa: BLE001 - the relay refuses the message that asked
                answer = exc
            if self.closed or self.relay is None:
                return
            if self.transport is not None and not self._client_paused:
                self.transport.resume_reading()
            self._run(lambda: self.relay.resume(answer), "client message")  # type: ignore[union-attr]

        self.server.spawn(wait())

    def _when_durable(self, durable: Any, then: Any) -> None:
        """Call ``then(ok)`` once the audit intent is written (or failed), unless the client has gone."""

        def done(fut: asyncio.Future[bool]) -> None:
            if self.closed or self.relay is None:
                return  # the runs were ended by the teardown (their events name their starts)
            try:
                ok = bool(fut.result())
            except BaseException:  # noqa: BLE001 - cancelled with the loop: fail closed
                ok = False
            self._run(lambda: then(ok), "client message")
            if self._client_eof and not self.busy():
                self._close_client()

        durable.add_done_callback(done)

    def _pause_for_relay(self, pause: bool) -> None:
        t = self.transport
        if t is None or t.is_closing() or self._client_paused:
            return
        if pause:
            t.pause_reading()
        else:
            t.resume_reading()

    def _run(self, step: Any, where: str) -> None:
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - never a traceback on the transport
            self._internal_error(where, exc)

    def on_upstream_data(self, data: bytes) -> None:
        relay = self.relay
        if relay is None:
            return
        try:
            out = relay.server_data(data)
        except codec.ProtocolError as exc:
            self._fatal(SqlState.PROTOCOL_VIOLATION, f"pgwarden: invalid message from the server: {exc}", cause="server")
            return
        except Exception as exc:  # noqa: BLE001 - never a traceback on the transport
            self._internal_error("server message", exc)
            return
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)
        if self._client_eof and not self.busy():
            self._close_client()  # a half-closed client has had every answer (writes are flushed first)

    # --- endings ------------------------------------------------------------------------------

    def _fatal(self, sqlstate: str, message: str, cause: str = "other") -> None:
        """A protocol violation: tell the client why (FATAL), one protocol_error event, then close both sides.

        stderr gets one line per cause per interval (any logged-in user can send malformed messages)."""
        if self._fatal_sent:
            return
        self._fatal_sent = True
        self._send(codec.error_response(sqlstate, message, severity="FATAL"))
        self.server.audit.emit("protocol_error", self.principal, sqlstate=sqlstate, error=message[:500])
        say(f"protocol:{cause}", f"pgwarden: protocol error from {self.client_addr} "
                                 f"({self.principal.user if self.principal else '?'}): {message[:200]}")
        self._close_client()

    def _internal_error(self, where: str, exc: BaseException) -> None:
        """A bug met an input: fail closed for this session only, one event, one rate-limited line, no traceback."""
        if self._fatal_sent or self.closed:
            return
        self._fatal_sent = True
        self._send(codec.error_response(SqlState.INTERNAL_ERROR,
                                        "pgwarden: internal error; the connection is closed (reported in the "
                                        "audit log as internal_error)", severity="FATAL"))
        self.server.audit.emit("internal_error", self.principal, error=f"{type(exc).__name__}: {exc}"[:300],
                               message_type=where)
        say(f"internal:{type(exc).__name__}:{where}",
            f"pgwarden: internal error on a {where} ({type(exc).__name__}: {str(exc)[:200]}); session closed")
        self._close_client()

    def _close_client(self) -> None:
        if self.relay is not None and self.relay.protocol_error is not None and self.transport is not None \
                and not self.transport.is_closing():
            why, self.relay.protocol_error = self.relay.protocol_error, None
            self._fatal(SqlState.PROTOCOL_VIOLATION, why, cause=self.relay.protocol_cause)
            return
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _close_upstream(self) -> None:
        t = self.up_transport
        if t is not None and not t.is_closing():
            try:
                t.write(codec.terminate_message())
            finally:
                t.close()

    def on_upstream_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        if self.server.stats is not None:
            self.server.stats.upstream_errors["lost"] += 1
        if self.relay is None or not self.relay.tracker.upstream_fatal:
            self._send(codec.error_response(
                SqlState.CONNECTION_FAILURE,
                "pgwarden: the connection to the database server was lost; reconnect to continue",
                severity="FATAL"))
        if self.relay is not None:
            self.relay.abandon("upstream_lost", SqlState.CONNECTION_FAILURE)
        self._close_client()

    def _teardown(self, client_gone: bool) -> None:
        busy = self.busy()
        if busy and client_gone and self.up_pid and self.up_transport is not None and not self.up_transport.is_closing():
            # Stop the running query instead of letting it finish for nobody.
            cfg = self.server.config.upstream
            self.server.spawn(upstream.send_cancel(cfg, self.up_pid, self.up_secret))
        if busy and self.relay is not None:
            if self.relay.ending == "shutdown":  # cut by the shutdown grace, not by the client
                self.relay.abandon("shutdown", SqlState.ADMIN_SHUTDOWN)
            else:
                self.relay.abandon("client_disconnected", SqlState.CONNECTION_FAILURE)
        self._close_upstream()
        if self.key is not None:
            self.server.cancel_keys.pop(self.key, None)
        self.server.release(self)
        if self.principal is not None and self.relaying:
            self.server.audit.emit("disconnect", self.principal, statements=self.statements)

    async def shutdown(self, linger: float = 1.0) -> None:
        """Server is stopping: tell the client, as PostgreSQL does on a fast shutdown.

        Closing a socket with unread client bytes makes the kernel send a reset, which can
        destroy the 57P01 before the client reads it: so end our side (FIN), read and drop
        whatever the client still sends, and close once it has gone (at most ``linger`` s).
        """
        t = self.transport
        self._send(codec.error_response(SqlState.ADMIN_SHUTDOWN,
                                        "terminating connection due to administrator command", severity="FATAL"))
        if self.relay is not None:
            self.relay.shutting_down()
        if t is None or t.is_closing() or self.closed:
            return
        self._discarding = True  # nothing more is relayed
        gone = self.loop.create_future()
        self._waiter = gone  # connection_lost sets it
        if t.can_write_eof():
            t.write_eof()
        else:
            linger = min(linger, 0.1)  # TLS: no half-close; a moment to read what is in flight
        t.resume_reading()
        self._client_paused = False
        try:
            await asyncio.wait_for(gone, linger)
        except TimeoutError:
            pass
        self._close_client()

