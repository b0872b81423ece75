"""The accept loop: TLS context, connection admission, cancel routing, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import ssl
import sys
import threading
from collections.abc import Coroutine
from typing import Any

from rules.engine import Engine

from . import upstream
from .audit import AuditLog, default_replica
from .config import Config
from .guards import Guards
from .session import ClientSession


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime_ns / 1e9
    except OSError:
        return -1.0


def make_ssl_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
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
            engine = Engine(rules)
        self.engine = engine
        self._catalogs: dict[str, Any] = {}
        self._rules_mtime: tuple[float, ...] = ()
        self._catalog_locks: dict[str, asyncio.Lock] = {}
        self.audit = audit or AuditLog(config.audit_path, on_failure=config.audit_on_failure,
                                       replica=config.audit_replica or default_replica(config.listen_port))
        store = None
        if config.state is not None:
            from .statestore import StateStore

            store = StateStore(config.state, replica=f"{config.listen_host}:{config.listen_port}",
                               log=lambda event, fields: self.audit.emit(event, None, **fields))
        self.guards = Guards(store, lambda: self.engine.rules, self.spawn)
        self.ssl_context = make_ssl_context(config.tls.cert, config.tls.key) if config.tls else None
        self.sessions: set[ClientSession] = set()
        self.cancel_keys: dict[tuple[int, bytes], ClientSession] = {}
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.port = config.listen_port

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: ClientSession(self), self.config.listen_host, self.config.listen_port, reuse_address=True,
            backlog=1024,
        )
        sock = self._server.sockets[0]
        self.port = sock.getsockname()[1]
        self.audit.bind_loop(loop)
        if self.config.rules_path:
            self.spawn(self.watch_rules())
        if self.guards.store is not None:
            # Restricted roles are refused until the store answers; give it a moment at start.
            await self.guards.store.start(wait=self.config.state.connect_timeout if self.config.state else 5)

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

        from .config import ConfigError

        try:
            rules = load_rules(path)
        except ConfigError as exc:
            self.audit.emit("rules_reload_failed", None, path=path, error=str(exc))
            print(f"pgwarden: rules NOT reloaded, the old rules stay: {exc}", file=sys.stderr, flush=True)
            return False
        self.engine = Engine(rules)
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

    def admit(self, session: ClientSession) -> bool:
        if len(self.sessions) >= self.config.max_connections:
            return False
        self.sessions.add(session)
        return True

    def release(self, session: ClientSession) -> None:
        self.sessions.discard(session)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a background task whose failure must not take the server down."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def cancel(self, pid: int, secret: bytes) -> None:
        """Route a client's CancelRequest to the upstream backend it belongs to."""
        for (kpid, ksecret), session in list(self.cancel_keys.items()):
            if kpid == pid and hmac.compare_digest(ksecret, secret):
                if session.up_pid:
                    self.audit.emit("cancel", session.principal)
                    await upstream.send_cancel(self.config.upstream, session.up_pid, session.up_secret)
                return
        # Like PostgreSQL, an unknown key is ignored silently.

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for s in list(self.sessions):
            with contextlib.suppress(Exception):
                await s.shutdown()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
        for t in list(self._tasks):
            t.cancel()
        if self.guards.store is not None:
            with contextlib.suppress(Exception):
                await self.guards.store.close()
        self.audit.close()


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
