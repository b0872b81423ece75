"""`pgwarden serve --workers 2`: one port, two processes, cancel requests reach the right one."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.integration.fix_serve import served, write_config


def audit_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def worker_pids(pw: Any) -> list[int]:
    return [int(p) for p in pw.wait_line("workers ").split()[1:]]


def test_two_workers_share_the_port_and_route_foreign_cancels(cluster, tmp_path: Path) -> None:
    cfg = write_config(cluster, tmp_path)
    with served(cfg, "--workers", "2") as pw:
        pids = worker_pids(pw)
        assert len(set(pids)) == 2
        # Many connections: the kernel spreads them over both workers (each has its own audit file).
        backends = set()
        for _ in range(40):
            with psycopg.connect(pw.dsn(), autocommit=True) as c:
                backends.add(c.execute("SELECT pg_backend_pid()").fetchone()[0])
        assert len(backends) >= 2
        time.sleep(0.2)  # audit lines are written a few ms after the event
        logins = {w: sum(1 for e in audit_events(tmp_path / f"audit-w{w}.jsonl") if e["event"] == "login")
                  for w in (1, 2)}
        assert logins[1] + logins[2] == 40
        assert logins[1] > 0 and logins[2] > 0, logins
        assert not (tmp_path / "audit.jsonl").exists()  # never one file written by two processes

        # Cancel a pg_sleep over a fresh connection, again and again: whichever worker the kernel
        # gives the cancel connection to, the statement is cancelled.
        for i in range(12):
            with psycopg.connect(pw.dsn(), autocommit=True) as c:
                done: dict[str, Any] = {}

                def sleep(conn: psycopg.Connection[Any] = c, out: dict[str, Any] = done) -> None:
                    t0 = time.monotonic()
                    try:
                        conn.execute("SELECT pg_sleep(20)")
                    except BaseException as exc:  # noqa: BLE001
                        out["error"] = exc
                    out["seconds"] = time.monotonic() - t0

                t = threading.Thread(target=sleep, daemon=True)
                t.start()
                time.sleep(0.3)
                c.cancel()
                t.join(10)
                assert isinstance(done.get("error"), psycopg.errors.QueryCanceled), (i, done)
                assert done["seconds"] < 5
        time.sleep(0.2)
        events = audit_events(tmp_path / "audit-w1.jsonl") + audit_events(tmp_path / "audit-w2.jsonl")
        assert sum(1 for e in events if e["event"] == "cancel") == 12
        # Some cancels landed on the other worker and were passed on (12 coin flips all one way: 1 in 2048).
        assert sum(1 for e in events if e["event"] == "cancel_forwarded") >= 1


def sys_params_counts(pw: Any, n: int) -> list[object]:
    """alice's ``SELECT count(*) FROM sys_params`` on n fresh connections: the count, or the SQLSTATE."""
    out: list[object] = []
    for _ in range(n):
        with psycopg.connect(pw.dsn(), autocommit=True) as c:
            try:
                out.append(c.execute("SELECT count(*) FROM sys_params").fetchone()[0])
            except psycopg.Error as e:
                out.append(e.sqlstate)
    return out


def test_sighup_and_sigterm_reach_every_worker_and_a_dead_worker_is_restarted(cluster, tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    hotel = (Path(__file__).resolve().parents[2] / "deploy/rules/hotel.yaml").read_text(encoding="utf-8")
    rules.write_text(hotel, encoding="utf-8")
    cfg = write_config(cluster, tmp_path, rules=str(rules))
    (n_params,) = cluster.psql("SELECT count(*) FROM sys_params").split()
    with served(cfg, "--workers", "2") as pw:
        pids = worker_pids(pw)
        os.kill(pids[0], signal.SIGKILL)
        line = pw.wait_line("worker 1 restarted pid ", timeout=30)
        new_pid = int(line.split()[-1])
        assert new_pid not in pids
        # alice (no training on record: a trainee) may not read sys_params, on either worker
        assert sys_params_counts(pw, 6) == ["42501"] * 6
        # The rules grant trainees sys_params; the file's time is put back, so that only SIGHUP (not the
        # workers' watch on the file) can make them read it again.
        grant = "      public.training_dialogs: {}\n"
        assert hotel.count(grant) == 1
        st = os.stat(rules)
        rules.write_text(hotel.replace(grant, grant + "      public.sys_params: {}\n"), encoding="utf-8")
        os.utime(rules, ns=(st.st_atime_ns, st.st_mtime_ns))
        time.sleep(2.5)  # longer than the watch interval: the workers still refuse
        assert sys_params_counts(pw, 6) == ["42501"] * 6
        pw.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        reloads: dict[int, int] = {}
        while time.monotonic() < deadline:
            reloads = {w: sum(1 for e in audit_events(tmp_path / f"audit-w{w}.jsonl") if e["event"] == "rules_reloaded")
                       for w in (1, 2)}
            if reloads == {1: 1, 2: 1}:
                break
            time.sleep(0.1)
        assert reloads == {1: 1, 2: 1}
        # both workers apply the new rules (20 connections: the kernel spreads them over both)
        assert sys_params_counts(pw, 20) == [int(n_params)] * 20
        time.sleep(0.2)  # audit lines are written a few ms after the answers
        ok = {w: sum(1 for e in audit_events(tmp_path / f"audit-w{w}.jsonl") if e.get("statement")
                     == "SELECT count(*) FROM sys_params" and e.get("outcome") == "ok") for w in (1, 2)}
        assert ok[1] + ok[2] == 20 and ok[1] > 0 and ok[2] > 0, ok
        pw.signal(signal.SIGTERM)
        assert pw.proc.wait(20) == 0
        for pid in (new_pid, pids[1]):
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        shutdowns = [sum(1 for e in audit_events(tmp_path / f"audit-w{w}.jsonl") if e["event"] == "shutdown")
                     for w in (1, 2)]
        assert shutdowns == [1, 1]
    # Each worker is a hash chain of its own (replica .../w1, .../w2), continued across worker 1's restart.
    r = subprocess.run([sys.executable, "-m", "proxy.cli", "audit", "verify", "--from-start", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.findall(r"^replica \S+/w(\d): intact", r.stdout, re.M) == ["1", "2"], r.stdout
