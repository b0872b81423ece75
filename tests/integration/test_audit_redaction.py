"""What the audit log keeps of a statement (issue 13): sensitive literals never in clear, yet findable by
their keyed hash (R2.4, R5.3), and ``masked`` / receipts naming the columns the statement read (R5.1, R5.4).

Real clients through a real pgwarden; the audit *file* is read back byte for byte.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest

from proxy.demo.pgcluster import PgCluster
from tests.conftest import Proxy, start_proxy
from tests.integration.test_policy_e2e import HOTEL

ROOT = Path(__file__).resolve().parents[2]
KEY = "audit-value-key-for-tests-0123456789"
PHONE, ID_NUMBER, CARD = "13987654321", "11010519491231002X", "6222021234567890128"


@pytest.fixture(scope="module")
def logged(cluster: PgCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    d = tmp_path_factory.mktemp("redaction")
    p = start_proxy(cluster, str(d), rules=str(HOTEL), audit={"path": str(d / "audit.jsonl"), "value_key": KEY})
    try:
        yield p
    finally:
        p.thread.stop()


def run(p: Proxy, user: str, sql: str) -> list[tuple] | psycopg.Error:
    try:
        with psycopg.connect(p.dsn(user), autocommit=True) as c:
            return c.execute(sql).fetchall()
    except psycopg.Error as e:
        return e


SEARCHES = [
    # (user, statement, the value it searched for)
    ("bob", f"SELECT id FROM cs_records WHERE phone::text = '{PHONE}'", PHONE),
    ("bob", f"SELECT id FROM cs_records WHERE phone ~ '^{PHONE}$'", PHONE),
    ("bob", f"SELECT id FROM cs_records WHERE strpos(id_number, '{ID_NUMBER}') > 0", ID_NUMBER),
    ("bob", f"SELECT id FROM cs_records WHERE phone SIMILAR TO '{PHONE}'", PHONE),
    ("bob", f"SELECT id FROM cs_records WHERE coalesce(bank_card, '') = '{CARD}'", CARD),
    ("bob", f"SELECT id FROM cs_records WHERE (phone, category) = ('{PHONE}', 'complaint')", PHONE),
    ("bob", f"SELECT id FROM (SELECT id, phone AS p FROM cs_records) t WHERE p = '{PHONE}'", PHONE),
    # unmasked for the general manager: the value is pushed into the fence, so the text sent has it too
    ("dave", f"SELECT id FROM cs_records WHERE phone = '{PHONE}'", PHONE),
    ("dave", f"SELECT id FROM cs_records WHERE id_number IN ('{ID_NUMBER}', '1')", ID_NUMBER),
    # by shape, compared with nothing sensitive
    ("carol", f"SELECT name FROM sys_params WHERE value = '{CARD}'", CARD),
]


def test_sensitive_literals_are_not_in_the_log_and_can_be_found(logged: Proxy, tmp_path: Path) -> None:
    logged.take_events(None)
    for user, sql, _ in SEARCHES:
        assert isinstance(run(logged, user, sql), list), sql
    events = [e for e in logged.take_events() if e.get("outcome") == "ok"]
    assert len(events) == len(SEARCHES)
    for ev, (_, sql, value) in zip(events, SEARCHES):
        assert value not in json.dumps(ev, ensure_ascii=False), sql
        assert ev.get("value_hashes"), sql
    text = Path(logged.audit_path).read_text(encoding="utf-8")
    for value in (PHONE, ID_NUMBER, CARD):
        assert value not in text  # the file itself: statement, rewritten, everything
    # Security finds who searched for each value, by its keyed hash.
    env = dict(os.environ, PGWARDEN_AUDIT_VALUE_KEY=KEY)
    for value, want in [(PHONE, 6), (ID_NUMBER, 2), (CARD, 2)]:
        r = subprocess.run([sys.executable, "-m", "proxy.cli", "audit", "search", logged.audit_path,
                            "--value", value, "--json"], env=env, cwd=ROOT, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        found = [json.loads(line) for line in r.stdout.splitlines()]
        assert len(found) == want, (value, [f["statement"] for f in found])
        assert {f["user"] for f in found} <= {"bob", "dave", "carol"}
    # Without the key the hashes mean nothing.
    r = subprocess.run([sys.executable, "-m", "proxy.cli", "audit", "search", logged.audit_path, "--value", PHONE,
                        "--json"], env={k: v for k, v in env.items() if k != "PGWARDEN_AUDIT_VALUE_KEY"}, cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "" and "value_key" in r.stderr


def test_the_mask_salt_is_not_in_the_rewritten_text(logged: Proxy) -> None:
    logged.take_events(None)
    assert isinstance(run(logged, "frank", "SELECT card_serial FROM keycard_events LIMIT 1"), list)
    (ev,) = logged.take_events()
    assert ev["decision"] == "rewrite" and "sha256" in ev["rewritten"]
    assert os.environ["PGWARDEN_MASK_SALT"] not in json.dumps(ev, ensure_ascii=False)


READS = [
    ("SELECT count(*) FROM cs_records", []),
    ("SELECT count(*) FROM (SELECT * FROM cs_records) s", []),  # a BI tool's wrapper reads nothing
    ("SELECT id, phone FROM cs_records LIMIT 1", ["phone"]),
    ("SELECT id FROM cs_records WHERE content LIKE '%房%' LIMIT 1", ["content"]),
    ("SELECT p FROM (SELECT phone AS p, id_number AS i FROM cs_records) t LIMIT 1", ["phone"]),
    ("SELECT * FROM cs_records LIMIT 1", ["bank_card", "content", "id_number", "phone"]),
    ("SELECT row_to_json(c)::text FROM cs_records c LIMIT 1", ["bank_card", "content", "id_number", "phone"]),
]


def test_masked_and_receipts_name_the_columns_read(logged: Proxy, cluster: PgCluster) -> None:
    from proxy.audit.report import summarise

    logged.take_events(None)
    notices: list[str] = []
    with psycopg.connect(logged.dsn("bob"), autocommit=True) as c:
        c.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        for sql, _ in READS:
            c.execute(sql).fetchall()
    events = logged.take_events()
    assert len(events) == len(READS) == len(notices)
    for ev, note, (sql, cols) in zip(events, notices, READS):
        assert sorted(ev.get("masked", [])) == [f"public.cs_records.{c}" for c in cols], sql
        rows = ev["rows"]
        slip = f"pgwarden receipt {ev['receipt']}: {rows} row{'' if rows == 1 else 's'} from cs_records"
        assert note == (slip + f", masked: {', '.join(cols)}" if cols else slip), sql
    now = datetime.now(timezone.utc)
    s = summarise(events, since=now - timedelta(hours=1), until=now + timedelta(hours=1))
    assert dict(s.masked) == {"public.cs_records.phone": 4, "public.cs_records.content": 3,
                              "public.cs_records.id_number": 2, "public.cs_records.bank_card": 2}


def test_postgresqls_error_echo_is_masked_too(logged: Proxy) -> None:
    # PostgreSQL's message repeats the literal ("invalid input syntax for type bigint: ..."): the event keeps
    # the message, with the value masked.
    logged.take_events(None)
    err = run(logged, "carol", f"SELECT '{PHONE}x'::bigint")
    assert isinstance(err, psycopg.Error) and err.sqlstate == "22P02"
    (ev,) = logged.take_events()
    assert ev["outcome"] == "error" and "invalid input syntax" in ev["error"]
    assert PHONE not in json.dumps(ev, ensure_ascii=False) and "139****4321" in ev["error"]
    assert PHONE not in Path(logged.audit_path).read_text(encoding="utf-8")
