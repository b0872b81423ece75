"""Crashes and insiders against a real `pgwarden serve` (issue 14): SIGKILL mid-statement, a cut tail and a
re-chained file must each make `pgwarden audit verify` fail, and say why.

The proxy runs as a subprocess with the hotel rules (bob is a restricted role: write-ahead), a state store
(anchors every 5 events or 0.2 s) and an HMAC key kept in a directory of its own. Tampering is done to the
bytes on disk, as someone with write access to the log but without the key would.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import psycopg
import pytest

from proxy.audit.chain import GENESIS, canonical
from proxy.verifiers import make_scram_verifier
from proxy.demo.pgcluster import PgCluster
from tests.conftest import state_config
from tests.integration.fix_serve import ROOT, serve, write_config

HOTEL = ROOT / "deploy" / "rules" / "hotel.yaml"
PGWARDEN = [sys.executable, "-m", "proxy.cli"]


def _config(cluster: PgCluster, tmp_path: Path, schema: str) -> Path:
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "audit.key").write_bytes(os.urandom(24).hex().encode())  # 48 characters
    logs = tmp_path / "log"
    logs.mkdir()
    return write_config(
        cluster, tmp_path, rules=str(HOTEL), state=state_config(cluster, schema), shutdown_grace=1,
        audit={"path": str(logs / "audit.jsonl"), "replica": "crash-test", "key": f"file:{keys / 'audit.key'}",
               "anchor_every": 5, "anchor_seconds": 0.2},
        users={"bob": {"role": "supervisor", "department": "FO", "password": make_scram_verifier("demo")}})


def _verify(cfg: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PGWARDEN, "audit", "verify", str(cfg.parent / "log"), "--config", str(cfg), *extra],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def _statements(port: int, n: int) -> None:
    with psycopg.connect(f"host=127.0.0.1 port={port} dbname=hotel user=bob password=demo", autocommit=True) as c:
        for i in range(n):
            assert c.execute("SELECT %s::int + 1", (i,)).fetchone() == (i + 1,)


def _clean_run(cfg: Path, n: int) -> None:
    s = serve(cfg)
    try:
        _statements(s.port, n)
        time.sleep(0.4)  # an anchor or two while running
        s.signal(signal.SIGTERM)
        assert s.proc.wait(30) == 0
    finally:
        s.stop()


def test_sigkill_mid_statement_makes_verify_fail(cluster: PgCluster, tmp_path: Path) -> None:
    cfg = _config(cluster, tmp_path, "crash_kill")
    s = serve(cfg)
    try:
        _statements(s.port, 10)
        sleeper = psycopg.connect(s.dsn("bob"), autocommit=True)
        t = threading.Thread(target=lambda: _quietly(sleeper, "SELECT pg_sleep(30)"), daemon=True)
        t.start()
        deadline = time.monotonic() + 10
        while "1" not in cluster.psql("SELECT count(*) FROM pg_stat_activity WHERE lower(query) = 'select pg_sleep(30)'"):
            assert time.monotonic() < deadline, "the statement never reached PostgreSQL"
            time.sleep(0.05)
        s.proc.send_signal(signal.SIGKILL)  # no audit_closed, no outcome event for the pg_sleep
        s.proc.wait(10)
    finally:
        s.stop()
        cluster.psql("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE lower(query) = 'select pg_sleep(30)'")
    _clean_run(cfg, 2)  # the restart: it must say the last stop was unclean
    r = _verify(cfg)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "replica crash-test: INCOMPLETE: chain intact" in r.stdout, r.stdout
    assert "1 unclean stop(s), 1 statement(s) started and never ended" in r.stdout
    log = cfg.parent / "log" / "audit.jsonl"
    assert f"  UNCLEAN STOP at {log}:" in r.stdout
    assert ", bob (supervisor): SELECT pg_sleep(30) (no outcome before this unclean stop)" in r.stdout, r.stdout
    evs = [orjson.loads(x) for x in log.read_bytes().splitlines()]
    restart = [e for e in evs if e["event"] == "chain_restart"]
    assert len(restart) == 1 and restart[0]["reason"] == "unclean stop"


def _quietly(conn: psycopg.Connection, sql: str) -> None:
    try:
        conn.execute(sql)
    except psycopg.Error:
        pass


def test_a_cut_tail_is_found_by_the_anchors(cluster: PgCluster, tmp_path: Path) -> None:
    cfg = _config(cluster, tmp_path, "crash_tail")
    _clean_run(cfg, 30)
    r = _verify(cfg)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "replica crash-test: intact" in r.stdout and "ends with a clean stop" in r.stdout
    assert "MACs checked;" in r.stdout and "anchors checked against the state store" in r.stdout
    log = cfg.parent / "log" / "audit.jsonl"
    page = tmp_path / "report.html"
    report = [*PGWARDEN, "audit", "report", str(log), "--config", str(cfg), "--html", str(page)]
    rep = subprocess.run(report, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert rep.returncode == 0, rep.stderr
    assert "; 1 chain(s) verified intact (keyed chains, MACs checked; " in rep.stdout, rep.stdout
    assert "anchors checked against the state store pgwarden_state@" in rep.stdout
    raw = log.read_bytes().splitlines()
    log.write_bytes(b"\n".join(raw[:-12]) + b"\n")  # the last 12 events deleted: the chain alone looks fine
    rep = subprocess.run(report, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert "; chain verification FAILED for crash-test (keyed chains, MACs checked; " in rep.stdout, rep.stdout
    assert 'id="verdict" data-status="FAILED"' in page.read_text()
    plain = subprocess.run([*PGWARDEN, "audit", "verify", str(log), "--no-anchors", "--config", str(cfg)],
                           capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert plain.returncode == 0 and "without a clean stop" in plain.stdout  # what the file alone can tell
    r = _verify(cfg)
    assert r.returncode == 1, r.stdout
    last = len(raw)
    assert (f"replica crash-test: FAILED at {log}:{last - 12}: truncated: the state store holds an anchor at seq "
            f"{last}") in r.stdout, r.stdout
    assert f"but the files end at seq {last - 12}" in r.stdout


@pytest.mark.parametrize("keyed", [True, False], ids=["keyed", "unkeyed-but-anchored"])
def test_a_rechained_file_is_found(cluster: PgCluster, tmp_path: Path, keyed: bool) -> None:
    """The insider deletes events 5..9 and recomputes every seq, prev_hash and hash (plain SHA-256: no key)."""
    cfg = _config(cluster, tmp_path, f"crash_rechain_{int(keyed)}")
    if not keyed:
        doc = orjson.loads(cfg.read_bytes())
        del doc["audit"]["key"]
        cfg.write_bytes(orjson.dumps(doc))
    _clean_run(cfg, 30)
    log = cfg.parent / "log" / "audit.jsonl"
    raw = log.read_bytes().splitlines()
    kept = raw[:4] + raw[9:]
    out, prev = [], GENESIS
    for i, line in enumerate(kept, 1):
        ev = orjson.loads(line)
        ev.pop("hash")
        ev.pop("key_id", None)
        if "start" in ev and ev["start"] > 4:
            ev["start"] -= 5
        ev["seq"], ev["prev_hash"] = i, prev
        body = canonical(ev)
        prev = hashlib.sha256(body).hexdigest()
        out.append(body[:-1] + b',"hash":"' + prev.encode() + b'"}')
    log.write_bytes(b"\n".join(out) + b"\n")
    alone = subprocess.run([*PGWARDEN, "audit", "verify", str(log)], capture_output=True, text=True, timeout=60)
    assert alone.returncode == 0 and "NOT KEYED" in alone.stdout  # exactly why a plain chain is not enough
    r = _verify(cfg)
    assert r.returncode == 1, r.stdout
    if keyed:
        assert "unkeyed: no event of this chain is keyed: it was written without the key, or re-chained" in r.stdout
    else:
        # An anchor inside the forged range shows the rewrite; the closing anchor the missing events at its end.
        assert ("re-chained: seq " in r.stdout and "does not carry the hash anchored in the state store" in r.stdout) \
            or f"truncated: the state store holds an anchor at seq {len(raw)}" in r.stdout, r.stdout
