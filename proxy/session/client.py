"""One client connection: login, then the relay in both directions.

Theory of operation. Login (SSL negotiation, startup, authentication, the
upstream login) is a coroutine. After it the session is driven by callbacks
only: bytes from the client are framed, every SQL text (Query, Parse) goes to
the policy engine, and the messages are forwarded in one write; bytes from
the server are scanned for message boundaries and forwarded uncopied.

To audit one event per statement the session keeps a queue of what it
expects the server to answer, one entry per request message, in order
(Parse -> ParseComplete, Execute -> rows + CommandComplete, Sync ->
ReadyForQuery, ...). After an error the server skips to the next Sync, and
so does the queue. A refused statement is never shown to the server: it is
replaced by a statement that fails to parse, so the server itself aborts the
transaction and skips to Sync exactly as it would for a real error, and the
server's error is then replaced by pgwarden's own.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from rules.decision import Decision, refuse
from rules.settings import setting_problem
from rules.redact import mask_shapes
from rules.rewrite import ROW_CAP_MARKER, ROW_CHECK_MARKER, row_cap_weight

from proxy.ops import console as admin_console
from proxy import auth
from proxy.net import upstream
from proxy.guards.checks import declared_cursor, decode_param, device_refusal, fetch_rows, skip_comments
from proxy.audit.log import principal_fields
from rules.principal import Principal
from proxy.audit.receipts import new_receipt, protected_by, receipt_notice, receipt_text
from proxy.session.sqltext import split_statements, statement_type, type_from_tag
from proxy.wire import codec
from proxy.wire.codes import B, F, SqlState
from proxy.wire.messages import CancelRequest, GSSENCRequest, SSLRequest, StartupMessage

if TYPE_CHECKING:
    from proxy.net.server import Server

LOGIN_TIMEOUT = 60.0
WRITE_HIGH_WATER = 1 << 20

# Settings that pgwarden itself interprets (tickets and break-glass come later); never forwarded.
PGWARDEN_SETTINGS = frozenset({"pgwarden.ticket", "pgwarden.emergency"})

# PostgreSQL encoding names -> Python codecs, for decoding statement text.
PG_ENCODINGS = {
    "UTF8": "utf-8", "UNICODE": "utf-8", "SQL_ASCII": "ascii", "LATIN1": "latin-1", "LATIN2": "iso8859-2",
    "LATIN9": "iso8859-15", "WIN1250": "cp1250", "WIN1251": "cp1251", "WIN1252": "cp1252", "GBK": "gbk",
    "GB18030": "gb18030", "BIG5": "big5", "SJIS": "shift_jis", "EUC_JP": "euc_jp", "EUC_KR": "euc_kr",
    "EUC_CN": "gb2312", "UHC": "cp949", "KOI8R": "koi8-r",
}
# Encodings whose Python codec reads every byte sequence as PostgreSQL's conversion does, checked
# exhaustively for a trail byte that could be read as ASCII (\\ or '). SJIS and SHIFT_JIS_2004 are
# not among them: PostgreSQL's SJIS takes pairs such as 0x87 0x5C that Python's codec does not,
# which once let a restricted role smuggle a whole statement past the parser in a "string".
SAFE_ENCODINGS = frozenset({
    "UTF8", "UNICODE", "GBK", "GB18030", "BIG5", "UHC", "EUC_JP", "EUC_KR", "EUC_CN", "LATIN1", "LATIN2", "LATIN9",
    "WIN1250", "WIN1251", "WIN1252", "KOI8R",
})
POISON_SQL = b"pgwarden refused this statement\x00"
AUDIT_FAILING = ("pgwarden: the audit log cannot be written, so statements of restricted roles are refused "
                 "until it can; tell the pgwarden administrator")
# SET application_name = 'x' would hide the person from the DBA (or name another one): keep the prefix.
#: SET/RESET of pgwarden's own settings: answered by pgwarden, never forwarded with their value.
_OWN_SET = re.compile(
    r"\s*(?:(SET)\s+(?:SESSION\s+)?|(RESET)\s+)pgwarden\.(ticket|emergency)"
    r"(?:\s*(?:=|\s+TO\s+|\s+TO$)\s*(?:'((?:[^']|'')*)'|(DEFAULT)))?\s*;?\s*", re.IGNORECASE)
_SET_OR_RESET = re.compile(r"\s*(?:SET|RESET)\b", re.IGNORECASE)
_MENTIONS_OWN = re.compile(r"pgwarden\.", re.IGNORECASE).search
_SET_APPNAME = re.compile(
    r"\s*SET\s+(?:SESSION\s+|LOCAL\s+)?application_name\s*(?:=|\bTO\b)\s*"
    r"(?:'((?:[^']|'')*)'|(DEFAULT)\b|([A-Za-z_][A-Za-z0-9_$]*))\s*;?\s*", re.IGNORECASE)  # a syntax error: the server aborts and skips to Sync

# Backend message types as plain ints: the relay compares them per message.
_M_COMPLETE, _M_EMPTY, _M_SUSPENDED = B.COMMAND_COMPLETE, B.EMPTY_QUERY_RESPONSE, B.PORTAL_SUSPENDED
_M_READY, _M_ERROR, _M_ROWDESC, _M_NODATA = B.READY_FOR_QUERY, B.ERROR_RESPONSE, B.ROW_DESCRIPTION, B.NO_DATA
_M_DONE = frozenset((B.PARSE_COMPLETE, B.BIND_COMPLETE, B.CLOSE_COMPLETE))

_TAGS: dict[bytes, tuple[str, int | None]] = {}  # CommandComplete payload -> (statement type, rows)


def _tag_facts(payload: bytes) -> tuple[str, int | None]:
    facts = _TAGS.get(payload)
    if facts is None:
        tag = codec.decode_command_tag(payload)
        facts = (type_from_tag(tag), codec.rows_from_tag(tag))
        if len(_TAGS) < 4096:
            _TAGS[payload] = facts
    return facts


# Expectation kinds (what the server will answer next).
_Q, _P, _B, _D, _E, _C, _S, _F = range(8)


def _quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class Run:
    """One statement on its way through the server, for its audit event."""

    __slots__ = ("text", "start", "decision", "done", "guard", "reserved")

    def __init__(self, text: str = "", decision: Decision | None = None) -> None:
        self.text = text  # decoded with the session's client_encoding
        self.start = 0.0
        self.decision = decision
        self.done = False
        self.guard: dict[str, Any] | None = None  # guard counters for the audit event
        self.reserved: Any = None  # (minute, rows) taken from the row budget, settled when it ends


class Expect:
    """What one request message will be answered with."""

    __slots__ = ("kind", "runs", "index", "refusal", "rows0", "sql")

    def __init__(self, kind: int, runs: list[Run] | None = None, refusal: bytes | None = None,
                 sql: str | None = None) -> None:
        self.kind = kind
        self.runs = runs
        self.index = 0
        self.refusal = refusal  # our ErrorResponse, replacing the server's answer to the poison statement
        self.rows0 = 0
        self.sql = sql


# Answers that carry no state of their own are shared (rows0 is written but never read on them).
_EXPECT_BIND, _EXPECT_SYNC, _EXPECT_DESCRIBE, _EXPECT_CLOSE = Expect(_B), Expect(_S), Expect(_D), Expect(_C)
_F_BIND, _F_EXECUTE, _F_SYNC = F.BIND, F.EXECUTE, F.SYNC


class _Suspend(Exception):
    """Raised while handling a client message that must wait for a guard check (an awaitable)."""

    def __init__(self, check: Any) -> None:
        self.check = check


def _param_key(value: str | None, integer: bool) -> str | None:
    from rules.lookups import canonical_key

    return None if value is None else canonical_key(value, integer)


class _ScopeVerdict:
    """The state store's answer to SET pgwarden.ticket / emergency: a scope, or why not."""

    __slots__ = ("scope", "message")

    def __init__(self, scope: Any, message: str) -> None:
        self.scope = scope
        self.message = message


class _Analysed:
    """A worker's decision for the text of the message that waited for it."""

    __slots__ = ("text", "decision")

    def __init__(self, text: str, decision: Decision) -> None:
        self.text = text
        self.decision = decision


class LoginError(Exception):
    def __init__(self, sqlstate: str, message: str, raw: bytes | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.raw = raw  # an ErrorResponse from the upstream, relayed unchanged


def split_options(options: str) -> list[str]:
    """Split the ``options`` startup parameter exactly as PostgreSQL does (pg_split_opts):
    whitespace separates words and a backslash takes the next character literally."""
    words: list[str] = []
    cur: list[str] = []
    i, n = 0, len(options)
    while i < n:
        c = options[i]
        if c.isspace():
            if cur:
                words.append("".join(cur))
                cur = []
        elif c == "\\" and i + 1 < n:
            i += 1
            cur.append(options[i])
        else:
            cur.append(c)
        i += 1
    if cur:
        words.append("".join(cur))
    return words


def parse_options(options: str) -> list[tuple[str, str]]:
    """``-c name=value`` / ``--name=value`` pairs from the libpq ``options`` parameter."""
    out: list[tuple[str, str]] = []
    words = split_options(options)
    i = 0
    while i < len(words):
        w = words[i]
        if w == "-c" and i + 1 < len(words):
            kv, i = words[i + 1], i + 2
        elif w.startswith("-c"):
            kv, i = w[2:], i + 1
        elif w.startswith("--"):
            kv, i = w[2:], i + 1
        else:
            raise LoginError(SqlState.INSUFFICIENT_PRIVILEGE,
                             f"pgwarden: startup option {w!r} is not allowed (only -c name=value settings are)")
        if "=" not in kv:
            raise LoginError(SqlState.PROTOCOL_VIOLATION, f"invalid startup option {kv!r}: expected name=value")
        name, value = kv.split("=", 1)
        out.append((name.strip().lower().replace("-", "_"), value))
    return out


class ClientSession(asyncio.Protocol):
    """The client side of one connection, and the relay once logged in."""

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
        # relay
        self.up_transport: asyncio.Transport | None = None
        self.up_proto: upstream.UpstreamProtocol | None = None
        self.up_pid = 0
        self.up_secret = b""
        self.key: tuple[int, bytes] | None = None
        self._scanner = codec.BackendScanner()
        self._expect: deque[Expect] = deque()
        # prepared statement / portal name -> (statement text, decision)
        self._statements: dict[bytes, tuple[str, Decision | None]] = {}
        self._portals: dict[bytes, tuple[str, Decision | None] | None] = {}
        self._audit_base: dict[str, Any] = {}
        self.tx_status = "I"
        self.encoding = "utf-8"
        self.parameters: dict[str, str] = {}
        self._client_paused = False
        self._upstream_fatal = False
        self.statements = 0
        self.catalog: Any = None  # the policy engine's snapshot of this database (None: no rules)
        # Why statement text cannot be analysed exactly as the server reads it, if so.
        self._encoding_problem: str | None = None
        self._scs_problem: str | None = None
        self._undecodable = False
        self._context: dict[str, Any] = {}
        # search_path as the server has it: the startup value, then each SET search_path once its
        # transaction has ended without an error (a rollback undoes it in PostgreSQL too).
        self._startup_path: tuple[str, ...] | None = None
        self._path_pending: tuple[str, ...] | None = None
        # A guard check in flight (R3.4): client messages wait here, in order, until it answers.
        self._held: list[tuple[int, bytes]] | None = None
        self._verdict: Any = None  # the answer, for the message at the head of _held
        self._last_guard: dict[str, Any] | None = None  # counters for the next audit event
        self._last_reserved: Any = None  # the row budget reservation the last verdict made
        self._last_left = 0  # rows left of the budget when the last verdict refused for it
        self._cap_retry: int | None = None  # a Query decided again with the rows left as its cap
        #: cursors declared over protected tables (their FETCHes count) -> records one of their rows carries
        self._cursors: dict[str, int] = {}
        self._scope: Any = None  # rules.tickets.Scope of the ticket or break-glass in use, if any
        self._scope_epoch = 0  # changes whenever the scope does
        self._stmt_epoch: dict[bytes, int] = {}  # prepared under a scope -> the epoch it was prepared in
        self._portal_epoch: dict[bytes, int] = {}
        self._scope_source = ""  # the statement that activated it (re-run after a guard wait: not again)

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
        if self.relaying:
            try:
                self._on_client_data(data)
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
        return False

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
                for name, value in self._own_settings.items():  # options=-c pgwarden.ticket=T-... (BI tools)
                    why = await self._startup_scope(name.split(".", 1)[1], value)
                    if why is not None:
                        raise LoginError(SqlState.INSUFFICIENT_PRIVILEGE, why)
                console = self.principal.database == admin_console.DATABASE
                if console:  # pgwarden answers itself; nothing reaches the database server
                    if not admin_console.may_use(self.server, self.principal):
                        raise LoginError(SqlState.INSUFFICIENT_PRIVILEGE,
                                         f"pgwarden: {self.principal.user} may not use the pgwarden console")
                    self._send(admin_console.greeting())
                else:
                    await self._connect_upstream(startup)
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

    def _settings_from_startup(self, startup: StartupMessage) -> tuple[dict[str, str], dict[str, str]]:
        """(parameters to forward upstream, pgwarden's own settings); refuses anything else."""
        forward: dict[str, str] = {}
        own: dict[str, str] = {}
        unsupported: list[str] = []

        def take(name: str, value: str, how: str) -> None:
            key = name.lower()
            if key in PGWARDEN_SETTINGS:
                own[key] = value
            else:
                # Exactly what SET allows (rules.settings): one list, whichever way a setting comes.
                why = setting_problem(key, value)
                if why is not None:
                    raise LoginError(SqlState.INSUFFICIENT_PRIVILEGE, f"{why} (as a {how})")
                forward[name] = value

        for name, value in startup.params.items():
            low = name.lower()
            if low in ("user", "database"):
                continue
            if low == "replication":
                if value.lower() not in ("false", "0", "off", "no"):
                    raise LoginError(SqlState.INSUFFICIENT_PRIVILEGE,
                                     "pgwarden: replication connections are not allowed")
                continue
            if low.startswith("_pq_."):
                unsupported.append(name)
                continue
            if low == "options":
                for k, v in parse_options(value):
                    take(k, v, "startup option")
                continue
            take(name, value, "startup parameter")
        if startup.minor > 0 or unsupported:
            self._send(codec.negotiate_protocol_version(0, unsupported))
        return forward, own

    async def _authenticate(self, startup: StartupMessage) -> Principal:
        params = startup.params
        user = params.get("user", "")
        if not user:
            raise LoginError(SqlState.INVALID_AUTHORIZATION, "no PostgreSQL user name specified in startup packet")
        self._forward_params, self._own_settings = self._settings_from_startup(startup)
        entry, method = await auth.authenticate(self.server.config, user, self.client_addr, self.tls,
                                                self._send, self._recv)
        app = params.get("application_name", "")
        return Principal(
            user=entry.name, role=entry.role, department=entry.department, attributes=dict(entry.attributes),
            client_addr=self.client_addr, client_port=self.client_port, application=app,
            session_id=secrets.token_hex(8), tls=self.tls, auth_method=method,
            database=params.get("database") or user,
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

    async def _connect_upstream(self, startup: StartupMessage) -> None:
        p = self.principal
        assert p is not None
        self._send(codec.auth_request(0))
        params = {"database": p.database}
        for k, v in self._forward_params.items():
            if k.lower() != "application_name":
                params[k] = v
        # The DBA sees the person, not only the service login, in pg_stat_activity.
        params["application_name"] = self._app_prefix(p.application)
        if self.server.engine.enforcing:
            try:
                self.catalog = await self.server.catalog_for(p.database)
            except Exception as exc:  # noqa: BLE001 - fail closed with a message the person can act on
                raise LoginError(SqlState.CANNOT_CONNECT_NOW,
                                 f"pgwarden: cannot read the catalog of database {p.database!r} to enforce the "
                                 f"rules ({exc}); try again later or ask the DBA") from exc
            sp = self._forward_params.get("search_path") or next(
                (v for k, v in self._forward_params.items() if k.lower() == "search_path"), None)
            if sp is not None:
                from rules.catalog import parse_search_path

                self._context["search_path"] = parse_search_path(sp, self.server.config.upstream.user)
                self._startup_path = self._context["search_path"]
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
            self._track_parameter(name, value)
        # Our own secret, the upstream's real pid: drivers compare NOTIFY pids with it.
        key = (login.pid, secrets.token_bytes(4))
        while key in self.server.cancel_keys:
            key = (login.pid, secrets.token_bytes(4))
        self.key = key
        self.server.cancel_keys[key] = self
        self.tx_status = login.status
        out = b"".join(login.notices) + b"".join(login.parameter_messages)
        out += codec.backend_key_data(key[0], key[1]) + codec.ready_for_query(login.status)
        proto.session = self
        self._audit_base = principal_fields(p)
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
            self._handle_client(leftover, None)

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

    # --- relay: client -> server --------------------------------------------------------------

    def _on_client_data(self, data: bytes) -> None:
        reader = self._reader
        whole = not reader._buf
        try:
            msgs = reader.feed(data)
        except codec.ProtocolError as exc:
            self._fatal(SqlState.PROTOCOL_VIOLATION, f"pgwarden: invalid message from client: {exc}")
            return
        if msgs:
            self._handle_client(msgs, data if whole and not reader._buf else None)

    def _handle_client(self, msgs: list[tuple[int, bytes]], raw: bytes | None) -> None:
        """Track and police each message; forward ``raw`` as is unless something changed."""
        if self._held is not None:
            self._held.extend(msgs)  # a guard check is in flight: keep the order
            return
        changed: list[bytes] | None = None
        expect = self._expect
        now = time.perf_counter()
        for i, (t, payload) in enumerate(msgs):
            replacement: bytes | None = None
            try:
                if t == _F_BIND:
                    a = payload.find(b"\x00")
                    b = payload.find(b"\x00", a + 1)
                    if b < 0:
                        self._fatal(SqlState.PROTOCOL_VIOLATION, "invalid Bind message")
                        return
                    st = self._statements.get(payload[a + 1 : b])
                    if st is not None and st[1] is not None and st[1].lookups:
                        st = self._with_params(st, payload)
                    self._portals[payload[:a]] = st
                    if self._stmt_epoch:
                        ep = self._stmt_epoch.get(payload[a + 1 : b])
                        if ep is None:
                            self._portal_epoch.pop(payload[:a], None)
                        else:
                            self._portal_epoch[payload[:a]] = ep
                    expect.append(_EXPECT_BIND)
                elif t == _F_EXECUTE:
                    end = payload.find(b"\x00")
                    st = self._portals.get(payload[:end] if end >= 0 else payload)
                    if self.server.audit.refusing and self.server.engine.restricted(self.principal):
                        # audit log failing (issue 6): a statement prepared earlier does not run unlogged either
                        replacement = self._refuse_execute(st[0] if st else "", self._audit_refusal(), now)
                    elif self._portal_epoch and self._stale_portal(payload[:end] if end >= 0 else payload):
                        replacement = self._refuse_execute(st[0] if st else "", refuse(
                            "pgwarden: this statement was prepared under a ticket (or break-glass) that is no longer "
                            "in force; prepare it again", reason="ticket no longer in force"), now)
                    elif self.server.guards.store is not None and self.principal is not None:
                        replacement = self._guard_execute(st, int.from_bytes(payload[end + 1:end + 5], "big"), now)
                    if replacement is None:
                        run = Run(st[0], st[1]) if st else Run()
                        run.start = now
                        if self._last_guard is not None:
                            run.guard = self._take_guard()
                        if self._last_reserved is not None:
                            run.reserved, self._last_reserved = self._last_reserved, None
                        e = Expect(_E, [run])
                        if not expect:  # rows counted from here; otherwise from when it becomes the head
                            e.rows0 = self._scanner.rows
                        expect.append(e)
                elif t == _F_SYNC:
                    expect.append(_EXPECT_SYNC)
                elif t == F.QUERY:
                    replacement = self._on_query(payload, now)
                elif t == F.PARSE:
                    replacement = self._on_parse(payload)
                elif t == F.DESCRIBE:
                    expect.append(_EXPECT_DESCRIBE)
                elif t == F.CLOSE:
                    c = codec.decode_close(payload)
                    if c.kind == "S":
                        self._statements.pop(c.name, None)
                    else:
                        self._portals.pop(c.name, None)
                    expect.append(_EXPECT_CLOSE)
                elif t in (F.FLUSH, F.COPY_DATA, F.COPY_DONE, F.COPY_FAIL):
                    pass
                elif t == F.TERMINATE:
                    self._forward_parts(changed, raw, msgs[: i + 1])
                    self._close_client()
                    return
                elif t == F.FUNCTION_CALL:
                    # Calls a function by OID, bypassing SQL and therefore every rule.
                    replacement = self._refuse_simple(
                        b"", codec.error_response(SqlState.INSUFFICIENT_PRIVILEGE,
                                                  "pgwarden: the FunctionCall protocol message is not allowed"),
                        now, kind=_F)
                else:
                    self._fatal(SqlState.PROTOCOL_VIOLATION, f"invalid frontend message type {t}")
                    return
            except _Suspend as s:
                self._forward_parts(changed, None, msgs[:i])
                self._held = list(msgs[i:])
                self._wait_for_guard(s.check)
                return
            if replacement is not None:
                if changed is None:
                    changed = [codec.message(tt, pp) for tt, pp in msgs[:i]]
                changed.append(replacement)
            elif changed is not None:
                changed.append(codec.message(t, payload))
        self._forward_parts(changed, raw, msgs)

    def _forward_parts(self, changed: list[bytes] | None, raw: bytes | None, msgs: list[tuple[int, bytes]]) -> None:
        t = self.up_transport
        if t is None or t.is_closing():
            return
        if changed is not None:
            t.write(b"".join(changed))
        elif raw is not None:
            t.write(raw)
        else:
            t.write(b"".join([codec.message(tt, pp) for tt, pp in msgs]))

    def _decode(self, sql: bytes) -> str:
        """Statement text as the server will read it. Bytes that do not decode are noted: for a
        restricted role such a statement is refused, since what pgwarden parsed would not be
        what the server runs (a multibyte trail byte can be a backslash or a quote)."""
        try:
            self._undecodable = False
            return sql.decode(self.encoding)
        except UnicodeDecodeError:
            self._undecodable = True
            return sql.decode(self.encoding, "replace")

    def _on_query(self, payload: bytes, now: float) -> bytes | None:
        sql = payload[:-1] if payload.endswith(b"\x00") else payload
        if b"\x00" in sql:
            self._fatal(SqlState.PROTOCOL_VIOLATION, "invalid Query message")
            return None
        text = self._decode(sql)
        runs: list[Run] = []
        parts = split_statements(text)
        rewritten = False
        for i, part in enumerate(parts):
            if part[:3].upper() == "SET":
                pinned = self._pin_application_name(part)
                if pinned is not None:
                    parts[i] = part = pinned
                    rewritten = True
        if len(parts) > 1 and sum(_MENTIONS_OWN(p) is not None and _SET_OR_RESET.match(p) is not None
                                  for p in parts) > 1:
            # Each is checked with the state store while the Query waits; one per Query keeps that finite.
            return self._refuse_simple(sql, codec.error_response(
                SqlState.INSUFFICIENT_PRIVILEGE, "pgwarden: one SET pgwarden.ticket / pgwarden.emergency per query"),
                now, decision=refuse("pgwarden: one SET pgwarden.* per query"))
        for i, part in enumerate(parts):
            mentions = _MENTIONS_OWN(part) is not None
            own = _OWN_SET.fullmatch(part) if mentions else None
            if own is not None or (mentions and _SET_OR_RESET.match(part) is not None):
                d = self._own_setting(own, part)
                if d.action == "allow":
                    parts[i] = "RESET pgwarden.noop" if own is not None and own.group(2) else \
                        "SET pgwarden.noop TO DEFAULT"
                    rewritten = True
            else:
                d = self._decide(part)
            if d.action == "refuse":
                # One refused statement refuses the whole Query (nothing of it runs).
                err = codec.error_response(d.sqlstate, d.message)
                return self._refuse_simple(sql, err, now, decision=d)
            if d.sql is not None:  # pgwarden's own text (always, for restricted roles: rules.pgconfirm)
                parts[i] = d.sql
                rewritten = True
            r = Run(d.redacted or part, d)
            r.start = now
            runs.append(r)
        if self.server.guards.store is not None:
            wants = [self._rows_wanted(part, r.decision) for r, part in zip(runs, parts)]
            guests = [lk.value for r in runs if r.decision is not None for lk in r.decision.lookups]
            if guests or any(wants):
                refusal = self._guard_verdict(guests, sum(wants))
                if refusal is not None and self._cap_retry is None and self._last_left > 0 \
                        and sum(1 for w in wants if w) == 1 and all(
                            r.decision is not None and r.decision.action == "rewrite" for r, w in zip(runs, wants) if w):
                    # Fewer rows are left than the cap: decide the read again with what is left as its cap,
                    # rather than refuse a statement that may well fit.
                    self._cap_retry = self._last_left
                    return self._on_query(payload, now)
                self._cap_retry = None
                if refusal is not None:
                    out = self._refuse_simple(sql, codec.error_response(refusal.sqlstate, refusal.message), now,
                                              decision=refusal)
                    self._expect[-1].runs[0].guard = self._take_guard()  # type: ignore[index]
                    return out
                runs[0].guard = self._take_guard()
                reserved, self._last_reserved = self._last_reserved, None
                if reserved is not None:
                    for r, w in zip(runs, wants):
                        r.reserved = (reserved[0], w) if w else None
        self._cap_retry = None
        if not runs:
            runs = [Run()]
            runs[0].start = now
        e = Expect(_Q, runs)
        if not self._expect:
            e.rows0 = self._scanner.rows
        self._expect.append(e)
        if rewritten:
            # A newline before each ";": a part may end in a -- comment that would swallow it.
            return codec.query_message("\n;\n".join(parts).encode(self.encoding, "replace"))
        return None

    def _decide(self, text: str) -> Decision:
        engine = self.server.engine
        guards = self.server.guards
        if self._scope is not None:
            self._check_scope()
        if guards.store is not None and self.principal is not None:
            blocked = guards.block(self.principal, engine.restricted(self.principal))
            if blocked is not None:
                return refuse(blocked[0], reason=blocked[1])
        problem = self._encoding_problem or self._scs_problem or (
            f"the statement is not valid {self.parameters.get('client_encoding', 'UTF8')} text"
            if self._undecodable else None)
        if problem is not None and engine.restricted(self.principal):
            return refuse(f"pgwarden: {problem}; statement refused")
        # --- audit log failing (issue 6): restricted roles never run unlogged statements ---
        if self.server.audit.refusing and engine.restricted(self.principal):
            return self._audit_refusal()
        d = self._analysed(text)
        reading = d.reading
        if reading is not None and reading.search_path is not None and self.tx_status != "I":
            return refuse("pgwarden: SET search_path only outside a transaction block (pgwarden follows the "
                          "session's path, and a rollback would undo it)", reason="search_path in a transaction")
        if self._scope is not None and d.action == "rewrite" and d.tables and reading is not None and (
                "PrepareStmt" in reading.kinds or reading.hold):
            # They would outlive the ticket; the protocol's prepared statements are checked when they run.
            return refuse("pgwarden: under a ticket or break-glass, SQL PREPARE and cursors WITH HOLD of protected "
                          "tables are refused (they would outlive it)", reason="would outlive the ticket")
        if guards.store is not None and d.action == "rewrite" and d.tables and reading is not None \
                and "PrepareStmt" in reading.kinds:
            grants, _ = engine.grants(self.principal)
            if grants is not None and (grants.row_budget or grants.guest_lookups):
                # Its EXECUTEs could not be counted: the protocol's own prepared statements can.
                return refuse(f"pgwarden: role {grants.role} has row budgets or lookup quotas, so SQL PREPARE of "
                              "protected tables is refused; prepare through the protocol (Parse/Bind) instead",
                              reason="uncounted PREPARE")
        return d

    def _analysed(self, text: str) -> Decision:
        """The engine's decision; a large uncached one is analysed in a worker process while this
        session's messages wait (DESIGN: an analysis never blocks other sessions)."""
        engine = self.server.engine
        limits = self.server.config.analysis
        restricted = engine.restricted(self.principal)
        if restricted and len(text) > limits.max_statement_bytes:
            return refuse(f"pgwarden: the statement is {len(text)} characters long, more than the "
                          f"{limits.max_statement_bytes} allowed for restricted roles (analysis.max_statement_bytes); "
                          "split it or use a table of values", reason="statement too large")
        got = engine.prepare(self._capped_principal() if self._cap_retry else self.principal, text, self.catalog,
                             self._context)
        if isinstance(got, Decision):
            return got
        if len(text) <= limits.offload_bytes:
            return engine.finish(got, engine.run(got))
        done, self._verdict = self._verdict, None
        if isinstance(done, _Analysed) and done.text == text:
            return engine.finish(got, done.decision)
        raise _Suspend(self._offload(text, got))

    async def _offload(self, text: str, job: Any) -> _Analysed:
        return _Analysed(text, await self.server.analysis.run(job))

    def _audit_refusal(self) -> Decision:
        return refuse(AUDIT_FAILING, reason=f"audit log cannot be written: {self.server.audit.failure}")

    def _pin_application_name(self, stmt: str) -> str | None:
        """SET application_name = 'x' -> SET application_name = 'person/x' (None: not such a SET)."""
        m = _SET_APPNAME.fullmatch(stmt)
        if m is None:
            if "application_name" in stmt.lower():
                # Any other spelling is not recognised: keep it from reaching the server unpinned.
                return "SET application_name = " + _quote_literal(self._app_prefix(""))
            return None
        value = m.group(1).replace("''", "'") if m.group(1) is not None else (m.group(3) or "")
        if m.group(2):
            value = self.principal.application if self.principal else ""
        if self._audit_base:
            self._audit_base["application"] = value  # later events name the application the client set
        return "SET application_name = " + _quote_literal(self._app_prefix(value))

    def _app_prefix(self, app: str) -> str:
        user = self.principal.user if self.principal else ""
        return f"{user}/{app}" if app else user

    def _on_parse(self, payload: bytes) -> bytes | None:
        msg = codec.decode_parse(payload)
        text = self._decode(msg.sql)
        pinned = self._pin_application_name(text) if text.lstrip()[:3].upper() == "SET" else None
        if pinned is not None:
            text = pinned
            msg_sql = pinned.encode(self.encoding, "replace")
            rest = payload[len(msg.name) + 1 + len(msg.sql) + 1:]
            payload = msg.name + b"\x00" + msg_sql + b"\x00" + rest
        mentions = _MENTIONS_OWN(text) is not None
        own = _OWN_SET.fullmatch(text) if mentions else None
        if own is not None or (mentions and _SET_OR_RESET.match(text) is not None):
            d = self._own_setting(own, text)
            if d.action == "allow" and own is not None:
                d = Decision("rewrite", sql="RESET pgwarden.noop" if own.group(2) else "SET pgwarden.noop TO DEFAULT")
        else:
            d = self._decide(text)
        if d.sql is not None and d.action != "refuse":
            rest = payload[len(msg.name) + 1 + len(msg.sql) + 1:] if pinned is None else rest
            payload = msg.name + b"\x00" + d.sql.encode(self.encoding, "replace") + b"\x00" + rest
            pinned = d.sql  # the payload changed: forward the new one
        if d.redacted:
            text = d.redacted  # what the audit log may show from here on
        if d.action == "refuse":
            self._statements[msg.name] = (text, d)
            err = codec.error_response(d.sqlstate, d.message)
            self._expect.append(Expect(_P, [Run(text, d)], refusal=err, sql=text))
            poison = msg.name + b"\x00" + POISON_SQL + b"\x00\x00"
            return codec.message(F.PARSE, poison)
        self._statements[msg.name] = (text, d, msg.param_types) if d.lookups else (text, d)
        if self._scope is not None:
            self._stmt_epoch[msg.name] = self._scope_epoch  # widened by the scope: valid while it lasts
        elif self._stmt_epoch:
            self._stmt_epoch.pop(msg.name, None)
        self._expect.append(Expect(_P, sql=text))
        return codec.message(F.PARSE, payload) if pinned is not None else None

    def _refuse_simple(self, sql: bytes, error: bytes, now: float, *, decision: Decision | None = None,
                       kind: int = _Q) -> bytes:
        run = Run(decision.redacted if decision is not None and decision.redacted else self._decode(sql), decision)
        run.start = now
        self._expect.append(Expect(kind, [run], refusal=error))
        return codec.query_message(POISON_SQL[:-1])

    # --- tickets and break-glass (R4) ---------------------------------------------------------

    def _own_setting(self, m: re.Match[str] | None, text: str) -> Decision:
        """SET pgwarden.ticket / pgwarden.emergency: checked with the state store, never forwarded."""
        if m is None:
            return refuse("pgwarden: write SET pgwarden.ticket = 'T-...', SET pgwarden.emergency = 'why', or "
                          "RESET pgwarden.ticket")
        if self.server.guards.store is None:
            return refuse("pgwarden: tickets and break-glass need the guard state store, and none is configured")
        if self.server.audit.refusing and self.server.engine.restricted(self.principal):
            return self._audit_refusal()
        name, value = m.group(3).lower(), m.group(4)
        if self.tx_status != "I":
            # A transaction could roll the SET back while pgwarden kept it: outside transactions only.
            return refuse("pgwarden: set or reset pgwarden.ticket / pgwarden.emergency outside a transaction block")
        if m.group(2) or m.group(5) or value is None:  # RESET / TO DEFAULT: back to the role's own grants
            self._set_scope(None, "")
            return Decision("allow")
        value = value.replace("''", "'")
        if self._scope is not None and text == self._scope_source:
            return Decision("allow")  # the same statement again, after a guard wait: already applied
        verdict, self._verdict = self._verdict, None
        if not isinstance(verdict, _ScopeVerdict):  # each answer belongs to the question that asked it
            raise _Suspend(self._scope_check(name, value))
        if verdict.scope is None:
            return refuse(verdict.message, reason="ticket refused")
        self._set_scope(verdict.scope, text)
        return Decision("allow")

    async def _scope_check(self, name: str, value: str) -> Any:
        from proxy.guards.ticketstore import TicketError

        try:
            return _ScopeVerdict(await self._open_scope(name, value), "")
        except TicketError as exc:
            return _ScopeVerdict(None, f"pgwarden: {exc}")
        except Exception as exc:  # noqa: BLE001 - fail closed
            return _ScopeVerdict(None, f"pgwarden: the ticket cannot be checked ({type(exc).__name__}); refused")

    async def _open_scope(self, name: str, value: str) -> Any:
        from rules.model import effective_role

        from proxy.guards.ticketstore import TicketError, scope_of, start_emergency

        store = self.server.guards.store
        assert store is not None and self.principal is not None
        if not store.healthy:
            raise TicketError(f"the guard state store cannot be reached ({store.problem})")
        pool = store._require()
        if name == "ticket":
            return await scope_of(pool, store.schema, value.strip(), self.principal.user)
        rules = self.server.engine.rules
        role, _ = effective_role(rules, self.principal) if rules is not None else (None, "")
        if role is None or not role.emergency_tables:
            raise TicketError(f"role {self.principal.role} has no break-glass scope in the rules")
        return await start_emergency(pool, store.schema, self.principal.user, role.name, value, role.emergency_hours,
                                     role.emergency_tables)

    async def _startup_scope(self, name: str, value: str) -> str | None:
        """A ticket given in the connection string (options=-c pgwarden.ticket=T-...)."""
        from proxy.guards.ticketstore import TicketError

        if self.server.guards.store is None:
            return "pgwarden: tickets and break-glass need the guard state store, and none is configured"
        try:
            scope = await self._open_scope(name, value)
        except TicketError as exc:
            return f"pgwarden: {exc}"
        self._set_scope(scope, f"startup {name}")
        return None

    def _set_scope(self, scope: Any, source: str) -> None:
        """Use a ticket's (or break-glass) scope from the next statement on, or stop using one."""
        import dataclasses

        from rules.model import SCOPE_ATTRIBUTE

        p = self.principal
        assert p is not None
        old = self._scope
        self._scope, self._scope_source = scope, source
        self._scope_epoch += 1  # statements prepared under the old scope stop here
        attrs = {k: v for k, v in p.attributes.items() if k != SCOPE_ATTRIBUTE}
        if scope is not None:
            attrs[SCOPE_ATTRIBUTE] = scope
        self.principal = dataclasses.replace(p, attributes=attrs)
        for key in ("ticket", "emergency"):
            self._audit_base.pop(key, None)
        if scope is not None:
            self._audit_base["emergency" if scope.emergency else "ticket"] = scope.ticket
            self.server.audit.emit("emergency_started" if scope.emergency else "ticket_used", p,
                                   ticket=scope.ticket, expires_at=str(scope.expires_at), tables=list(scope.tables))
        elif old is not None:
            self.server.audit.emit("ticket_released", p, ticket=old.ticket)

    def _check_scope(self) -> None:
        """A ticket ends for the session when it expires or is closed (on any replica)."""
        from datetime import datetime, timezone

        scope = self._scope
        store = self.server.guards.store
        ended = scope.expires_at is not None and scope.expires_at <= datetime.now(timezone.utc)
        if ended or (store is not None and scope.ticket in store.closed_tickets):
            self._set_scope(None, "")

    def _capped_principal(self) -> Principal:
        """This person, with the rows left of their budget as the cap of the statement being decided."""
        import dataclasses

        from rules.model import CAP_ATTRIBUTE

        p = self.principal
        assert p is not None
        return dataclasses.replace(p, attributes={**p.attributes, CAP_ATTRIBUTE: self._cap_retry})

    def _stale_portal(self, portal: bytes) -> bool:
        """A portal of a statement prepared under a scope that has changed (reset, closed, expired) since."""
        if self._scope is not None:
            self._check_scope()
        ep = self._portal_epoch.get(portal)
        return ep is not None and ep != self._scope_epoch

    def _lookup_exempt(self) -> tuple[str, ...]:
        return tuple(self._scope.guests) if self._scope is not None else ()

    # --- guards that wait for the state store (R3.4) ------------------------------------------

    def _rows_wanted(self, text: str, d: Decision | None, max_rows: int = 0) -> int:
        """Rows a statement may return, to reserve from the person's row budget (0: nothing to reserve).

        Reads of protected tables may return up to the row cap (the rewritten SQL refuses more);
        a FETCH from a cursor declared over them, up to its count. A DECLARE returns nothing itself.
        """
        grants, _ = self.server.engine.grants(self.principal) if self.principal else (None, "")
        if grants is None or not grants.row_budget or not grants.row_cap:
            return 0
        cap = min(grants.row_cap, self._cap_retry) if self._cap_retry else grants.row_cap
        if d is not None and d.action == "rewrite" and d.tables:
            # Classified on pgwarden's own regenerated text (no comments), never on the client's.
            if d.sql is not None and d.reading is not None and "DeclareCursorStmt" in d.reading.kinds:
                name = declared_cursor(d.sql)
                if name is not None:
                    self._cursors[name] = max(1, d.records_per_row)
                return 0
            # anything else may return up to the cap (in records: rows x the records one row carries)
            return min(max_rows * max(1, d.records_per_row), cap) if max_rows > 0 else cap
        if self._cursors:
            body = skip_comments(text)
            if body[:5].upper() == "FETCH":
                f = fetch_rows(body, cap)
                if f is None:
                    return cap  # a FETCH pgwarden cannot read: assume the most
                return min(f[1] * self._cursors[f[0]], cap) if f[0] in self._cursors else 0
            if body[:7].upper() == "EXECUTE" or body[:4].upper() == "MOVE":
                return cap
        return 0

    def _guard_verdict(self, guests: list[str | None], want: int) -> Decision | None:
        """None if the statement may go ahead; else the refusal. Suspends the first time it is asked."""
        verdict, self._verdict = self._verdict, None
        if verdict is None or isinstance(verdict, (_Analysed, _ScopeVerdict)):
            grants, _ = self.server.engine.grants(self.principal)
            if None in guests or (guests and not getattr(grants, "guest_lookups", None)):
                return refuse("pgwarden: a guest lookup could not be read; refused", reason="unreadable lookup")
            assert self.principal is not None
            raise _Suspend(self.server.guards.check(self.principal, grants, [g for g in guests if g is not None],
                                                    want, exempt=self._lookup_exempt()))
        self._last_guard = verdict.audit()
        self._last_reserved = verdict.reserved
        self._last_left = getattr(verdict, "left", 0)
        if verdict.allowed:
            return None
        return refuse(verdict.message, reason=verdict.reason or "guard refused")

    def _emit_event(self, event: str, fields: dict[str, Any]) -> None:
        """An event of this person's that is not a statement (a lockout the guards decided)."""
        self.server.audit.emit(event, self.principal, **fields)

    def _take_guard(self) -> dict[str, Any] | None:
        g, self._last_guard = self._last_guard, None
        return g

    def _with_params(self, st: tuple[Any, ...], payload: bytes) -> tuple[Any, ...]:
        """Keep a Bind's parameter values with its portal: the quota counts the guests they name."""
        try:
            bind = codec.decode_bind(payload)
        except codec.ProtocolError:
            return (st[0], st[1], None)
        formats = bind.param_formats
        types = st[2] if len(st) > 2 else ()
        values: dict[int, str | None] = {}
        for n, v in enumerate(bind.params, start=1):
            binary = (formats[0] if len(formats) == 1 else formats[n - 1] if len(formats) >= n else 0) == 1
            try:
                values[n] = decode_param(v, binary, types[n - 1] if len(types) >= n else 0)
            except ValueError:
                values[n] = None  # unreadable: the lookup is refused
        return (st[0], st[1], values)

    def _guard_execute(self, st: tuple[Any, ...] | None, max_rows: int, now: float) -> bytes | None:
        """Execute under the guards: lockouts and an unreachable store stop it here too (a statement
        parsed earlier must not outlive them); lookups and rows are counted first. A refused Execute
        is answered like a refused Parse, and the server skips to Sync."""
        assert self.principal is not None
        engine = self.server.engine
        guards = self.server.guards
        refusal: Decision | None = None
        blocked = guards.block(self.principal, engine.restricted(self.principal))
        if blocked is not None:
            refusal = refuse(blocked[0], reason=blocked[1])
        elif st is None or st[1] is None:
            grants, _ = engine.grants(self.principal)
            if grants is not None and (grants.guest_lookups or grants.row_budget):
                # A portal pgwarden did not see bound (a SQL cursor, a SQL-prepared statement): it
                # cannot be counted, so for a role with quotas or budgets it is not run.
                refusal = refuse(f"pgwarden: role {grants.role} may Execute only statements prepared through the "
                                 "protocol (Parse/Bind); read SQL cursors with FETCH", reason="uncounted portal")
        else:
            d: Decision = st[1]
            params = st[2] if len(st) > 2 else None
            guests = [lk.value if lk.param is None else _param_key((params or {}).get(lk.param), lk.integer)
                      for lk in d.lookups]
            want = self._rows_wanted(st[0], d, max_rows)
            if guests or want:
                refusal = self._guard_verdict(guests, want)
        if refusal is None:
            return None
        return self._refuse_execute(st[0] if st is not None else "", refusal, now, self._take_guard())

    def _refuse_execute(self, text: str, refusal: Decision, now: float, guard: dict[str, Any] | None = None) -> bytes:
        """A refused Execute: a Parse that fails stands in for it, so the server skips to Sync as for any error."""
        err = codec.error_response(refusal.sqlstate, refusal.message)
        run = Run(text, refusal)
        run.start = now
        run.guard = guard
        self._expect.append(Expect(_P, [run], refusal=err, sql=text))
        return codec.message(F.PARSE, b"pgwarden_refused\x00" + POISON_SQL + b"\x00\x00")

    def _wait_for_guard(self, check: Any) -> None:
        """Hold the client's messages until the state store answers, then go on where we stopped."""
        if self.transport is not None and not self._client_paused:
            self.transport.pause_reading()

        async def wait() -> None:
            try:
                verdict = await check
            except Exception as exc:  # noqa: BLE001 - fail closed
                from proxy.guards.checks import Verdict

                verdict = Verdict(False, f"pgwarden: the guard check failed ({type(exc).__name__}); refused")
            if self.closed:
                return
            held, self._held = self._held or [], None
            if self.transport is not None and not self._client_paused:
                self.transport.resume_reading()
            # The answer belongs to the message that asked (the head) and to no other.
            self._verdict = verdict
            self._handle_client(held[:1], None)
            if self._verdict is verdict:  # not asked again (a lockout or a reload came in between)
                self._verdict = None
                reserved = getattr(verdict, "reserved", None)
                if reserved is not None and self.principal is not None:
                    self.server.guards.give_back(self.principal, reserved, 0)
            if self._held is not None:  # the head waits again: the rest stays behind it
                self._held.extend(held[1:])
            elif len(held) > 1:
                self._handle_client(held[1:], None)

        self.server.spawn(wait())

    # --- relay: server -> client ------------------------------------------------------------

    def on_upstream_data(self, data: bytes) -> None:
        try:
            self._relay_upstream(data)
        except Exception as exc:  # noqa: BLE001 - never a traceback on the transport
            self._internal_error("server message", exc)

    def _relay_upstream(self, data: bytes) -> None:
        try:
            out, events = self._scanner.feed(data)
        except codec.ProtocolError as exc:
            self._fatal(SqlState.PROTOCOL_VIOLATION, f"pgwarden: invalid message from the server: {exc}")
            return
        pieces: list[bytes] | None = None
        last = 0
        for t, payload, rows, start, end in events:
            replace = self._on_backend(t, payload, rows)
            if replace is not None:
                if pieces is None:
                    pieces = []
                pieces.append(out[last:start])
                pieces.append(replace)
                last = end
        if self.transport is None or self.transport.is_closing():
            return
        if pieces is None:
            if out:
                self.transport.write(out)
        else:
            pieces.append(out[last:])
            self.transport.write(b"".join(pieces))

    def _on_backend(self, t: int, payload: bytes, rows: int) -> bytes | None:
        """Advance the expectation queue; return bytes to send instead of this message, if any."""
        expect = self._expect
        if t == _M_COMPLETE or t == _M_EMPTY or t == _M_SUSPENDED:
            if not expect:
                return None
            head = expect[0]
            if head.kind == _Q:
                runs = head.runs
                assert runs is not None
                if head.index >= len(runs):
                    runs.append(Run())
                    runs[-1].start = runs[0].start
                run = runs[head.index]
                head.index += 1
                slip = self._finish(run, "ok", _tag_facts(payload) if t == _M_COMPLETE else None, rows - head.rows0)
                head.rows0 = rows
                if head.index < len(runs):
                    runs[head.index].start = time.perf_counter()
            elif head.kind == _E:
                expect.popleft()
                slip = self._finish(head.runs[0], "suspended" if t == _M_SUSPENDED else "ok",  # type: ignore[index]
                                    _tag_facts(payload) if t == _M_COMPLETE else None, rows - head.rows0)
            else:
                return None
            return None if slip is None else slip + codec.message(t, payload)  # the receipt, then this message
        if t == _M_READY:
            self.tx_status = chr(payload[0]) if payload else "I"
            if self._path_pending is not None and self.tx_status == "I":
                self._follow_search_path(self._path_pending)
            if expect and expect[0].kind in (_S, _Q, _F):
                expect.popleft()
            if expect:
                expect[0].rows0 = rows
            return None
        if t in _M_DONE:
            if expect:
                expect.popleft()
                if expect:
                    expect[0].rows0 = rows
            return None
        if t == _M_ROWDESC or t == _M_NODATA:
            if expect and expect[0].kind == _D:
                expect.popleft()
                if expect:
                    expect[0].rows0 = rows
            return None
        if t == _M_ERROR:
            return self._on_error(payload)
        if t == B.PARAMETER_STATUS:
            ps = codec.decode_parameter_status(payload)
            self._track_parameter(ps.name, ps.value)
            return None
        if t == B.FUNCTION_CALL_RESPONSE:
            return None
        return None

    def _follow_search_path(self, path: tuple[str, ...]) -> None:
        """A SET search_path took effect (its transaction ended without an error): resolve names with it."""
        self._path_pending = None
        if path == ():
            self._context.pop("search_path", None)
            if self._startup_path is not None:
                self._context["search_path"] = self._startup_path
        else:
            user = self.server.config.upstream.user
            self._context["search_path"] = tuple(user if s == "$user" else s for s in path)

    def _on_error(self, payload: bytes) -> bytes | None:
        err = codec.decode_error(payload)
        self._path_pending = None  # a SET search_path before it is rolled back with its transaction
        if err.severity in ("FATAL", "PANIC"):
            self._upstream_fatal = True
        expect = self._expect
        if not expect:
            self.server.audit.emit("error", self.principal, sqlstate=err.sqlstate, error=mask_shapes(err.message))
            return None
        head = expect[0]
        refusal = head.refusal  # our own error, replacing the server's answer to the poison statement
        late: Decision | None = None  # a refusal PostgreSQL raised for us (row cap, row check)
        if refusal is None and ROW_CAP_MARKER in err.message:
            refusal = self._row_cap_error(row_cap_weight(err.message))
            late = refuse("row cap", reason="result larger than the role's row cap (R3.2)")
        elif refusal is None and ROW_CHECK_MARKER in err.message:
            refusal = self._row_check_error()
            late = refuse("row check", reason="new row outside the role's row filter")
        replacement = refusal
        if refusal is None and "D" in err.fields and self.server.engine.restricted(self.principal):
            # DETAIL can echo row values ("Key (id)=(...)", "Failing row contains (...)").
            replacement = codec.encode_error_fields({k: v for k, v in err.fields.items() if k != "D"})
        if head.kind in (_Q, _F):
            runs = head.runs or [Run()]
            if head.index < len(runs):
                run = runs[head.index]
                head.index = len(runs)  # the rest of the Query is not run
                if late is not None:
                    run.decision = late
                sent = max(self._scanner.rows - head.rows0, 0) if refusal is None else 0  # rows before the error
                self._finish(run, "refused" if refusal else "error", None, sent, None if refusal else err)
            return replacement
        # Extended protocol: the server now skips everything up to Sync.
        failed: Run | None = None
        while expect and expect[0].kind != _S:
            e = expect.popleft()
            if failed is None and e.kind == _E and e.runs:
                failed = e.runs[0]
        if failed is None:
            # Parse, Bind or Describe failed before any Execute of this batch.
            failed = Run(head.sql or "")
            failed.start = time.perf_counter()
        if late is not None:
            failed.decision = late
            self._finish(failed, "refused", None, 0, None)
        elif refusal is not None:
            failed.text = head.sql or ""
            if head.runs:
                failed.decision = head.runs[0].decision
            self._finish(failed, "refused", None, 0, None)
        else:
            self._finish(failed, "error", None, max(self._scanner.rows - head.rows0, 0), err)
        return replacement

    def _row_cap_error(self, weight: int = 1) -> bytes:
        """PostgreSQL refused the statement at the row cap the rewriter put in it: say so plainly.

        ``weight``: the records one row of it carries (rules.records); the cap counts records."""
        grants, _ = self.server.engine.grants(self.principal) if self.principal else (None, "")
        cap = getattr(grants, "row_cap", None)
        role = getattr(grants, "role", "")
        budget = " (or than is left of the row budget)" if getattr(grants, "row_budget", None) else ""
        what = f"{cap} rows" if weight <= 1 else \
            f"{cap} records (each of its rows carries {weight} records of protected tables)"
        return codec.error_response(
            SqlState.INSUFFICIENT_PRIVILEGE,
            f"pgwarden: the result has more than {what}, the row cap of role {role}{budget}; "
            "narrow the query (filters, LIMIT) or ask for a ticket")

    def _row_check_error(self) -> bytes:
        """PostgreSQL refused an INSERT at the row check the rewriter put in it: nothing was written."""
        grants, _ = self.server.engine.grants(self.principal) if self.principal else (None, "")
        role = getattr(grants, "role", "")
        return codec.error_response(
            SqlState.INSUFFICIENT_PRIVILEGE,
            f"pgwarden: role {role} may not write a row it could not read back (outside its row filter); "
            "nothing was written")

    def _track_parameter(self, name: str, value: str) -> None:
        """Follow what changes how the server reads statement text (the lexer must see what it sees)."""
        self.parameters[name] = value
        if name == "client_encoding":
            known = PG_ENCODINGS.get(value.upper())
            self.encoding = known or "utf-8"
            self._encoding_problem = None if value.upper() in SAFE_ENCODINGS else (
                f"client_encoding {value} cannot be decoded exactly as the server does; "
                "use UTF8, GBK, GB18030 or another encoding pgwarden knows")
        elif name == "standard_conforming_strings":
            self._scs_problem = None if value == "on" else (
                "standard_conforming_strings is off, so backslashes in strings would be read differently")

    def _finish(self, run: Run, outcome: str, tag: tuple[str, int | None] | None, rows: int,
                err: Any = None) -> bytes | None:
        """Write the statement's audit event. ``tag``: (type, rows) from its CommandComplete, if any.

        Returns the receipt notice to send the client before the CommandComplete, if the statement gets one.
        """
        if run.done:
            return None
        run.done = True
        self.statements += 1
        dur = (time.perf_counter() - run.start) * 1000.0 if run.start else 0.0
        text = run.text
        if tag is not None:
            stype, tag_rows = tag
            if tag_rows is not None and outcome != "suspended":
                rows = tag_rows
        else:
            stype = statement_type(text)
        fields: dict[str, Any] = {
            "statement_type": stype, "statement": text, "outcome": outcome, "rows": rows,
            "duration_ms": round(dur, 3),
        }
        if err is not None:
            fields["sqlstate"] = err.sqlstate
            fields["error"] = mask_shapes(err.message)  # PostgreSQL's messages echo literals (R2.4)
        d = run.decision
        slip: bytes | None = None
        if d is not None and d.reading is not None and d.reading.search_path is not None and outcome == "ok":
            self._path_pending = d.reading.search_path
        elif tag is not None and tag[0] == "ROLLBACK":
            self._path_pending = None
        if d is not None and d.action == "rewrite":
            fields["decision"] = "rewrite"
            fields["rewritten"] = d.redacted_sql if d.redacted else d.sql
            if d.tables:
                fields["tables"] = list(d.tables)
            if d.masked:
                fields["masked"] = list(d.masked)
            if d.hidden:
                fields["hidden"] = list(d.hidden)
            # --- receipt for a read of personal data (issue 6, R5.4) ---
            if stype == "SELECT" and (outcome == "ok" or outcome == "suspended") and (
                    d.masked or d.hidden or not protected_by(self.server.engine.rules).isdisjoint(d.tables)):
                fields["receipt"] = rid = new_receipt()
                slip = receipt_notice(receipt_text(rid, rows, d.tables, d.masked, d.hidden))
        if d is not None and d.value_hashes:
            fields["value_hashes"] = list(d.value_hashes)  # keyed hashes of the redacted literals (R2.4)
        if d is not None and d.flags:
            fields["flags"] = list(d.flags)
        if outcome == "refused" and d is not None:
            fields["sqlstate"] = d.sqlstate
            fields["reason"] = d.reason or d.message
        elif outcome == "refused":
            fields["sqlstate"] = SqlState.INSUFFICIENT_PRIVILEGE
        guards = self.server.guards
        if guards.store is not None and self.principal is not None:
            if run.guard is not None:
                fields["guard"] = run.guard
            if run.reserved is not None:
                guards.give_back(self.principal, run.reserved, self._records_sent(run, rows) if outcome != "refused"
                                 else 0)
            guards.after(self.principal, outcome == "refused", (d.reason or d.message) if d is not None else "",
                         self._emit_event)
        self.server.audit.emit_with("statement", self._audit_base, fields)
        if self.server.stats is not None:  # metrics: counted where the event is written
            self.server.stats.statement(outcome, d, dur / 1000.0, err.sqlstate if err is not None else None)
        return slip

    def _records_sent(self, run: Run, rows: int) -> int:
        """What a statement's rows cost the row budget: rows x the records one of them carries
        (the decision's, or for a FETCH the cursor's; rules.records)."""
        d = run.decision
        weight = d.records_per_row if d is not None else 1
        if self._cursors and run.text:
            body = skip_comments(run.text)
            if body[:5].upper() == "FETCH":
                f = fetch_rows(body, 1)
                if f is not None:
                    weight = self._cursors.get(f[0], weight)
        return rows * max(1, weight)

    # --- endings ------------------------------------------------------------------------------

    def _fatal(self, sqlstate: str, message: str) -> None:
        """A protocol violation: tell the client why, then close both sides."""
        self._send(codec.error_response(sqlstate, message, severity="FATAL"))
        self.server.audit.emit("protocol_error", self.principal, sqlstate=sqlstate, error=message)
        self._close_client()

    def _internal_error(self, where: str, exc: Exception) -> None:
        """A bug of pgwarden's while handling a message: end this session clearly, keep the others.

        The client gets a FATAL it can act on, the audit log one event; nothing else (no traceback).
        """
        if self.closed:
            return
        why = f"{type(exc).__name__}: {exc}"[:300]
        self._send(codec.error_response(SqlState.INTERNAL_ERROR,
                                        "pgwarden: internal error; the connection is closed (reported in the "
                                        "audit log as internal_error)", severity="FATAL"))
        self.server.audit.emit("internal_error", self.principal, where=where, error=why)
        self._close_client()

    def _close_client(self) -> None:
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
        if not self._upstream_fatal:
            self._send(codec.error_response(
                SqlState.CONNECTION_FAILURE,
                "pgwarden: the connection to the database server was lost; reconnect to continue",
                severity="FATAL"))
        self._abandon_runs("upstream_lost", SqlState.CONNECTION_FAILURE)
        self._close_client()

    def _abandon_runs(self, outcome: str, sqlstate: str) -> None:
        while self._expect:
            e = self._expect.popleft()
            for r in (e.runs or [])[e.index if e.kind == _Q else 0:]:
                if not r.done:
                    r.done = True
                    text = r.text
                    # The session's own fields (ticket or break-glass in force included), as for any statement.
                    self.server.audit.emit_with("statement", self._audit_base or principal_fields(self.principal), {
                        "statement_type": statement_type(text), "statement": text, "outcome": outcome,
                        "sqlstate": sqlstate, "rows": None,
                        "duration_ms": round((time.perf_counter() - r.start) * 1000.0, 3)})
                    if self.server.stats is not None:
                        self.server.stats.statement(outcome, r.decision, time.perf_counter() - r.start, sqlstate)

    def _teardown(self, client_gone: bool) -> None:
        busy = bool(self._expect)
        if busy and client_gone and self.up_pid and self.up_transport is not None and not self.up_transport.is_closing():
            # Stop the running query instead of letting it finish for nobody.
            cfg = self.server.config.upstream
            self.server.spawn(upstream.send_cancel(cfg, self.up_pid, self.up_secret))
        if busy:
            self._abandon_runs("client_disconnected", SqlState.CONNECTION_FAILURE)
        self._close_upstream()
        if self.key is not None:
            self.server.cancel_keys.pop(self.key, None)
        self.server.release(self)
        if self.principal is not None and self.relaying:
            self.server.audit.emit("disconnect", self.principal, statements=self.statements)

    def busy(self) -> bool:
        """Is the server still to answer something this client sent (a statement running)?"""
        return bool(self._expect)

    async def shutdown(self, linger: float = 1.0) -> None:
        """Server is stopping: tell the client, as PostgreSQL does on a fast shutdown.

        Closing a socket with unread client bytes makes the kernel send a reset, which can
        destroy the 57P01 before the client reads it: so end our side (FIN), read and drop
        whatever the client still sends, and close once it has gone (at most ``linger`` s).
        """
        t = self.transport
        self._send(codec.error_response(SqlState.ADMIN_SHUTDOWN,
                                        "terminating connection due to administrator command", severity="FATAL"))
        if t is None or t.is_closing() or self.closed:
            return
        self._on_client_data = self._discard  # type: ignore[method-assign]  # nothing more is relayed
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

    def _discard(self, data: bytes) -> None:
        pass
