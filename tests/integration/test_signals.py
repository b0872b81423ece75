"""SIGTERM drains, a second SIGTERM stops at once, SIGHUP reloads the TLS certificate: a real `pgwarden serve`."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.integration.fix_serve import served, write_config
from tests.integration.fix_tls import make_self_signed


def run_in_thread(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def target() -> None:
        t0 = time.monotonic()
        try:
            out["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc
        out["seconds"] = time.monotonic() - t0

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, out


def wait_for_sleep(cluster: Any, present: bool = True, timeout: float = 10) -> None:
    """Until a pg_sleep is (or is no longer) running upstream."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = cluster.psql("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%'",
                         database="postgres").strip()
        if (n != "0") == present:
            return
        time.sleep(0.05)
    raise AssertionError(f"pg_sleep {'never started' if present else 'still running'}")


def test_sigterm_lets_running_statements_finish_closes_idle_sessions_and_refuses_new_ones(cluster,
                                                                                          tmp_path: Path) -> None:
    cfg = write_config(cluster, tmp_path, shutdown_grace=20)
    with served(cfg) as pw:
        idle = psycopg.connect(pw.dsn(), autocommit=True)
        busy = psycopg.connect(pw.dsn(), autocommit=True)
        # libpq hands an error that arrives while no query runs to the notice handler (as it does
        # with PostgreSQL's own 57P01): the busy client may get it either way, depending on timing.
        busy_notices: list[str | None] = []
        busy.add_notice_handler(lambda d: busy_notices.append(d.sqlstate))
        t, out = run_in_thread(lambda: busy.execute("SELECT pg_sleep(3), 42").fetchone())
        wait_for_sleep(cluster)
        pw.signal(signal.SIGTERM)
        # The idle session hears 57P01 at once, as from PostgreSQL.
        time.sleep(0.5)
        with pytest.raises(psycopg.errors.AdminShutdown, match="terminating connection due to administrator command"):
            idle.execute("SELECT 1")
        # A new connection is refused.
        with pytest.raises(psycopg.OperationalError, match="refused"):
            psycopg.connect(pw.dsn(), connect_timeout=3)
        # The running statement completes with its result.
        t.join(15)
        assert out.get("error") is None, out
        assert out["result"] == ("", 42)
        assert out["seconds"] >= 2.0
        with pytest.raises(psycopg.OperationalError) as closed:
            busy.execute("SELECT 1")
        assert closed.value.sqlstate == "57P01" or busy_notices == ["57P01"], (closed.value, busy_notices)
        assert pw.proc.wait(15) == 0
        idle.close()
        busy.close()
    events = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds.count("shutdown") == 1
    done = [e for e in events if e["event"] == "statement" and e["statement"] == "SELECT pg_sleep(3), 42"]
    assert [(e["outcome"], e["rows"]) for e in done] == [("ok", 1)]
    assert kinds.count("disconnect") == 2  # both sessions' last events were flushed before exit


def test_second_sigterm_stops_at_once_and_cancels_the_running_statement(cluster, tmp_path: Path) -> None:
    cfg = write_config(cluster, tmp_path, shutdown_grace=60)
    with served(cfg) as pw:
        busy = psycopg.connect(pw.dsn(), autocommit=True)
        t, out = run_in_thread(lambda: busy.execute("SELECT pg_sleep(30)").fetchone())
        wait_for_sleep(cluster)
        pw.signal(signal.SIGTERM)
        time.sleep(0.5)
        assert pw.proc.poll() is None  # still draining: the statement has 29 s to go
        t0 = time.monotonic()
        pw.signal(signal.SIGTERM)
        assert pw.proc.wait(10) == 0
        assert time.monotonic() - t0 < 5
        t.join(10)
        assert isinstance(out["error"], psycopg.errors.AdminShutdown), out
        wait_for_sleep(cluster, present=False)  # cancelled upstream, not left sleeping for nobody
        busy.close()


def server_cert_sha256(port: int) -> str:
    """Fingerprint of the certificate pgwarden presents (SSLRequest, then a TLS handshake)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(b"\x00\x00\x00\x08\x04\xd2\x16\x2f")
        assert raw.recv(1) == b"S"
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with ctx.wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


def pem_sha256(path: str) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(Path(path).read_text())).hexdigest()


def test_sighup_reloads_the_tls_certificate_without_dropping_connections(cluster, tmp_path: Path) -> None:
    live = tmp_path / "live"
    live.mkdir()
    cert, key = make_self_signed(str(live))
    old = pem_sha256(cert)
    renewed = tmp_path / "renewed"
    renewed.mkdir()
    new_cert, new_key = make_self_signed(str(renewed))
    cfg = write_config(cluster, tmp_path, tls={"cert": cert, "key": key})
    with served(cfg) as pw:
        assert server_cert_sha256(pw.port) == old
        kept = psycopg.connect(pw.dsn(sslmode="require"), autocommit=True)
        shutil.copy(new_cert, cert)
        shutil.copy(new_key, key)
        pw.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while server_cert_sha256(pw.port) != pem_sha256(new_cert):
            assert time.monotonic() < deadline, "the new certificate was never served"
            time.sleep(0.1)
        assert kept.execute("SELECT 7").fetchone() == (7,)  # the open session kept its TLS
        with psycopg.connect(pw.dsn(sslmode="require")) as c:
            assert c.execute("SELECT 8").fetchone() == (8,)
        # A broken pair (half-copied renewal) is refused and the current certificate stays.
        Path(key).write_text("not a key\n")
        pw.signal(signal.SIGHUP)
        time.sleep(1)
        assert server_cert_sha256(pw.port) == pem_sha256(new_cert)
        kept.close()
    events = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events if e["event"].startswith("tls_")] == ["tls_reloaded", "tls_reload_failed"]
