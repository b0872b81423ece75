"""Write-ahead intents, unclean stops and keyed chains of the audit writer, on real files (issue 14).

Files are written by AuditLog itself; attacks are done to the bytes on disk the way an insider with write
access to the log but without the key would: delete events, recompute every seq, prev_hash and hash.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from proxy.audit.chain import GENESIS, canonical, key_id
from proxy.audit.files import numbered_lines
from proxy.audit.log import AuditLog
from proxy.audit.verify import Anchor, render, verify

PGWARDEN = [sys.executable, "-m", "proxy.cli"]
KEY = b"k" * 8 + b"-a-test-key-of-32-bytes-or-more-"


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def evs(path: Path) -> list[dict]:
    return [orjson.loads(x) for x in lines(path)]


def rechain(raw: list[bytes], *, keep_key_id: bool = False) -> list[bytes]:
    """What an insider without the key can do: renumber and re-hash every event with plain SHA-256."""
    out, prev = [], GENESIS
    for i, line in enumerate(raw, 1):
        ev = orjson.loads(line)
        ev.pop("hash")
        if not keep_key_id:
            ev.pop("key_id", None)
        ev["seq"], ev["prev_hash"] = i, prev
        body = canonical(ev)
        prev = hashlib.sha256(body).hexdigest()
        out.append(body[:-1] + b',"hash":"' + prev.encode() + b'"}')
    return out


def run_verify(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PGWARDEN, "audit", "verify", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_a_start_after_an_unclean_stop_says_so_and_verify_fails(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    log = AuditLog(str(p), replica="r")
    log.emit("statement", None, statement="SELECT 1")
    log.flush()  # never closed: as after SIGKILL
    again = AuditLog(str(p), replica="r")
    again.close()
    got = evs(p)
    assert [e["event"] for e in got] == ["statement", "chain_restart", "audit_closed"]
    restart = got[1]
    assert (restart["reason"], restart["last_seq"], restart["seq"], restart["prev_hash"]) == (
        "unclean stop", 1, 2, got[0]["hash"])
    res = verify(numbered_lines([str(p)]))
    assert res.chains["r"].problem is None and not res.ok
    r = run_verify(str(p))
    assert r.returncode == 1
    assert "replica r: INCOMPLETE: chain intact, 3 events" in r.stdout
    assert f"UNCLEAN STOP at {p}:2: the chain of replica r ends at seq 1 (statement) without audit_closed" in r.stdout


async def test_intents_are_durable_before_they_resolve_and_share_fsyncs(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    log = AuditLog(str(p), replica="r")
    log.bind_loop(asyncio.get_running_loop())
    results = await asyncio.gather(*(
        asyncio.wrap_future(asyncio.ensure_future(_one_intent(log, p, i))) for i in range(200)))
    assert all(results)
    assert 1 <= log.fsyncs < 200  # group commit: many intents per fsync
    log.close()
    starts = [e for e in evs(p) if e["event"] == "statement_start"]
    assert sorted(e["statement"] for e in starts) == sorted(f"SELECT {i}" for i in range(200))


async def _one_intent(log: AuditLog, p: Path, i: int) -> bool:
    (seq,), fut = log.intent({"user": "u"}, [{"statement": f"SELECT {i}", "statement_type": "SELECT"}])
    ok = await fut
    # Resolved means on disk: the line with this seq is in the file now, before any close().
    assert any(orjson.loads(x)["seq"] == seq for x in lines(p))
    return ok


async def test_a_failed_intent_resolves_false_and_turns_refusal_on(tmp_path: Path) -> None:
    link = tmp_path / "audit.jsonl"
    link.symlink_to("/dev/full")
    log = AuditLog(str(link), replica="r")
    log.bind_loop(asyncio.get_running_loop())
    assert not log.refusing
    _, fut = log.intent({}, [{"statement": "SELECT 1"}])
    assert await fut is False
    assert log.refusing and log.failure == "No space left on device (ENOSPC)"
    link.unlink()
    log.close()


def test_verify_lists_statements_started_and_never_ended(tmp_path: Path) -> None:
    async def crash() -> None:
        log = AuditLog(str(p), replica="r")
        log.bind_loop(asyncio.get_running_loop())
        (s1, s2), fut = log.intent({"user": "bob", "role": "supervisor"},
                                   [{"statement": "SELECT pg_sleep(60)"}, {"statement": "SELECT 2"}])
        assert await fut
        log.emit("statement", None, statement="SELECT 2", outcome="ok", start=s2)
        log.flush()  # and then the process dies: no outcome for the first

    p = tmp_path / "audit.jsonl"
    asyncio.run(crash())
    AuditLog(str(p), replica="r").close()
    out = "\n".join(render(verify(numbered_lines([str(p)]))))
    assert f"STARTED, NEVER ENDED: {p}:1: seq 1, bob (supervisor): SELECT pg_sleep(60) (no outcome before this " \
           "unclean stop)" in out
    assert "SELECT 2" not in out.split("STARTED, NEVER ENDED")[1]
    assert "1 unclean stop(s), 1 statement(s) started and never ended" in out


def _keyed(p: Path, n: int, key: bytes = KEY) -> None:
    log = AuditLog(str(p), replica="r", key=key)
    for i in range(n):
        log.emit("statement", None, user="alice", statement=f"SELECT {i}", rows=i)
    log.close()


def test_keyed_chain_verifies_with_the_key_only(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    _keyed(p, 5)
    got = evs(p)
    assert {e["key_id"] for e in got} == {key_id(KEY)}
    body = {k: v for k, v in got[0].items() if k != "hash"}
    assert got[0]["hash"] != hashlib.sha256(canonical(body)).hexdigest()  # an HMAC, not a plain SHA-256
    keyfile = tmp_path.parent / f"{tmp_path.name}-audit.key"
    keyfile.write_bytes(KEY + b"\n")
    r = run_verify(str(p), "--key", f"file:{keyfile}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"protection: keyed ({key_id(KEY)}), MACs checked" in r.stdout
    r = run_verify(str(p))
    assert r.returncode == 0 and "5 MACs NOT checked" not in r.stdout and "6 MACs NOT checked (give the key" in r.stdout
    r = run_verify(str(p), "--key", "env:WRONG_KEY", env={"WRONG_KEY": "x" * 40})
    assert r.returncode == 1
    assert (f"replica r: FAILED at {p}:1: unknown key: event seq 1 is sealed with key {key_id(KEY)}, which none of "
            "the keys given is") in r.stdout


@pytest.mark.parametrize("keep_key_id", [False, True], ids=["key_id-stripped", "key_id-kept"])
def test_rechaining_without_the_key_is_found(tmp_path: Path, keep_key_id: bool) -> None:
    """Delete events 3..5, renumber, recompute every hash: a plain chain would say intact."""
    p = tmp_path / "audit.jsonl"
    _keyed(p, 8)
    raw = lines(p)
    forged = rechain(raw[:2] + raw[5:], keep_key_id=keep_key_id)
    p.write_bytes(b"\n".join(forged) + b"\n")
    r = run_verify(str(p), "--key", "env:AUDIT_KEY", env={"AUDIT_KEY": KEY.decode()})
    assert r.returncode == 1, r.stdout
    if keep_key_id:
        assert (f"replica r: FAILED at {p}:1: edited: event seq 1 does not match its MAC (the key's HMAC) "
                "(its content was changed, or it was re-chained without the key)") in r.stdout
    else:
        assert (f"replica r: FAILED at {p}:6: unkeyed: no event of this chain is keyed: it was written without the "
                "key, or re-chained by someone without it") in r.stdout


def test_rechained_unkeyed_file_is_found_by_its_anchors(tmp_path: Path) -> None:
    """Without a key, anchors kept outside the file still catch a re-chained file and a cut tail."""
    p = tmp_path / "audit.jsonl"
    log = AuditLog(str(p), replica="r")
    for i in range(10):
        log.emit("statement", None, statement=f"SELECT {i}")
    log.close()
    raw = lines(p)
    anchors = {"r": [Anchor("r", 5, orjson.loads(raw[4])["hash"], "t1"), Anchor("r", 11, orjson.loads(raw[10])["hash"], "t2")]}
    assert verify(numbered_lines([str(p)]), anchors=anchors, anchored="test").ok
    p.write_bytes(b"\n".join(rechain(raw[:2] + raw[4:])) + b"\n")
    res = verify(numbered_lines([str(p)]), anchors=anchors, anchored="test")
    prob = res.chains["r"].problem
    assert prob is not None and prob.kind == "re-chained"
    assert prob.detail.startswith("seq 5 in the files does not carry the hash anchored in the state store (anchored t1)")
    p.write_bytes(b"\n".join(raw[:8]) + b"\n")  # the tail cut after seq 8
    prob = verify(numbered_lines([str(p)]), anchors=anchors, anchored="test").chains["r"].problem
    assert prob is not None and prob.kind == "truncated"
    assert "anchor at seq 11 (anchored t2), but the files end at seq 8" in prob.detail


def test_a_key_file_beside_the_log_is_refused(tmp_path: Path) -> None:
    from proxy.config import ConfigError, parse_config
    from rules.yamlfile import load_yaml_text

    (tmp_path / "audit.key").write_bytes(KEY)
    doc = (f"upstream: {{host: 127.0.0.1}}\naudit: {{path: {tmp_path}/audit.jsonl, key: 'file:{tmp_path}/audit.key'}}\n")
    data, loc = load_yaml_text(doc, "<config>")
    with pytest.raises(ConfigError, match="must not live beside the audit log"):
        parse_config(data, loc)


def test_audit_key_from_the_environment_is_hidden_in_config_show(monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy.config import ConfigError, effective_config, parse_config
    from rules.yamlfile import load_yaml_text

    doc = "upstream: {host: 127.0.0.1}\naudit: {path: /var/log/pgwarden/audit.jsonl, key: 'env:PGW_TEST_KEY'}\n"
    monkeypatch.setenv("PGW_TEST_KEY", KEY.decode())
    cfg = parse_config(*load_yaml_text(doc, "<config>"))
    assert cfg.audit_key == KEY and cfg.audit_write_ahead and (cfg.audit_anchor_every, cfg.audit_anchor_seconds) == (
        1000, 5.0)
    shown = effective_config(cfg)["audit"]["key"]
    assert shown == "env:PGW_TEST_KEY (<hidden>)" and KEY.decode() not in str(effective_config(cfg))
    monkeypatch.setenv("PGW_TEST_KEY", "short")
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        parse_config(*load_yaml_text(doc, "<config>"))
    with pytest.raises(ConfigError, match="env:VARIABLE or file:"):
        parse_config(*load_yaml_text(doc.replace("'env:PGW_TEST_KEY'", "'" + KEY.decode() + "'"), "<config>"))
