"""The hash-chained audit writer and ``pgwarden audit verify`` on real files (R5.2).

Files are written by AuditLog itself (never hand-made JSON); tampering is done
to the bytes on disk the way someone with write access to the log would.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import orjson
import pytest

from proxy.audit.log import AuditLog
from proxy.audit.chain import GENESIS, canonical
from proxy.audit.files import numbered_lines
from proxy.audit.verify import verify

PGWARDEN = [sys.executable, "-m", "proxy.cli"]


class Clock:
    """A settable clock, so a test can cross a month boundary without waiting for one."""

    def __init__(self, iso: str) -> None:
        self.t = datetime.fromisoformat(iso).timestamp()

    def set(self, iso: str) -> None:
        self.t = datetime.fromisoformat(iso).timestamp()

    def __call__(self) -> float:
        return self.t


def write(path: Path, n: int, replica: str = "r1", **kw: object) -> None:
    log = AuditLog(str(path), replica=replica, **kw)  # type: ignore[arg-type]
    for i in range(n):
        log.emit("statement", None, user="alice", statement=f"SELECT {i}", rows=i, duration_ms=0.25 + i)
    log.close()


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def tamper(path: Path, change: Callable[[list[bytes]], None]) -> None:
    """Change the file's lines in place, as someone with write access to the log would."""
    raw = lines(path)
    change(raw)
    path.write_bytes(b"\n".join(raw) + b"\n")


def run_verify(*files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PGWARDEN, "audit", "verify", *map(str, files)], capture_output=True, text=True,
                          timeout=60)


def test_chain_fields_and_canonical_hash(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    write(p, 3)
    evs = [orjson.loads(x) for x in lines(p)]
    assert [e["seq"] for e in evs] == [1, 2, 3, 4]
    assert [e["event"] for e in evs] == ["statement", "statement", "statement", "audit_closed"]
    assert evs[0]["prev_hash"] == GENESIS
    for prev, ev in zip(evs, evs[1:]):
        assert ev["prev_hash"] == prev["hash"]
    for ev in evs:
        body = {k: v for k, v in ev.items() if k != "hash"}
        assert ev["hash"] == hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()
        assert ev["replica"] == "r1"
    # The line is the canonical form with the hash appended: byte for byte.
    first = lines(p)[0]
    body = {k: v for k, v in evs[0].items() if k != "hash"}
    assert first == canonical(body)[:-1] + b',"hash":"' + evs[0]["hash"].encode() + b'"}'
    r = run_verify(p)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"replica r1: intact, 4 events, seq 1..4, last hash {evs[-1]['hash']}; ends with a clean stop" in r.stdout


def test_chain_continues_across_restarts(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    write(p, 2)
    write(p, 2)
    evs = [orjson.loads(x) for x in lines(p)]
    assert [e["seq"] for e in evs] == [1, 2, 3, 4, 5, 6]
    assert evs[3]["prev_hash"] == evs[2]["hash"]
    assert verify(numbered_lines([str(p)])).ok


def test_edit_with_recomputed_hash_is_caught_by_the_next_link(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    write(p, 5)
    ev = orjson.loads(lines(p)[1])
    ev["user"] = "mallory"
    body = {k: v for k, v in ev.items() if k != "hash"}
    digest = hashlib.sha256(canonical(body)).hexdigest()
    tamper(p, lambda raw: raw.__setitem__(1, canonical(body)[:-1] + b',"hash":"' + digest.encode() + b'"}'))
    res = verify(numbered_lines([str(p)]))
    prob = res.chains["r1"].problem
    assert prob is not None and (prob.kind, prob.where) == ("edited", f"{p}:2")
    assert prob.detail == f"event seq 2 was changed or replaced: the next event ({p}:3) was chained to a different hash"


@pytest.mark.parametrize("change,verdict", [
    (lambda raw: raw.__setitem__(2, raw[2].replace(b'"rows":2', b'"rows":0')),
     "FAILED at {p}:3: edited: event seq 3 does not match its hash"),
    (lambda raw: raw.__delitem__(slice(3, 5)), "FAILED at {p}:4: missing: seq 4..5 missing between {p}:3 and {p}:4"),
    (lambda raw: raw.__setitem__(slice(2, 4), [raw[3], raw[2]]),
     "FAILED at {p}:3: reordered: seq 4 comes after seq 2 ({p}:2); seq 3 is at {p}:4"),
], ids=["edited", "deleted", "swapped"])
def test_tampering_is_reported_at_its_line(tmp_path: Path, change: Callable[[list[bytes]], None],
                                           verdict: str) -> None:
    p = tmp_path / "audit.jsonl"
    write(p, 6)
    tamper(p, change)
    r = run_verify(p)
    assert r.returncode == 1
    assert f"replica r1: {verdict.format(p=p)}" in r.stdout, r.stdout


def test_deleted_tail_shows_as_an_unclean_end(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    write(p, 4)
    raw = lines(p)
    p.write_bytes(b"\n".join(raw[:-2]) + b"\n")
    r = run_verify(p)
    assert r.returncode == 0  # the chain alone cannot prove a tail was cut: it says where it ends
    assert f"seq 1..3, last hash {orjson.loads(raw[2])['hash']}; ends at {p}:3 without a clean stop" in r.stdout


def test_torn_last_line_starts_an_explicit_segment(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    write(p, 3)
    with open(p, "ab") as f:
        f.write(b'{"event":"statement","user":"al')  # a crash in the middle of a write
    write(p, 1)
    raw = lines(p)
    assert raw[4] == b'{"event":"statement","user":"al'
    restart = orjson.loads(raw[5])
    assert restart["event"] == "chain_restart"
    assert restart["reason"] == "unclean stop"
    assert restart["detail"] == f"the last line of {p} (31 bytes) is torn (no newline at its end)"
    assert (restart["seq"], restart["prev_hash"]) == (5, orjson.loads(raw[3])["hash"])
    res = verify(numbered_lines([str(p)]))
    chain = res.chains["r1"]
    assert chain.problem is None and chain.last_seq == 7  # the chain itself is whole ...
    assert not res.ok and chain.unclean == [f"{p}:6: {restart['detail']}"]  # ... but a crash is evidence
    # The same torn line with no chain_restart after it is a broken event.
    p.write_bytes(b"\n".join(raw[:5]) + b"\n" + b"\n".join(raw[6:]) + b"\n")
    res = verify(numbered_lines([str(p)]))
    assert not res.ok
    assert [str(x) for x in res.broken] == [f"{p}:5: broken: the line is not a complete audit event"]


def test_monthly_rotation_gzip_and_two_replicas_in_one_directory(tmp_path: Path) -> None:
    clock = Clock("2026-10-31T23:59:58+00:00")
    a = AuditLog(str(tmp_path / "a-%Y-%m.jsonl"), replica="host-a:6432", clock=clock)
    b = AuditLog(str(tmp_path / "b-%Y-%m.jsonl"), replica="host-b:6432", clock=clock)
    for i in range(3):
        a.emit("statement", None, statement=f"SELECT {i}")
        b.emit("statement", None, statement=f"SELECT {i}")
    clock.set("2026-11-01T00:00:01+00:00")
    for i in range(3, 5):
        a.emit("statement", None, statement=f"SELECT {i}")
        b.emit("statement", None, statement=f"SELECT {i}")
    a.close()
    b.close()
    assert sorted(os.listdir(tmp_path)) == ["a-2026-10.jsonl.gz", "a-2026-11.jsonl",
                                            "b-2026-10.jsonl.gz", "b-2026-11.jsonl"]
    old = [orjson.loads(x) for x in gzip.decompress((tmp_path / "a-2026-10.jsonl.gz").read_bytes()).splitlines()]
    new = [orjson.loads(x) for x in lines(tmp_path / "a-2026-11.jsonl")]
    assert [e["seq"] for e in old] == [1, 2, 3] and [e["seq"] for e in new] == [4, 5, 6]
    assert new[0]["prev_hash"] == old[-1]["hash"]
    assert new[0]["time"] == "2026-11-01T00:00:01.000000+00:00"
    r = run_verify(tmp_path)
    assert r.returncode == 0, r.stdout
    assert "replica host-a:6432: intact, 6 events, seq 1..6" in r.stdout
    assert "replica host-b:6432: intact, 6 events, seq 1..6" in r.stdout
    # A restart in the new month continues from the newest file; deleting the gzipped month is noticed.
    clock.set("2026-11-02T08:00:00+00:00")
    a = AuditLog(str(tmp_path / "a-%Y-%m.jsonl"), replica="host-a:6432", clock=clock)
    a.emit("statement", None, statement="SELECT 9")
    a.close()
    assert [orjson.loads(x)["seq"] for x in lines(tmp_path / "a-2026-11.jsonl")] == [4, 5, 6, 7, 8]
    (tmp_path / "a-2026-10.jsonl.gz").unlink()
    r = subprocess.run([*PGWARDEN, "audit", "verify", "--from-start", str(tmp_path)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1
    assert (f"replica host-a:6432: FAILED at {tmp_path}/a-2026-11.jsonl:1: missing: the chain begins at seq 4"
            in r.stdout)
    assert "replica host-b:6432: intact, 6 events" in r.stdout


def test_edit_inside_a_gzipped_month_is_found(tmp_path: Path) -> None:
    clock = Clock("2026-09-30T23:59:59+00:00")
    a = AuditLog(str(tmp_path / "audit-%Y-%m.jsonl"), replica="r", clock=clock)
    a.emit("statement", None, rows=1)
    a.emit("statement", None, rows=2)
    clock.set("2026-10-01T00:00:00+00:00")
    a.emit("statement", None, rows=3)
    a.close()
    gz = tmp_path / "audit-2026-09.jsonl.gz"
    gz.write_bytes(gzip.compress(gzip.decompress(gz.read_bytes()).replace(b'"rows":2', b'"rows":7')))
    r = run_verify(tmp_path)
    assert r.returncode == 1
    assert f"replica r: FAILED at {gz}:2: edited: event seq 2 does not match its hash" in r.stdout


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    log = AuditLog(str(p), replica="r")
    threads = [threading.Thread(target=lambda k=k: [log.emit("statement", None, writer=k, n=i)
                                                   for i in range(500)]) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    evs = [orjson.loads(x) for x in lines(p)]
    assert len(evs) == 4001
    assert sorted((e["writer"], e["n"]) for e in evs[:-1]) == [(k, i) for k in range(8) for i in range(500)]
    res = verify(numbered_lines([str(p)]))
    assert res.ok and res.chains["r"].last_seq == 4001


def test_unwritable_log_holds_events_back_and_recovers(tmp_path: Path) -> None:
    """/dev/full answers every write with ENOSPC, as a full disk does."""
    link = tmp_path / "audit.jsonl"
    link.symlink_to("/dev/full")
    log = AuditLog(str(link), replica="r")
    assert log.healthy and not log.refusing
    log.emit("statement", None, n=1)
    assert not log.healthy and log.refusing
    assert log.failure == "No space left on device (ENOSPC)"
    log.emit("statement", None, n=2)
    link.unlink()  # the operator frees space: the path now names a writable file
    log.emit("statement", None, n=3)
    assert log.healthy and not log.refusing
    log.close()
    evs = [orjson.loads(x) for x in lines(link)]
    assert [(e["seq"], e.get("n")) for e in evs] == [(1, 1), (2, 2), (3, 3), (4, None)]
    assert verify(numbered_lines([str(link)])).ok
    full = tmp_path / "full.jsonl"
    full.symlink_to("/dev/full")
    cont = AuditLog(str(full), replica="r", on_failure="continue")
    cont.emit("statement", None, n=1)
    assert not cont.healthy and not cont.refusing
    cont.close()


def test_altered_last_line_at_start_is_reported_and_still_fails_verify(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    write(p, 3)
    tamper(p, lambda raw: raw.__setitem__(3, raw[3].replace(b'"audit_closed"', b'"audit_closeD"')))
    write(p, 1)
    evs = [orjson.loads(x) for x in lines(p)]
    restart = evs[4]
    assert restart["event"] == "chain_restart"
    assert restart["reason"] == f"the last line of {p} ({len(lines(p)[3])} bytes) does not match its hash"
    assert (restart["seq"], restart["prev_hash"]) == (4, evs[2]["hash"])  # linked to the last good event
    res = verify(numbered_lines([str(p)]))
    prob = res.chains["r1"].problem
    assert prob is not None and (prob.kind, prob.where) == ("edited", f"{p}:4")


def test_two_replicas_interleaved_in_one_file_and_a_restart_finds_its_own_chain(tmp_path: Path) -> None:
    p = tmp_path / "shared.jsonl"
    a, b = AuditLog(str(p), replica="a"), AuditLog(str(p), replica="b")
    for i in range(3):
        a.emit("statement", None, n=i)
        b.emit("statement", None, n=i)
    a.close()
    b.emit("statement", None, n=3)  # b's lines now follow a's last one
    a = AuditLog(str(p), replica="a")  # scans back past b's lines to its own last event
    a.emit("statement", None, n=9)
    a.close()
    b.close()
    evs = [orjson.loads(x) for x in lines(p)]
    assert [(e["replica"], e["seq"]) for e in evs] == [
        ("a", 1), ("b", 1), ("a", 2), ("b", 2), ("a", 3), ("b", 3), ("a", 4), ("b", 4), ("a", 5), ("a", 6), ("b", 5)]
    r = run_verify(p)
    assert r.returncode == 0, r.stdout
    assert "replica a: intact, 6 events, seq 1..6" in r.stdout and "replica b: intact, 5 events, seq 1..5" in r.stdout
    tamper(p, lambda raw: raw.__delitem__(3))  # b's seq 2
    r = run_verify(p)
    assert r.returncode == 1
    assert f"replica b: FAILED at {p}:5: missing: seq 2 missing between {p}:2 and {p}:5" in r.stdout
    assert "replica a: intact, 6 events" in r.stdout


def test_same_meaning_other_bytes_is_an_edit(tmp_path: Path) -> None:
    """A duplicate key or an escaped character parses to the same event but hides it from grep."""
    from proxy.audit.chain import exact, parse_line, seal

    ev = {"event": "statement", "ticket": "T-2026-000001", "user": "bob", "replica": "r", "seq": 1,
          "prev_hash": "0" * 64}
    line, _ = seal(ev)
    assert exact(line + b"\n", parse_line(line))  # type: ignore[arg-type]
    forged = line.replace(b'"T-2026-000001"', b'"T-2026-00000\\u0031"')
    assert parse_line(forged) == parse_line(line) and not exact(forged, parse_line(forged))  # type: ignore[arg-type]
    dup = b'{"user":"mallory",' + line[1:]
    assert parse_line(dup) == parse_line(line) and not exact(dup, parse_line(dup))  # type: ignore[arg-type]


def test_an_unserialisable_value_leaves_no_gap(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path), replica="r")
    log.emit("statement", None, rows=2**70)  # past 64 bits: orjson refuses it
    log.emit("statement", None, rows=1)
    log.close()
    events = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    assert [e["seq"] for e in events] == [1, 2, 3]
    assert events[0]["unserialisable"].startswith("TypeError") and "rows" not in events[0]
    r = run_verify(path)
    assert r.returncode == 0, r.stdout
