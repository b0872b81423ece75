"""The accept loop: TLS context, connection admission, cancel routing, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import ssl
import sys
import threading
import time
from collections.abc import Coroutine
from typing import Any

from rules.engine import Engine

from proxy.net import upstream
from proxy.net.analysis_pool import AnalysisPool
from proxy.audit.log import AuditLog, default_replica
from proxy.config import Config
from proxy.guards.checks import Guards
from proxy.ops.metrics import Stats
from proxy.net.client import ClientSession

# sqlglot warns on stderr for every statement it falls back on ("unsupported syntax"): any client
# could flood the log that way. Its failures reach pgwarden as exceptions, and refusals as audit events.
logging.getLogger("sqlglot").setLevel(logging.ERROR)


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime_ns / 1e9
    except OSError:
        return -1.0


def make_ssl_context(cert: str, key: str, client_ca: str | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if client_ca:
        # Asked, not required: people bound to a certificate are refused without one (at login).
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.load_verify_locations(client_ca)
    return ctx


class Server:
    """Accepts clients and owns what sessions share: config, engine, audit log, cancel keys."""

    def __init__(self, config: Config, *, engine: Engine | None = None, audit: AuditLog | None = None) -> None:
        self.config = config
        if engine is None:
            rules = None
            if config.rules_path:
                from rules.model import load_rules

                rules = load_rules(config.rules_path)  # ConfigError (file:line) stops the start
            engine = Engine(rules, max_tokens=config.analysis.max_tokens, value_key=config.audit_value_key)
        self.engine = engine
        self.analysis = AnalysisPool(config.analysis)  # large uncached analyses, off the event loop
        self._catalogs: dict[str, Any] = {}
        self._rules_mtime: tuple[float, ...] = ()
        self._catalog_locks: dict[str, asyncio.Lock] = {}
        self.audit = audit or AuditLog(config.audit_path, on_failure=config.audit_on_failure,
                                       replica=config.audit_replica or default_replica(config.listen_port),
                                       key=config.audit_key, write_ahead=config.audit_write_ahead)
        store = None
        if config.state is not None:
            from proxy.guards.statestore import StateStore

            store = StateStore(config.state, replica=f"{config.listen_host}:{config.listen_port}",
                               log=lambda event, fields: self.audit.emit(event, None, **fields))
        self.guards = Guards(store, lambda: self.engine.rules, self.spawn)
        self.anchorer: Any = None  # proxy.audit.anchors.Anchorer: chain heads into the state store
        if store is not None and config.audit_path != "-":
            from proxy.audit.anchors import Anchorer

            self.anchorer = Anchorer(self.audit, store._require, store.schema, every_events=config.audit_anchor_every,
                                     every_seconds=config.audit_anchor_seconds)
        self.ssl_context = make_ssl_context(config.tls.cert, config.tls.key, config.tls.client_ca) \
            if config.tls else None
        self.sessions: set[ClientSession] = set()
        self.connected_at: dict[ClientSession, float] = {}  # for the admin console's SHOW CLIENTS
        self.cancel_keys: dict[tuple[int, bytes], ClientSession] = {}
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.port = config.listen_port
        # Counters for /metrics; None (and not counted at all) when no metrics listener is configured.
        self.stats: Stats | None = Stats() if config.metrics_listen else None
        self.guards.stats = self.stats
        self._cache_base = {"exact": 0, "template": 0, "misses": 0}  # from engines replaced by reloads
        self.http: Any = None  # HttpEndpoints when metrics.listen is set
        self.draining = False
        self._closing: set[ClientSession] = set()  # sessions told 57P01, waiting for their client to go
        self.reuse_port = False  # --workers: every worker listens on the same port
        self.peers: list[str] = []  # --workers: the other workers' unix sockets, for foreign cancel requests
        self.cancel_socket: str | None = None
        self._cancel_server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: ClientSession(self), self.config.listen_host, self.config.listen_port, reuse_address=True,
            reuse_port=self.reuse_port or None, backlog=1024,
        )
        sock = self._server.sockets[0]
        self.port = sock.getsockname()[1]
        self.audit.bind_loop(loop)
        loop.set_exception_handler(self._loop_error)
        if self.config.rules_path:
            self.spawn(self.watch_rules())
        if self.guards.store is not None:
            # Restricted roles are refused until the store answers; give it a moment at start.
            await self.guards.store.start(wait=self.config.state.connect_timeout if self.config.state else 5)
        if self.anchorer is not None:
            self.anchorer.start()
        if self.config.tls:
            self.spawn(self.watch_tls())
        if self.cancel_socket:
            self._cancel_server = await asyncio.start_unix_server(self._on_peer_cancel, self.cancel_socket)
        if self.config.metrics_listen:
            from proxy.ops.http import HttpEndpoints
            from proxy.ops.metrics import make_registry

            assert self.stats is not None
            registry = make_registry(self.stats, lambda: len(self.sessions), self.cache_counts)
            self.http = HttpEndpoints(registry, self.readiness)
            host, port = self.config.metrics_listen
            await self.http.start(host, port)

    def _loop_error(self, _loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """Last line of defence: an exception nobody caught becomes one rate-limited stderr line, never a
        traceback (any logged-in user could otherwise flood the log with them)."""
        from proxy.ops.stderr import say

        exc = context.get("exception")
        where = type(exc).__name__ if exc is not None else "error"
        msg = str(context.get("message", ""))[:200]
        say(f"loop:{where}:{msg}", f"pgwarden: internal error ({where}: {str(exc)[:200] if exc else msg}); "
                                   "the connection concerned is closed")

    def cache_counts(self) -> dict[str, int]:
        """Decision-cache counters of the current engine plus those of engines replaced by reloads."""
        e = self.engine
        b = self._cache_base
        return {"exact": b["exact"] + e.cache_hits, "template": b["template"] + e.template_hits,
                "misses": b["misses"] + e.cache_misses}

    async def readiness(self) -> tuple[bool, str]:
        """Ready: accepting, rules loaded (when configured) and the upstream answering."""
        from proxy.ops.http import probe_postgres

        if self.draining:
            return False, "shutting down"
        if self.config.rules_path and not self.engine.enforcing:
            return False, "rules not loaded"
        if self.guards.store is not None and not self.guards.store.healthy:
            return False, "guard state store unreachable"
        why = await probe_postgres(self.config.upstream.host, self.config.upstream.port)
        if why is not None:
            return False, why
        return True, "ready"

    async def serve_forever(self) -> None:
        assert self._server is not None
        await self._server.serve_forever()

    def reload_rules(self) -> bool:
        """Load the rules file again; new rules apply to every session's next statement.

        Invalid rules are refused with their file:line errors and the old rules stay; no
        connection is dropped either way.
        """
        path = self.config.rules_path
        if not path:
            return False
        from rules.model import load_rules

        from proxy.config import ConfigError

        try:
            rules = load_rules(path)
        except ConfigError as exc:
            self.audit.emit("rules_reload_failed", None, path=path, error=str(exc))
            print(f"pgwarden: rules NOT reloaded, the old rules stay: {exc}", file=sys.stderr, flush=True)
            if self.stats is not None:
                self.stats.reloads["failed"] += 1
            return False
        old = self.engine
        for k, v in (("exact", old.cache_hits), ("template", old.template_hits), ("misses", old.cache_misses)):
            self._cache_base[k] += v
        self.engine = Engine(rules, max_tokens=self.config.analysis.max_tokens,
                             value_key=self.config.audit_value_key)
        if self.stats is not None:
            self.stats.reloads["ok"] += 1
        self.forget_catalogs()  # a reload is also how a DBA makes pgwarden see new tables (new sessions)
        self._rules_mtime = self._rules_stamp()
        self.audit.emit("rules_reloaded", None, path=path, roles=len(rules.roles), tables=len(rules.tables))
        return True

    def _rules_stamp(self) -> tuple[float, ...]:
        """Modification times of the rules file and every file it includes."""
        rules = getattr(self.engine, "rules", None)
        files = getattr(rules, "sources", ()) or (self.config.rules_path,)
        return tuple(_mtime(f) for f in files if f)

    async def watch_rules(self, interval: float = 2.0) -> None:
        """Reload when the rules file (or a file it includes) changes on disk (SIGHUP does it at once)."""
        if not self.config.rules_path:
            return
        self._rules_mtime = self._rules_stamp()
        while True:
            await asyncio.sleep(interval)
            m = self._rules_stamp()
            if m != self._rules_mtime:
                self._rules_mtime = m
                self.reload_rules()

    async def watch_tls(self, interval: float = 2.0) -> None:
        """Reload the certificate when its files change (a renewal by cert-manager or certbot)."""
        tls = self.config.tls
        if tls is None:
            return
        seen = (_mtime(tls.cert), _mtime(tls.key))
        while True:
            await asyncio.sleep(interval)
            now = (_mtime(tls.cert), _mtime(tls.key))
            if now != seen:
                seen = now
                self.reload_tls()

    async def catalog_for(self, database: str) -> Any:
        """The catalog snapshot of one database, read once with the service login and shared."""
        cat = self._catalogs.get(database)
        if cat is not None:
            return cat
        lock = self._catalog_locks.setdefault(database, asyncio.Lock())
        async with lock:
            cat = self._catalogs.get(database)
            if cat is None:
                cat = await load_catalog_for(self.config, database)
                self._catalogs[database] = cat
        return cat

    def forget_catalogs(self) -> None:
        """Read catalogs afresh on next use (after DDL upstream, or a reload)."""
        self._catalogs.clear()

    def reload_tls(self) -> bool:
        """Read the certificate and key again; new TLS handshakes use them, open ones keep theirs.

        A broken pair (a half-copied renewal) is refused and the old context stays.
        """
        tls = self.config.tls
        if tls is None:
            return False
        try:
            ctx = make_ssl_context(tls.cert, tls.key, tls.client_ca)
        except (OSError, ssl.SSLError) as exc:
            self.audit.emit("tls_reload_failed", None, cert=tls.cert, error=str(exc))
            print(f"pgwarden: TLS certificate NOT reloaded, the old one stays: {exc}", file=sys.stderr, flush=True)
            if self.stats is not None:
                self.stats.tls_reloads["failed"] += 1
            return False
        self.ssl_context = ctx
        self.audit.emit("tls_reloaded", None, cert=tls.cert)
        if self.stats is not None:
            self.stats.tls_reloads["ok"] += 1
        return True

    def reload(self) -> None:
        """SIGHUP: rules and TLS material."""
        self.reload_rules()
        self.reload_tls()

    def admit(self, session: ClientSession) -> bool:
        if self.stats is not None:
            self.stats.accepted += 1
        if len(self.sessions) >= self.config.max_connections:
            return False
        self.sessions.add(session)
        self.connected_at[session] = time.time()
        return True

    def release(self, session: ClientSession) -> None:
        self.sessions.discard(session)
        self.connected_at.pop(session, None)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run a background task whose failure must not take the server down."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def cancel(self, pid: int, secret: bytes, *, from_peer: bool = False) -> None:
        """Route a client's CancelRequest to the upstream backend it belongs to.

        With several workers the kernel hands a cancel connection to any of them: a key this
        worker did not issue is passed to the other workers, and only the one that issued it acts.
        """
        for (kpid, ksecret), session in list(self.cancel_keys.items()):
            if kpid == pid and hmac.compare_digest(ksecret, secret):
                if session.up_pid:
                    self.audit.emit("cancel", session.principal)
                    if self.stats is not None:
                        self.stats.cancels += 1
                    await upstream.send_cancel(self.config.upstream, session.up_pid, session.up_secret)
                return
        if not from_peer and self.peers and len(secret) == 4:
            self.audit.emit("cancel_forwarded", None, pid=pid, workers=len(self.peers))
            packet = pid.to_bytes(4, "big") + secret
            await asyncio.gather(*(self._tell_peer(p, packet) for p in self.peers))
        # Like PostgreSQL, an unknown key is ignored silently.

    @staticmethod
    async def _tell_peer(path: str, packet: bytes) -> None:
        try:
            async with asyncio.timeout(2):
                _, writer = await asyncio.open_unix_connection(path)
                writer.write(packet)
                await writer.drain()
                writer.close()
                await writer.wait_closed()
        except (OSError, TimeoutError):
            pass  # a worker being restarted: its sessions are gone with it anyway

    async def _on_peer_cancel(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(2):
                packet = await reader.readexactly(8)
            await self.cancel(int.from_bytes(packet[:4], "big"), packet[4:], from_peer=True)
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()
        self.draining = True

    async def drain(self, grace: float | None = None) -> None:
        """SIGTERM: stop accepting, let running statements finish within ``grace`` seconds, then
        close every session with 57P01 as PostgreSQL does; idle sessions are closed at once.

        A session whose statement is still running stops reading its client, so no new statement
        starts; it is closed as soon as the server has answered everything it was sent.
        """
        grace = self.config.shutdown_grace if grace is None else grace
        self.stop_accepting()
        self.audit.emit("shutdown", None, sessions=len(self.sessions), grace_s=grace)
        deadline = time.monotonic() + grace
        while True:
            for s in list(self.sessions):
                if s in self._closing:
                    continue
                if not s.relaying or not s.busy():
                    # Until the drain ends the socket stays half-open, so a client that is slow to
                    # send its next statement still reads the 57P01 instead of a reset.
                    self.spawn(self._close_session(s, max(0.1, deadline - time.monotonic())))
                else:
                    s.pause_client_reading()
            if not (self.sessions - self._closing) or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.02)
        await self.close()

    async def _close_session(self, s: ClientSession, linger: float) -> None:
        if s in self._closing:
            return
        self._closing.add(s)
        try:
            await s.shutdown(linger)
        finally:
            self._closing.discard(s)

    async def close(self, linger: float = 2.0) -> None:
        """Stop now: running statements are cancelled upstream, every client hears 57P01.

        ``linger``: how long a closed client may still send before its socket is dropped.
        """
        self.stop_accepting()
        running = [(s.up_pid, s.up_secret) for s in self.sessions if s.relaying and s.busy() and s.up_pid]
        await asyncio.gather(*(self._close_session(s, linger) for s in list(self.sessions)), return_exceptions=True)
        if running:  # after the clients heard 57P01: the statements' cancellations are nobody's business
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.gather(
                    *(upstream.send_cancel(self.config.upstream, pid, secret) for pid, secret in running),
                    return_exceptions=True), 3)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
        if self._cancel_server is not None:
            self._cancel_server.close()
        if self.http is not None:
            await self.http.close()
        self.analysis.close()
        for t in list(self._tasks):
            t.cancel()
        # Sessions closed above write their last events (disconnects) on their way out: wait for them.
        deadline = time.monotonic() + linger + 0.5
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self.audit.close()
        if self.anchorer is not None:  # the closing head (audit_closed), anchored before the store goes
            await self.anchorer.close()
        if self.guards.store is not None:
            with contextlib.suppress(Exception):
                await self.guards.store.close()


async def load_catalog_for(config: Config, database: str) -> Any:
    """Connect as the service user (its privileges decide how names resolve) and read the catalog."""
    import asyncpg

    from rules.catalog import load_catalog

    up = config.upstream
    ssl_arg: Any = False if up.sslmode == "disable" else ("require" if up.sslmode == "require" else "prefer")
    conn = await asyncpg.connect(host=up.host, port=up.port, user=up.user, password=up.password, database=database,
                                 ssl=ssl_arg, timeout=up.connect_timeout,
                                 server_settings={"application_name": "pgwarden catalog"})
    try:
        return await load_catalog(conn)
    finally:
        await conn.close()


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return asyncio.new_event_loop()


class ServerThread:
    """A server on its own event loop in a thread: pgwarden in-process for tests and the demo."""

    def __init__(self, config: Config, *, engine: Engine | None = None, audit: AuditLog | None = None) -> None:
        self.config = config
        self._engine = engine
        self._audit = audit
        self.loop = new_event_loop()
        self.server: Server | None = None
        self._thread = threading.Thread(target=self._run, name="pgwarden", daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.server = Server(self.config, engine=self._engine, audit=self._audit)
            self.loop.run_until_complete(self.server.start())
        except BaseException as exc:  # reported to the starting thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    def start(self) -> int:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        assert self.server is not None
        return self.server.port

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    def call(self, fn: Any, *args: Any) -> Any:
        """Run fn(*args) on the server's loop and wait for it (thread-safe access to server state)."""
        async def run() -> Any:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(30)

    def stop(self) -> None:
        if self.server is None or not self.loop.is_running():
            return
        fut = asyncio.run_coroutine_threadsafe(self.server.close(), self.loop)
        with contextlib.suppress(Exception):
            fut.result(15)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(15)
