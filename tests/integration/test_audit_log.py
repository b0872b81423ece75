"""The audit log under real conditions: a full disk, SIGTERM with busy sessions, receipts (R5.1, R5.2, R5.4)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import psycopg
import pytest

from proxy.verifiers import make_scram_verifier
from proxy.demo.pgcluster import PgCluster
from tests.conftest import Proxy, start_proxy

ROOT = Path(__file__).resolve().parents[2]
HOTEL = ROOT / "deploy" / "rules" / "hotel.yaml"
PGWARDEN = [sys.executable, "-m", "proxy.cli"]


def events(path: Path) -> list[dict]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines() if x.strip()]


def wait_for(cond, what: str, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture()
def full_disk_proxy(cluster: PgCluster, tmp_path: Path) -> Iterator[tuple[Proxy, Path]]:
    """pgwarden with the hotel rules whose audit file is /dev/full (every write: ENOSPC)."""
    link = tmp_path / "audit.jsonl"
    link.symlink_to("/dev/full")
    p = start_proxy(cluster, str(tmp_path), rules=str(HOTEL), audit={"path": str(link)})
    try:
        yield p, link
    finally:
        p.thread.stop()


def test_restricted_statements_are_refused_while_the_log_cannot_be_written(
        full_disk_proxy: tuple[Proxy, Path]) -> None:
    proxy, link = full_disk_proxy
    audit = proxy.thread.server.audit  # type: ignore[union-attr]
    with psycopg.connect(proxy.dsn("bob"), autocommit=True) as c:
        wait_for(lambda: not audit.healthy, "the login event's write to fail")
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as ei:
            c.execute("SELECT count(*) FROM cs_records").fetchall()
        assert str(ei.value) == ("pgwarden: the audit log cannot be written, so statements of restricted roles "
                                 "are refused until it can; tell the pgwarden administrator")
        link.unlink()  # space is freed: the path names a writable file again
        wait_for(lambda: audit.healthy, "the held-back events to be written", timeout=5)
        assert c.execute("SELECT 1 + 1").fetchone() == (2,)
    wait_for(lambda: any(e.get("event") == "disconnect" for e in events(link)), "the disconnect event")
    evs = events(link)
    # The refused statement never reached the server (no intent); the next one was durable before it ran.
    assert [e["event"] for e in evs] == ["login", "statement", "statement_start", "statement", "disconnect"]
    assert [e["seq"] for e in evs] == [1, 2, 3, 4, 5]
    refused = evs[1]
    assert (refused["outcome"], refused["sqlstate"], refused["reason"]) == (
        "refused", "42501", "audit log cannot be written: No space left on device (ENOSPC)")
    assert evs[2]["statement"] == "SELECT 1 + 1" and "start" not in refused
    assert (evs[3]["outcome"], evs[3]["statement"], evs[3]["start"]) == ("ok", "SELECT 1 + 1", 3)
    r = subprocess.run([*PGWARDEN, "audit", "verify", str(link)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "replica test: intact, 5 events, seq 1..5" in r.stdout


BOB_SEES = "department = 'FO' AND NOT legal_hold AND created_at >= statement_timestamp() - interval '72 hours'"


def direct(c: PgCluster, sql: str) -> list[tuple]:
    with psycopg.connect(c.dsn(c.superuser, c.superuser_password)) as conn:
        return conn.execute(sql).fetchall()


def verify(*paths: Path, from_start: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PGWARDEN, "audit", "verify", *(["--from-start"] if from_start else []),
                           *map(str, paths)], capture_output=True, text=True, timeout=60)


def test_on_failure_continue_runs_restricted_statements_and_writes_them_later(cluster: PgCluster,
                                                                              tmp_path: Path) -> None:
    link = tmp_path / "audit.jsonl"
    link.symlink_to("/dev/full")
    proxy = start_proxy(cluster, str(tmp_path), rules=str(HOTEL), audit={"path": str(link), "on_failure": "continue"})
    try:
        audit = proxy.thread.server.audit  # type: ignore[union-attr]
        with psycopg.connect(proxy.dsn("bob"), autocommit=True) as c:
            wait_for(lambda: not audit.healthy, "the login event's write to fail")
            assert not audit.refusing
            # bob is restricted (rows, masks, quotas): with `continue` his statements run, with their exact rows
            assert c.execute("SELECT count(*) FROM cs_records").fetchall() == direct(
                cluster, f"SELECT count(*) FROM cs_records WHERE {BOB_SEES}")
            assert c.execute("SELECT id FROM cs_records ORDER BY id LIMIT 3").fetchall() == direct(
                cluster, f"SELECT id FROM cs_records WHERE {BOB_SEES} ORDER BY id LIMIT 3")
            assert not audit.healthy  # (the path is still /dev/full: nothing was written)
            link.unlink()  # the path is writable again
            wait_for(lambda: audit.healthy, "the held-back events to be written", timeout=5)
        wait_for(lambda: any(e.get("event") == "disconnect" for e in events(link)), "the disconnect event")
    finally:
        proxy.thread.stop()
    evs = events(link)
    # Each statement's write-ahead intent (statement_start) could not be written either: with `continue`
    # the statement ran anyway, and both events reached the file once it could be written.
    assert [(e["event"], e.get("statement"), e.get("outcome")) for e in evs] == [
        ("login", None, None), ("statement_start", "SELECT count(*) FROM cs_records", None),
        ("statement", "SELECT count(*) FROM cs_records", "ok"),
        ("statement_start", "SELECT id FROM cs_records ORDER BY id LIMIT 3", None),
        ("statement", "SELECT id FROM cs_records ORDER BY id LIMIT 3", "ok"), ("disconnect", None, None),
        ("audit_closed", None, None)]
    assert [e.get("start") for e in evs if e["event"] == "statement"] == [2, 4]
    r = verify(link, from_start=True)
    assert r.returncode == 0 and "replica test: intact, 7 events, seq 1..7" in r.stdout, r.stdout + r.stderr


def test_events_past_the_hold_back_limit_go_to_stderr_and_verify_reports_them_missing(
        cluster: PgCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    import proxy.audit.log as audit_log
    from proxy.audit.chain import hash_of, parse_line

    assert audit_log.MAX_UNWRITTEN == 64 << 20  # what the README promises; 4 KiB here, not 64 MiB of events
    monkeypatch.setattr(audit_log, "MAX_UNWRITTEN", 4096)
    link = tmp_path / "audit.jsonl"
    link.symlink_to("/dev/full")
    proxy = start_proxy(cluster, str(tmp_path), rules=str(HOTEL), audit={"path": str(link), "on_failure": "continue"})
    try:
        audit = proxy.thread.server.audit  # type: ignore[union-attr]
        with psycopg.connect(proxy.dsn("dave"), autocommit=True) as c:
            for i in range(40):  # about 20 KiB of events while the file cannot be written
                assert c.execute(f"SELECT {i} AS n").fetchall() == [(i,)]
            # The held-back bytes are cut to the limit when a write fails (retried every 0.5 s).
            captured: list[str] = []
            marker = "pgwarden: AUDIT EVENTS NOT IN THE FILE (held back too long); they follow\n"
            wait_for(lambda: captured.append(capfd.readouterr().err) or marker in "".join(captured),
                     "the oldest events to go to stderr")
            assert not audit.healthy
            link.unlink()
            wait_for(lambda: audit.healthy, "the held-back events to be written", timeout=5)
        wait_for(lambda: any(e.get("event") == "disconnect" for e in events(link)), "the disconnect event")
    finally:
        proxy.thread.stop()
    err = "".join(captured) + capfd.readouterr().err
    dropped = [parse_line(line.encode()) for line in err.splitlines() if line.startswith("{")]
    kept = events(link)
    assert dropped and kept and all(e is not None and hash_of(e) == e["hash"] for e in dropped)
    # The oldest went to stderr, whole and in order; the file has the rest; none lost, none twice.
    k = len(dropped)
    assert [e["seq"] for e in dropped] == list(range(1, k + 1))  # type: ignore[index]
    assert [e["seq"] for e in kept] == list(range(k + 1, k + 1 + len(kept)))
    assert [e["event"] for e in kept][-2:] == ["disconnect", "audit_closed"]
    assert k + len(kept) == 1 + 2 * 40 + 1 + 1  # login, 40 statements and their intents, disconnect, audit_closed
    # verify sees that the chain in the file does not begin at seq 1 ...
    r = verify(link)
    assert r.returncode == 0 and f"the chain begins at seq {k + 1}" in r.stdout, r.stdout
    r = verify(link, from_start=True)
    assert r.returncode == 1 and r.stdout.startswith(
        f"replica test: FAILED at {link}:1: missing: the chain begins at seq {k + 1} "), r.stdout
    # ... and the lines from stderr, put back in front, are exactly what is missing
    whole = tmp_path / "recovered.jsonl"
    whole.write_bytes(b"".join(line.encode() + b"\n" for line in err.splitlines() if line.startswith("{"))
                      + link.read_bytes())
    r = verify(whole, from_start=True)
    assert r.returncode == 0 and f"intact, {k + len(kept)} events, seq 1..{k + len(kept)}" in r.stdout, r.stdout


def _serve_config(cluster: PgCluster, tmp_path: Path, audit: str) -> Path:
    verifier = make_scram_verifier("demo")
    cfg = tmp_path / "pgwarden.yaml"
    users = "".join(f"  {u}: {{role: {r}, department: FO, password: '{verifier}'}}\n"
                    for u, r in (("bob", "supervisor"), ("dave", "general_manager")))
    cfg.write_text(
        f"listen: {{host: 127.0.0.1, port: 0}}\n"
        f"upstream: {{host: {cluster.host}, port: {cluster.port}, user: {cluster.service_user}, "
        f"password: '{cluster.service_password}', sslmode: disable}}\n"
        f"audit: {{path: '{audit}', replica: serve-test}}\nshutdown_grace: 1\n"
        f"rules: {HOTEL}\nstate: off\nusers:\n{users}", encoding="utf-8")
    return cfg


def test_sigterm_writes_every_event_of_busy_sessions(cluster: PgCluster, tmp_path: Path) -> None:
    cfg = _serve_config(cluster, tmp_path, str(tmp_path / "audit-%Y-%m.jsonl"))
    proc = subprocess.Popen([*PGWARDEN, "serve", "--config", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening "), line + (proc.stderr.read() if proc.stderr else "")
        port = int(line.split()[1])
        dsn = f"host=127.0.0.1 port={port} dbname=hotel user=%s password=demo"
        errors: list[BaseException] = []

        def client(k: int) -> None:
            try:
                with psycopg.connect(dsn % ("dave" if k % 2 else "bob"), autocommit=True) as c:
                    for i in range(50):
                        c.execute("SELECT %s::int + 0", (i,)).fetchone()
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert errors == []
        sleeper = psycopg.connect(dsn % "dave", autocommit=True)
        stuck: list[BaseException] = []
        t = threading.Thread(target=lambda: stuck.append(_run_quietly(sleeper, "SELECT pg_sleep(60)")))
        t.start()
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        t.join(30)
        sleeper.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    files = sorted(tmp_path.glob("audit-*.jsonl"))
    assert len(files) == 1
    evs = events(files[0])
    stmts = [e for e in evs if e["event"] == "statement" and e.get("outcome") == "ok"]
    assert len(stmts) == 8 * 50
    # Cut by the shutdown grace: labelled as such, not as the client's doing.
    assert [(e["statement"], e["sqlstate"]) for e in evs if e.get("outcome") == "shutdown"] == [
        ("SELECT pg_sleep(60)", "57P01")]
    assert not [e for e in evs if e.get("outcome") == "client_disconnected"]
    starts = {e["seq"] for e in evs if e["event"] == "statement_start"}  # bob and dave are restricted roles
    assert len(starts) == 8 * 50 + 1 and starts == {e["start"] for e in evs if "start" in e}
    assert sum(1 for e in evs if e["event"] == "disconnect") == 9
    assert evs[-1]["event"] == "audit_closed"
    r = subprocess.run([*PGWARDEN, "audit", "verify", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout
    assert f"replica serve-test: intact, {len(evs)} events, seq 1..{len(evs)}" in r.stdout
    assert "ends with a clean stop (audit_closed)" in r.stdout


def _run_quietly(conn: psycopg.Connection, sql: str) -> BaseException | None:
    try:
        conn.execute(sql)
    except psycopg.Error as exc:
        return exc
    return None


@pytest.fixture(scope="module")
def guarded(cluster: PgCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    p = start_proxy(cluster, str(tmp_path_factory.mktemp("receipts")), rules=str(HOTEL))
    try:
        yield p
    finally:
        p.thread.stop()


BOB_MASKED = "masked: phone"  # the masked columns the statement read (a supervisor sees guest names)


@pytest.mark.parametrize("prepare", [False, True], ids=["simple", "extended"])
def test_receipt_notice_through_psycopg_matches_the_audit_event(guarded: Proxy, prepare: bool) -> None:
    guarded.take_events()
    notices: list[tuple[str | None, ...]] = []
    with psycopg.connect(guarded.dsn("bob"), autocommit=True) as c:
        # A Diagnostic is only valid inside the handler: copy its fields.
        c.add_notice_handler(lambda d: notices.append((d.severity, d.sqlstate, d.message_primary)))
        rows = c.execute("SELECT id, phone FROM cs_records ORDER BY id LIMIT 7", prepare=prepare).fetchall()
        c.execute("SELECT 1", prepare=prepare).fetchall()  # reads no protected table: no receipt
    n = len(rows)  # bob sees his department's last 72 hours: how many depends on the clock
    assert n > 1
    assert len(notices) == 1
    severity, sqlstate, message = notices[0]
    assert (severity, sqlstate) == ("NOTICE", "00000")
    evs = [e for e in guarded.take_events() if e["statement"].startswith("SELECT id, phone")]
    assert len(evs) == 1 and evs[0]["rows"] == n
    rid = evs[0]["receipt"]
    assert rid.startswith("R-") and len(rid) == 18
    assert message == f"pgwarden receipt {rid}: {n} rows from cs_records, {BOB_MASKED}"


def test_receipt_counts_rows_and_tables_of_a_join_for_the_general_manager(guarded: Proxy) -> None:
    guarded.take_events()
    notices: list[str] = []
    with psycopg.connect(guarded.dsn("dave"), autocommit=True) as c:
        c.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        got = c.execute("SELECT r.id, g.name FROM cs_records r JOIN guests g ON g.id = r.guest_id "
                        "ORDER BY r.id LIMIT 3").fetchall()
        assert len(got) == 3
    (ev,) = guarded.take_events()
    assert ev["flags"] == ["internal_audit"]
    assert notices == [f"pgwarden receipt {ev['receipt']}: 3 rows from cs_records, guests, masked: guests.name"]


def test_receipt_in_psql_for_each_statement_of_a_query(guarded: Proxy) -> None:
    guarded.take_events()
    r = subprocess.run(["psql", "-X", "-At", "-h", "127.0.0.1", "-p", str(guarded.port), "-U", "bob", "-d", "hotel",
                        "-c", "SELECT count(*) FROM cs_records; SELECT 2"],
                       env={"PGPASSWORD": "demo", "PATH": os.environ["PATH"]}, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    evs = guarded.take_events()
    assert [e.get("receipt") is not None for e in evs] == [True, False]
    assert r.stderr == f"NOTICE:  pgwarden receipt {evs[0]['receipt']}: 1 row from cs_records\n"  # count(*): none read
    assert r.stdout.splitlines()[1] == "2"


def test_prepared_statements_are_refused_too_once_the_file_stops_growing(cluster: PgCluster, tmp_path: Path) -> None:
    """RLIMIT_FSIZE stops pgwarden's audit file at 16 KiB (writes fail with EFBIG, as on a full disk):
    a statement prepared while the log worked is refused at its next Execute, not run unlogged."""
    import resource

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, 16 << 10))

    cfg = _serve_config(cluster, tmp_path, str(tmp_path / "audit.jsonl"))
    proc = subprocess.Popen([*PGWARDEN, "serve", "--config", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, preexec_fn=limit)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline().split()[1])
        sql = "SELECT count(*) FROM cs_records WHERE department = %s"
        refused_at = None
        with psycopg.connect(f"host=127.0.0.1 port={port} dbname=hotel user=bob password=demo",
                             autocommit=True) as c:
            for i in range(400):
                try:
                    c.execute(sql, ("FO",), prepare=True).fetchone()  # Parse once, then Bind/Execute only
                except psycopg.errors.InsufficientPrivilege as exc:
                    assert str(exc).startswith("pgwarden: the audit log cannot be written")
                    refused_at = i
                    break
                time.sleep(0.005)  # let each event's write happen (and fail) before the next Execute
            assert refused_at is not None and refused_at > 3, refused_at
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute("SELECT 1").fetchone()  # new statements are refused too
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert "CANNOT BE WRITTEN: File too large (EFBIG)" in err
    assert (tmp_path / "audit.jsonl").stat().st_size <= 16 << 10
    # Write-ahead: every Execute that ran had its statement_start in the file before it reached PostgreSQL,
    # so the statements that ran are exactly those the file can show; the first failed write refused its own.
    starts = []
    for line in (tmp_path / "audit.jsonl").read_bytes().splitlines():
        try:
            ev = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue  # the line the size limit cut
        if ev.get("event") == "statement_start":
            starts.append(ev)
    assert len(starts) == refused_at, (len(starts), refused_at)
