"""The admin console (database pgwarden) through psql: SHOW CLIENTS | SESSIONS | STATS | RULES | LOCKOUTS, RELOAD."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.conftest import Proxy, start_proxy

HOTEL = Path(__file__).resolve().parents[2] / "deploy" / "rules" / "hotel.yaml"


@pytest.fixture(scope="module")
def console(cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    p = start_proxy(cluster, str(tmp_path_factory.mktemp("console")), rules=str(HOTEL),
                    metrics={"listen": "127.0.0.1:0"}, admin_users=["judy"])
    try:
        yield p
    finally:
        p.thread.stop()


def psql(p: Proxy, user: str, sql: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGPASSWORD"] = "demo"
    return subprocess.run(["psql", "-X", "-A", "-t", "-F", "|",
                           f"host=127.0.0.1 port={p.port} dbname=pgwarden user={user} sslmode=disable",
                           "-c", sql], capture_output=True, text=True, timeout=60, env=env)


def test_show_clients_and_sessions_list_each_person_and_the_upstream_pid(console: Proxy, cluster) -> None:
    with psycopg.connect(console.dsn("alice", sslmode="disable", application_name="consoletest"),
                         autocommit=True) as alice:
        alice.execute("SELECT count(*) FROM cs_records").fetchone()
        r = psql(console, "frank", "SHOW CLIENTS")
        assert r.returncode == 0, r.stderr
        rows = [line.split("|") for line in r.stdout.splitlines()]
        mine = [row for row in rows if row[0] == "alice"]
        assert len(mine) == 1
        a = mine[0]
        assert a[:3] == ["alice", "front_desk", "FO"] and a[3] == "127.0.0.1"
        assert a[5:10] == ["consoletest", "hotel", "off", "scram-sha-256", "idle"]
        assert a[11] == "1"  # one statement so far
        assert [row[:2] + row[6:7] + row[9:10] for row in rows if row[0] == "frank"] == [
            ["frank", "security_director", "pgwarden", "console"]]
        upstream_pid = cluster.psql("SELECT pid FROM pg_stat_activity WHERE application_name = 'alice/consoletest'",
                                    database="postgres").strip()
        r = psql(console, "frank", "SHOW SESSIONS")
        assert r.returncode == 0, r.stderr
        alice_rows = [line.split("|") for line in r.stdout.splitlines() if line.split("|")[1] == "alice"]
        assert [(row[2], row[3], row[4], row[5]) for row in alice_rows] == [(upstream_pid, "I", "no", "1")]


def test_show_stats_rules_lockouts(console: Proxy) -> None:
    with psycopg.connect(console.dsn("gina"), autocommit=True) as gina:
        before = dict(line.split("|") for line in psql(console, "frank", "SHOW STATS").stdout.splitlines())
        gina.execute("SELECT count(*) FROM cs_records").fetchone()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            gina.execute("SELECT * FROM guests")
        after = dict(line.split("|") for line in psql(console, "frank", "SHOW STATS").stdout.splitlines())
    assert int(after["statements_rewritten"]) - int(before["statements_rewritten"]) == 1
    assert int(after["statements_refused"]) - int(before["statements_refused"]) == 1
    assert int(after["logins"]) - int(before["logins"]) == 1  # the second console login
    r = psql(console, "frank", "SHOW RULES")
    assert r.returncode == 0, r.stderr
    rules = {line.split("|")[0]: line.split("|")[1:] for line in r.stdout.splitlines()}
    assert rules["it_ops"] == ["public.fault_logs, public.sys_params", "", "no", str(HOTEL)]
    assert rules["front_desk"] == ["public.cs_records", "200", "no", str(HOTEL)]
    assert len(rules) == 11
    r = subprocess.run(["psql", "-X", f"host=127.0.0.1 port={console.port} dbname=pgwarden user=frank "
                        "sslmode=disable password=demo", "-c", "SHOW LOCKOUTS"],
                       capture_output=True, text=True, timeout=60,
                       env={k: v for k, v in os.environ.items() if not k.startswith("PG")})
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].split("|") == [" user ", " locked_until ", " reason "]
    assert r.stdout.splitlines()[-2] == "(0 rows)"


def test_reload_and_unknown_commands_are_audited(console: Proxy) -> None:
    console.take_events(None)
    r = psql(console, "judy", "RELOAD")  # a department head, named in admin_users
    assert (r.returncode, r.stdout) == (0, "RELOAD\n"), r.stderr
    r = psql(console, "frank", "DROP TABLE guests")
    assert r.returncode == 1
    assert "ERROR:  pgwarden console: unknown command; use one of: SHOW CLIENTS" in r.stderr
    events = console.take_events(None)
    assert [(e["event"], e.get("user"), e.get("command")) for e in events if e["event"] == "admin_command"] == [
        ("admin_command", "judy", "RELOAD"), ("admin_command", "frank", "unknown")]
    assert [e["event"] for e in events].count("rules_reloaded") == 1
    assert "DROP TABLE" not in str(events)


def test_everyone_else_is_refused_with_42501(console: Proxy) -> None:
    console.take_events(None)
    r = psql(console, "carol", "SHOW CLIENTS")
    assert r.returncode == 2
    assert "FATAL:  pgwarden: carol may not use the pgwarden console" in r.stderr
    failed = [e for e in console.take_events(None) if e["event"] == "login_failed"]
    assert [(e["user"], e["sqlstate"]) for e in failed] == [("carol", "42501")]


def test_extended_protocol_is_refused(console: Proxy) -> None:
    with psycopg.connect(console.dsn("frank", database="pgwarden"), autocommit=True) as c:
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="simple query protocol only"):
            c.execute("SHOW STATS", prepare=True)
